"""The tiny random llama GGUF from tiny_gguf.py, checked against llama-cpp-python directly."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from tiny_gguf import BOS_ID, EOS_ID, IM_END_ID, IM_START_ID, write_tiny_llama  # noqa: E402

TEXT = "Hello, wörld! <|im_start|>user said \"a , b\" 12345 ok?  \t\n日本語 🙂"

_GENERATE = """
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, seed=1, verbose=False, n_threads=2)
out = llm.create_completion("Once upon", max_tokens=16, temperature=0)
print(json.dumps([out["choices"][0]["text"], out["usage"]["completion_tokens"]]))
"""


@pytest.fixture(scope="module")
def llm(tiny: Path):
    return llama_cpp.Llama(model_path=str(tiny), n_ctx=256, seed=1, verbose=False,
                           n_threads=2)


def test_file_is_small_and_deterministic(tmp_path: Path, tiny: Path) -> None:
    again = write_tiny_llama(tmp_path / "again.gguf")
    other = write_tiny_llama(tmp_path / "other.gguf", seed=1)
    assert tiny.stat().st_size < 600_000
    assert again.read_bytes() == tiny.read_bytes()
    assert other.read_bytes() != tiny.read_bytes()


def test_metadata(llm) -> None:
    meta = llm.metadata
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    assert llm.n_vocab() == 384 and llm.n_embd() == 64 and llm.n_ctx() == 256
    assert llm.token_bos() == BOS_ID and llm.token_eos() == EOS_ID


@pytest.mark.parametrize("special", [False, True])
def test_tokenize_round_trip(llm, special: bool) -> None:
    tokens = llm.tokenize(TEXT.encode(), add_bos=False, special=special)
    assert (IM_START_ID in tokens) == special
    assert llm.detokenize(tokens, special=special).decode() == TEXT
    # the C detokenizer too (no clean-up of spaces before punctuation)
    buf = ctypes.create_string_buffer(1024)
    n = llama_cpp.llama_detokenize(llm._model.vocab, (llama_cpp.llama_token * len(tokens))(*tokens),
                                   len(tokens), buf, len(buf), False, special)
    assert buf.raw[:n].decode() == TEXT


def test_merges_apply_and_bos_is_added(llm) -> None:
    tokens = llm.tokenize(b"Once upon a time")
    assert tokens[0] == BOS_ID
    assert len(tokens) < 1 + len("Once upon a time") // 2


def test_chatml_prompt(llm) -> None:
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    assert tokens.count(IM_START_ID) == 2 and tokens.count(IM_END_ID) == 1
    assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, IM_END_ID)
    assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, EOS_ID)
    assert llm.detokenize(tokens, special=True).decode() == prompt


def test_greedy_is_deterministic_across_processes(llm, tiny: Path) -> None:
    out = llm.create_completion("Once upon", max_tokens=16, temperature=0)
    here = [out["choices"][0]["text"], out["usage"]["completion_tokens"]]
    assert here[1] == 16 and out["choices"][0]["finish_reason"] == "length"
    assert here[0].isascii() and here[0].isprintable()
    runs = [subprocess.run([sys.executable, "-c", _GENERATE, str(tiny)], check=True,
                           capture_output=True, text=True, timeout=60) for _ in range(2)]
    assert [json.loads(r.stdout.strip().splitlines()[-1]) for r in runs] == [here, here]


def test_forced_eos_stops(llm) -> None:
    out = llm.create_completion("Once upon", max_tokens=16, temperature=0,
                                logit_bias={EOS_ID: 100.0})
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == 0


def test_embedding(tiny: Path) -> None:
    # llama-architecture GGUFs carry no pooling type, so without one embed() gives a vector per
    # token; with mean pooling it gives one vector of n_embd floats
    per_token = llama_cpp.Llama(model_path=str(tiny), n_ctx=256, verbose=False,
                                n_threads=2, embedding=True).embed("hi")
    assert len(per_token) > 1 and all(len(row) == 64 for row in per_token)
    pooled = llama_cpp.Llama(model_path=str(tiny), n_ctx=256, verbose=False, n_threads=2,
                             embedding=True,
                             pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN).embed("hi")
    assert len(pooled) == 64 and all(isinstance(x, float) for x in pooled)
