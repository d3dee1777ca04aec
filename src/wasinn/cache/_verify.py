"""The semantic cache's second stage: a cross-encoder that checks a candidate before it is served.

Cosine similarity between sentence embeddings cannot tell "GATE 2017" from "GATE 2018" or
"Montgomery County" from "Pike County": such pairs sit at 0.96 and above. The verifier reads the
new question and a stored one together (BERT's [CLS] a [SEP] b [SEP]) and answers a probability
that both ask the same thing. Its ONNX graph takes input_ids, attention_mask, token_type_ids
(int64, [batch, tokens]) and the pair's cosine (float32, [batch]), and gives `probability`
([batch]): the cosine is folded in with a weight calibrated on held-out data, so 0.5 is the
calibrated decision point.

The default one (`data/qqp-verifier.onnx`, int8 weights, 23 MB) is all-MiniLM-L6-v2 fine-tuned
as a cross-encoder on three quarters of the QQP development pairs and calibrated on the fourth
by scripts/train_verifier.py; data/NOTICE says what it is and how it was made.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..backends import Backend
from ..tensor import ExecutionTarget, GraphEncoding, Tensor
from ..server._sentence import load_tokenizer

DEFAULT_VERIFIER = Path(__file__).parent / "data" / "qqp-verifier.onnx"
#: the calibrated decision point of the default verifier (its graph folds the bias in)
DEFAULT_VERIFY_THRESHOLD = 0.5
#: stored questions the verifier reads per lookup, nearest first
CANDIDATES = 3
#: with a verifier, the cosine a candidate needs to be read at all: the floor it was
#: calibrated with (below it, recall gains little and each lookup reads more pairs)
VERIFIED_COSINE_FLOOR = 0.85
#: the pair of texts is cut to this many tokens, as in training
MAX_TOKENS = 128
_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "cosine")


_NUMBER = re.compile(r"\d+")


def numbers(text: str) -> list[str]:
    """The digit runs of `text`, in order ("3.5" is two); leading zeros kept."""
    return _NUMBER.findall(text)


class Verifier:
    """A cross-encoder ONNX model on the onnx backend (CPU), read through wasi-nn's own
    Graph / ExecutionContext protocol. Thread-safe: each check makes its own context."""

    def __init__(self, path: Path | None = None, *, threshold: float = DEFAULT_VERIFY_THRESHOLD,
                 backend: Backend | None = None, parallel: int = 2) -> None:
        """`backend`: the Host's onnx backend (its thread settings), or a default one."""
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"verify threshold must be in (0, 1), got {threshold}")
        self.path = DEFAULT_VERIFIER if path is None else Path(path).expanduser()
        if not self.path.is_file():
            raise ValueError(f"the cache verifier {self.path}: no such file")
        self.threshold = threshold
        if backend is None:
            from ..backends.onnx import OnnxBackend  # onnxruntime: only when one is made

            backend = OnnxBackend()
        if backend.encoding != GraphEncoding.ONNX:
            raise ValueError(f"the cache verifier runs on the onnx backend, not "
                             f"{backend.encoding.name.lower()}")
        self._graph = backend.load([self.path.read_bytes()], ExecutionTarget.CPU)
        names = list(self._graph.input_names)
        if sorted(names) != sorted(_INPUTS) or len(self._graph.output_names) != 1:
            raise ValueError(f"{self.path} is not a cache verifier: it takes {', '.join(names)}"
                             f" and gives {', '.join(self._graph.output_names)}; a verifier "
                             f"takes {', '.join(_INPUTS)} and gives one probability per pair")
        self._order = [names.index(n) for n in _INPUTS]
        self._tokenizer = load_tokenizer(max_tokens=MAX_TOKENS)
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="wasinn-verify")

    async def check(self, question: str, candidates: Sequence[tuple[str, float]]) -> np.ndarray:
        """`check_now` off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.check_now, question, list(candidates))

    def check_now(self, question: str, candidates: Sequence[tuple[str, float]]) -> np.ndarray:
        """The probability that `question` asks what each (stored text, cosine) asks.

        One pair per compute: the int8 model quantizes its activations with one scale per
        tensor, so a pair batched with others (and their padding) would score differently
        from the same pair alone; alone is how it was calibrated. A candidate whose numbers
        differ from the question's ("GATE 2017" / "GATE 2018", "iPhone 7" / "iPhone 8") is 0
        without a read: the cross-encoder still took a few such pairs for the same question."""
        out = np.zeros(len(candidates), np.float32)
        wanted = numbers(question)
        if not candidates:
            return out
        ctx = self._graph.init_execution_context()
        try:
            for row, (text, cosine) in enumerate(candidates):
                if numbers(text) != wanted:
                    continue
                e = self._tokenizer.encode(question, text)
                arrays = (np.array([e.ids], np.int64), np.ones((1, len(e.ids)), np.int64),
                          np.array([e.type_ids], np.int64), np.array([cosine], np.float32))
                for index, array in zip(self._order, arrays):
                    ctx.set_input(index, Tensor.from_array(array))
                ctx.compute()
                out[row] = np.asarray(ctx.get_output(0), np.float32).reshape(())
        finally:
            ctx.close()
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._graph.close()
