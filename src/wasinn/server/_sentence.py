"""Sentence embeddings from the Host's ONNX models (BERT-style, e.g. all-MiniLM-L6-v2), through
the same path as everything else: the named-model registry, the onnx backend's graph, one
execution context per request, `set_input` / `compute` / `get_output` with wasinn Tensors.

A model qualifies if it takes `input_ids` and `attention_mask` (and optionally
`token_type_ids`), int64 (batch, sequence), and gives `last_hidden_state` (batch, sequence, d)
(or has one output of that shape). Its rows are mean-pooled over the attention mask and
L2-normed, as sentence-transformers does.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from ..errors import WasiNnError
from ..registry import Registry
from ..tensor import GraphEncoding, Tensor
from ._api import ApiError, Embedder, Embeddings, model_not_found
from ._local import api_error

#: BERT-base uncased's WordPiece vocabulary (Apache-2.0; data/NOTICE says where it is from):
#: all-MiniLM-L6-v2's tokenizer, and that of most small English sentence-embedding models
BERT_UNCASED_VOCAB = Path(__file__).parent / "data" / "bert-base-uncased-vocab.txt"
#: all-MiniLM-L6-v2 was trained on 128 tokens and sentence-transformers runs it on 256
DEFAULT_MAX_TOKENS = 256
#: texts per compute: enough to amortize a call, few enough that padding stays small (the
#: texts are sorted by length first, so a batch holds texts of about the same length)
_BATCH = 32
_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def bert_tokenizer(vocab: Path) -> Tokenizer:
    """A lower-casing BERT WordPiece tokenizer over a `vocab.txt` (one token a line), the same
    pipeline as BERT-uncased's `tokenizer.json`: [CLS] text [SEP], accents kept as the
    vocabulary has them, each CJK character a word."""
    model = WordPiece.from_file(str(vocab), unk_token="[UNK]", max_input_chars_per_word=100)
    tokenizer = Tokenizer(model)
    missing = [t for t in _SPECIAL if tokenizer.token_to_id(t) is None]
    if missing:
        raise ValueError(f"{vocab}: not a BERT vocabulary (no {', '.join(missing)})")
    tokenizer.add_special_tokens(list(_SPECIAL))  # "[SEP]" typed in a text is the token
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def load_tokenizer(path: Path | None = None, max_tokens: int = DEFAULT_MAX_TOKENS) -> Tokenizer:
    """The tokenizer at `path`: a Hugging Face `tokenizer.json`, or else a BERT `vocab.txt`
    (lower-cased WordPiece); None: BERT uncased's vocabulary, shipped with wasinn.
    Texts are cut to `max_tokens` (special tokens included); padding is the embedder's."""
    path = BERT_UNCASED_VOCAB if path is None else Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"the embedding tokenizer {path}: no such file")
    try:
        if path.suffix == ".json":
            tokenizer = Tokenizer.from_file(str(path))
        else:
            tokenizer = bert_tokenizer(path)
    except ValueError:
        raise
    except Exception as e:  # tokenizers raises plain Exceptions for files it cannot read
        raise ValueError(f"the embedding tokenizer {path} cannot be loaded: {e}") from None
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_tokens)
    return tokenizer


@dataclass(frozen=True)
class _Layout:
    """Where an ONNX graph takes the tokenizer's arrays and gives its hidden states."""

    inputs: tuple[tuple[int, str], ...]  # (input index, which of _INPUTS)
    output: int


def _layout(model: str, graph: object) -> _Layout:
    names = getattr(graph, "input_names", None)
    outputs = getattr(graph, "output_names", None)
    if names is None or outputs is None:
        raise ApiError(400, f"{model} is not an ONNX graph", param="model")
    unknown = [n for n in names if n not in _INPUTS]
    if unknown or "input_ids" not in names or "attention_mask" not in names:
        raise ApiError(400, f"{model} is not a sentence-embedding model: it takes "
                            f"{', '.join(names)}; an embedding model takes input_ids, "
                            f"attention_mask and optionally token_type_ids", param="model")
    ranks = getattr(graph, "output_ranks", [None] * len(outputs))
    if "last_hidden_state" in outputs:
        output = outputs.index("last_hidden_state")
    elif len(outputs) == 1:
        output = 0
    elif ranks.count(3) == 1:  # the one (batch, sequence, dimensions) output: token states
        output = ranks.index(3)
    else:
        raise ApiError(400, f"{model} is not a sentence-embedding model: no last_hidden_state "
                            f"nor one (batch, sequence, dimensions) output among its outputs "
                            f"({', '.join(outputs)})", param="model")
    return _Layout(tuple(enumerate(names)), output)


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each row's token states averaged over its attention mask, then L2-normed (float32)."""
    weights = mask.astype(np.float32)[:, :, None]
    summed = (hidden.astype(np.float32) * weights).sum(axis=1)
    pooled = summed / np.maximum(weights.sum(axis=1), 1e-9)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


class OnnxEmbedder:
    """Embeddings from the Host's ONNX models (an Embedder): tokenized with one tokenizer for
    all of them, batched (up to 32 texts of similar length per compute), mean-pooled over the
    attention mask, L2-normed.

    A text longer than `max_tokens` tokens (256 by default, all-MiniLM-L6-v2's limit in
    sentence-transformers; [CLS] and [SEP] count) is truncated, not refused: its vector is
    that of its first 255 or so word pieces, and `prompt_tokens` counts what was embedded.
    Every ONNX model of the registry is offered; one that is not a sentence-embedding model
    answers 400 when asked.
    """

    def __init__(self, registry: Registry, parallel: int = 2, tokenizer: Path | None = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        self._registry = registry
        self._tokenizer = load_tokenizer(tokenizer, max_tokens)
        self._pad_id = self._tokenizer.token_to_id("[PAD]") or 0
        self._layouts: dict[str, _Layout] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=parallel,
                                        thread_name_prefix="wasinn-embed-onnx")

    def models(self) -> list[str]:
        registry = self._registry
        return [n for n in registry.names() if registry.spec(n).encoding == GraphEncoding.ONNX]

    async def embed(self, model: str, texts: Sequence[str]) -> Embeddings:
        if model not in self.models():
            raise model_not_found(model, self.models())
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.embed_now, model, list(texts))

    def embed_now(self, model: str, texts: Sequence[str]) -> Embeddings:
        """`embed` on the calling thread."""
        try:
            graph = self._registry.get(model)
        except WasiNnError as e:
            raise api_error(e) from None
        layout = self._layout_of(model, graph)
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=True)
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        vectors: np.ndarray | None = None
        ctx = graph.init_execution_context()
        try:
            for start in range(0, len(order), _BATCH):
                rows = order[start:start + _BATCH]
                pooled = self._compute(ctx, layout, [encodings[i] for i in rows])
                if vectors is None:
                    vectors = np.empty((len(encodings), pooled.shape[1]), np.float32)
                vectors[rows] = pooled
        except WasiNnError as e:
            raise api_error(e) from None
        finally:
            ctx.close()
        if vectors is None:
            raise ApiError(400, "nothing to embed", param="input")
        tokens = sum(len(e.ids) for e in encodings)
        return Embeddings(model=model, vectors=vectors, prompt_tokens=tokens)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _layout_of(self, model: str, graph: object) -> _Layout:
        with self._lock:
            layout = self._layouts.get(model)
        if layout is None:
            layout = _layout(model, graph)
            with self._lock:
                self._layouts[model] = layout
        return layout

    def _compute(self, ctx: object, layout: _Layout, batch: list[Encoding]) -> np.ndarray:
        width = max(len(e.ids) for e in batch)
        arrays = {name: np.zeros((len(batch), width), np.int64) for name in _INPUTS}
        arrays["input_ids"].fill(self._pad_id)
        for row, encoding in enumerate(batch):
            n = len(encoding.ids)
            arrays["input_ids"][row, :n] = encoding.ids
            arrays["attention_mask"][row, :n] = 1
            arrays["token_type_ids"][row, :n] = encoding.type_ids
        for index, name in layout.inputs:
            ctx.set_input(index, Tensor.from_array(arrays[name]))  # type: ignore[attr-defined]
        ctx.compute()  # type: ignore[attr-defined]
        hidden = ctx.get_output(layout.output)  # type: ignore[attr-defined]
        if not isinstance(hidden, np.ndarray) or hidden.ndim != 3 or \
                hidden.shape[:2] != (len(batch), width):
            shape = getattr(hidden, "shape", "bytes")
            raise ApiError(400, f"this model's output {layout.output} has shape {shape}, not "
                                f"(batch, sequence, dimensions): not a sentence-embedding "
                                f"model", param="model")
        return mean_pool(hidden, arrays["attention_mask"])


class EmbedderRouter:
    """Several embedders as one (an Embedder): a request goes to the first that offers its
    model, so the routes need not know which backend embeds."""

    def __init__(self, *embedders: Embedder) -> None:
        self._embedders = embedders

    def models(self) -> list[str]:
        seen: dict[str, None] = {}
        for embedder in self._embedders:
            seen.update(dict.fromkeys(embedder.models()))
        return list(seen)

    async def embed(self, model: str, texts: Sequence[str]) -> Embeddings:
        for embedder in self._embedders:
            if model in embedder.models():
                return await embedder.embed(model, texts)
        raise model_not_found(model, self.models())

    def close(self) -> None:
        for embedder in self._embedders:
            close = getattr(embedder, "close", None)
            if close is not None:
                close()
