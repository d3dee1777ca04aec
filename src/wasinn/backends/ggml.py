"""llama.cpp backend (encoding 6, "ggml") on llama-cpp-python, with WasmEdge's conventions.

A graph is one llama_model; each execution context has its own llama_context (KV cache) and
sampler, so contexts on one model never see each other's tokens. Input 0 is the prompt
(UTF-8 bytes, tokenized at set_input), input 1 optional metadata JSON; compute writes output 0
(text) and output 1 (token counts). compute_single / get_output_single / fini_single stream.
The sampler chain mirrors llama-cpp-python's `Llama`, so the same settings give the same tokens.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals
from llama_cpp.llama_grammar import LlamaGrammar

from .._json import json_object
from ..errors import (BackendError, ContextFull, EndOfSequence, InvalidArgument, ModelNotFound,
                      PromptTooLong, UnsupportedOperation)
from ..tensor import ExecutionTarget, GraphEncoding, Tensor

# llama-cpp-python's `Llama` defaults, so that "the same settings" means the same thing here
_PENALTY_LAST_N = 64
_TYPICAL_P = 1.0
_IDLE_CONTEXTS = 2  # llama_contexts kept for reuse per model (a 4096-token KV is ~94 MB)
_MAX_GRAMMAR = 64 << 10
_MAX_GRAMMAR_DEPTH = 128


@dataclass(frozen=True)
class Options:
    """WasmEdge's GGML metadata keys (dashes in JSON); unknown keys are ignored."""

    n_predict: int = -1
    ctx_size: int = 0  # 0: the model's training context, at most 4096
    batch_size: int = 512
    ubatch_size: int = 512
    threads: int = max(1, (os.cpu_count() or 2) // 2)
    temp: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = llama_cpp.LLAMA_DEFAULT_SEED
    reverse_prompt: str = ""
    grammar: str = ""
    json_schema: str = ""
    embedding: bool = False
    n_gpu_layers: int = 0
    stream_stdout: bool = False
    enable_log: bool = False
    use_mmap: bool = True
    #: llama.cpp's extra CPU buffer types (AMX, repacked weights). Off by default: the AMX
    #: kernels segfault on the AMX-capable CPUs of these machines (Q4_1 SmolLM2, seen in gdb).
    extra_bufts: bool = False

    def merged(self, settings: Mapping[str, Any] | None) -> Options:
        """These options with `settings` (JSON keys, dashes or underscores) laid over them."""
        if not settings:
            return self
        known = {f.name for f in fields(self)}
        changes: dict[str, Any] = {}
        for key, value in settings.items():
            name = key.replace("-", "_")
            if name not in known:
                continue
            current = getattr(self, name)
            try:
                if isinstance(current, bool):
                    changes[name] = _as_bool(value)
                elif isinstance(current, int):
                    changes[name] = int(value)
                elif isinstance(current, float):
                    changes[name] = float(value)
                else:
                    changes[name] = value if isinstance(value, str) else json.dumps(value)
            except (TypeError, ValueError):
                raise InvalidArgument(f"metadata {key!r}: bad value {value!r}") from None
        return replace(self, **changes)


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class GgmlBackend:
    encoding = GraphEncoding.GGML
    graph_files = ("model.gguf",)
    missing_model_error = ModelNotFound

    def __init__(self, threads: int | None = None) -> None:
        self._defaults = Options() if not threads else Options(threads=threads)

    def load(self, builders: Sequence[bytes | memoryview], target: ExecutionTarget) -> GgmlGraph:
        """From bytes (WasmEdge: builder 0 the GGUF, builder 1 optional metadata JSON).
        llama.cpp opens files, so the bytes go to a private temporary file first."""
        if not 1 <= len(builders) <= 2:
            raise InvalidArgument(f"ggml takes 1 or 2 builders, got {len(builders)}")
        options = self._defaults.merged(json_object(builders[1], "metadata") if len(builders) == 2 else None)
        fd, name = tempfile.mkstemp(suffix=".gguf", prefix="wasinn-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(builders[0])
            return GgmlGraph(Path(name), options, target, delete_file=True)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise

    def load_paths(self, paths: Sequence[Path], target: ExecutionTarget,
                   progress: Callable[[float], None] | None = None) -> GgmlGraph:
        if not paths:
            raise InvalidArgument("ggml needs the path of a .gguf file")
        if not paths[0].is_file():
            raise ModelNotFound(f"model file {paths[0]} not found")
        return GgmlGraph(paths[0], self._defaults, target, progress=progress)


class GgmlGraph:
    """One llama_model, shared by its contexts (llama.cpp allows many contexts per model)."""

    def __init__(self, path: Path, options: Options, target: ExecutionTarget,
                 delete_file: bool = False,
                 progress: Callable[[float], None] | None = None) -> None:
        self.options = options
        self.path = path
        params = llama_cpp.llama_model_default_params()
        gpu = target in (ExecutionTarget.GPU, ExecutionTarget.AUTO)
        if target == ExecutionTarget.GPU and not llama_cpp.llama_supports_gpu_offload():
            raise UnsupportedOperation("target gpu needs llama-cpp-python built with CUDA "
                                       "(CMAKE_ARGS=-DGGML_CUDA=on)")
        # gpu and auto offload every layer where llama.cpp has a GPU, unless told how many
        offload = gpu and llama_cpp.llama_supports_gpu_offload()
        params.n_gpu_layers = options.n_gpu_layers or (999 if offload else 0)
        params.load_mode = (llama_cpp.LLAMA_LOAD_MODE_MMAP if options.use_mmap
                            else llama_cpp.LLAMA_LOAD_MODE_NONE)
        params.use_extra_bufts = options.extra_bufts
        if progress is not None:
            def hear(fraction: float, _user_data: Any) -> bool:
                progress(fraction)
                return True  # go on loading

            # kept on self: llama.cpp calls it while the model loads
            self._progress = llama_cpp.llama_progress_callback(hear)
            params.progress_callback = self._progress
        # llama.cpp logs through llama-cpp-python's logger; quiet unless enable-log
        logging.getLogger("llama-cpp-python").setLevel(
            logging.DEBUG if options.enable_log else logging.ERROR)
        try:
            # verbose=True only stops llama-cpp-python from pointing fds 1 and 2 at /dev/null
            # while loading (that would swallow our progress); the logger level above filters
            self.model = internals.LlamaModel(path_model=str(path), params=params, verbose=True)
        except ValueError as e:
            raise BackendError(f"llama.cpp could not load {path.name}: {e}") from None
        finally:
            if delete_file:
                path.unlink(missing_ok=True)  # the mapping stays valid after unlink
        self.n_vocab = self.model.n_vocab()
        self.n_ctx_train = self.model.n_ctx_train()
        self._idle: list[_Slot] = []
        self._pool_lock = threading.Lock()  # stores on several threads share a model

    def input_dtype(self, index: int) -> np.dtype | None:
        return None  # prompt and metadata are bytes, whatever type and dims the guest says

    def init_execution_context(self, config: Mapping[str, Any] | None = None) -> GgmlContext:
        return GgmlContext(self, self.options.merged(config))

    def take_slot(self, shape: _Shape) -> _Slot:
        """An idle llama_context of this shape, or a new one (making one costs ~40 ms on
        SmolLM2 with 4096 tokens, so finished guests leave theirs for the next)."""
        with self._pool_lock:
            for i, slot in enumerate(self._idle):
                if slot.shape == shape:
                    return self._idle.pop(i)
        return _Slot.make(self.model, shape)

    def give_back(self, slot: _Slot) -> None:
        with self._pool_lock:
            if len(self._idle) < _IDLE_CONTEXTS:
                _forget_tokens(slot.ctx)
                self._idle.append(slot)
                return
        slot.close()

    def close(self) -> None:
        with self._pool_lock:
            for slot in self._idle:
                slot.close()
            self._idle.clear()
        self.model.close()


@dataclass(frozen=True)
class _Shape:
    """What a llama_context is made with."""

    n_ctx: int
    n_batch: int
    n_ubatch: int
    threads: int
    embedding: bool
    verbose: bool


@dataclass
class _Slot:
    shape: _Shape
    ctx: internals.LlamaContext
    batch: internals.LlamaBatch

    @classmethod
    def make(cls, model: internals.LlamaModel, shape: _Shape) -> _Slot:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = shape.n_ctx
        params.n_batch = min(shape.n_batch, shape.n_ctx)
        params.n_ubatch = min(shape.n_ubatch, params.n_batch)
        params.n_threads = shape.threads
        params.n_threads_batch = shape.threads
        params.embeddings = shape.embedding
        params.no_perf = True
        if shape.embedding:
            params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        try:
            ctx = internals.LlamaContext(model=model, params=params, verbose=shape.verbose)
        except ValueError as e:
            raise BackendError(f"llama.cpp could not make a context: {e}") from None
        batch = internals.LlamaBatch(n_tokens=params.n_batch, embd=0, n_seq_max=1,
                                     verbose=shape.verbose)
        return cls(shape, ctx, batch)

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()


class GgmlContext:
    def __init__(self, graph: GgmlGraph, options: Options) -> None:
        self._graph = graph
        self._model = graph.model
        self._options = options
        self._input_options: Options | None = None  # from input 1
        self._prompt: list[int] | None = None
        self._slot: _Slot | None = None
        self._output = b""
        self._output_tokens = 0
        self._stream: _Generation | None = None
        self._piece = b""

    @property
    def options(self) -> Options:
        return self._input_options or self._options

    # --- inputs -------------------------------------------------------------------------

    def set_input(self, index: int, tensor: Tensor) -> None:
        raw = tensor.data.tobytes()
        if index == 0:
            if self._stream is not None:
                raise InvalidArgument("set_input during a stream: call fini_single first")
            # tokenized now, so input_tokens (output 1) can be read before compute
            self._prompt = self._model.tokenize(raw, add_bos=True, special=True)
        elif index == 1:
            self._input_options = self._options.merged(json_object(raw, "metadata"))
        else:
            raise InvalidArgument(f"ggml takes input 0 (prompt) and 1 (metadata), not {index}")

    # --- whole generation ----------------------------------------------------------------

    def compute(self) -> None:
        self._stream = None
        if self.options.embedding:
            self._output = self._embed()
            self._output_tokens = 0
            return
        generation = self._start()
        try:
            while True:
                piece = generation.step()
                if self.options.stream_stdout:
                    _echo(piece)
        except EndOfSequence:
            pass
        finally:  # context full keeps what fitted, as WasmEdge does
            self._output = generation.text
            self._output_tokens = generation.generated

    def get_output(self, index: int) -> bytes:
        if index == 0:
            return self._output
        if index == 1:
            return self._counts()
        raise InvalidArgument(f"ggml has outputs 0 (text) and 1 (metadata), not {index}")

    def _counts(self) -> bytes:
        return json.dumps({
            "input_tokens": len(self._prompt or ()),
            "output_tokens": self._output_tokens,
            "llama_cpp_python": getattr(llama_cpp, "__version__", ""),
        }).encode()

    # --- streaming ---------------------------------------------------------------------

    def compute_single(self) -> None:
        if self._stream is None:
            self._stream = self._start()
            self._output_tokens = 0
        self._piece = self._stream.step()
        self._output_tokens = self._stream.generated
        if self.options.stream_stdout:
            _echo(self._piece)

    def get_output_single(self, index: int) -> bytes:
        if index == 0:
            return self._piece
        if index == 1:
            return self._counts()
        raise InvalidArgument(f"ggml has outputs 0 (text) and 1 (metadata), not {index}")

    def fini_single(self) -> None:
        self._stream = None
        self._piece = b""

    def close(self) -> None:
        self._stream = None
        if self._slot is not None:
            self._graph.give_back(self._slot)
            self._slot = None

    # --- llama.cpp ------------------------------------------------------------------------

    def _context(self) -> tuple[internals.LlamaContext, internals.LlamaBatch]:
        """This context's llama_context, taken anew only when its shape changes."""
        o = self.options
        train = self._graph.n_ctx_train
        if o.ctx_size > max(train, 4096):
            raise InvalidArgument(f"ctx-size {o.ctx_size} is over the model's {train} tokens")
        if o.batch_size <= 0 or o.ubatch_size <= 0:
            raise InvalidArgument("batch-size and ubatch-size must be positive")
        if not 0 < o.threads <= (os.cpu_count() or 1) * 4:
            raise InvalidArgument(f"threads must be 1..{(os.cpu_count() or 1) * 4}")
        shape = _Shape(o.ctx_size if o.ctx_size > 0 else min(4096, train), o.batch_size,
                       o.ubatch_size, o.threads, o.embedding, o.enable_log)
        if self._slot is None or self._slot.shape != shape:
            self.close()
            self._slot = self._graph.take_slot(shape)
        return self._slot.ctx, self._slot.batch

    def _start(self) -> _Generation:
        if self._prompt is None:
            raise InvalidArgument("compute before the prompt (input 0) is set")
        ctx, batch = self._context()
        if len(self._prompt) >= ctx.n_ctx():
            raise PromptTooLong(f"the prompt is {len(self._prompt)} tokens, the context "
                                f"holds {ctx.n_ctx()}")
        return _Generation(self._model, ctx, batch, self._prompt, self.options,
                           self._graph.n_vocab)

    def _embed(self) -> bytes:
        if self._prompt is None:
            raise InvalidArgument("compute before the text (input 0) is set")
        ctx, batch = self._context()
        if len(self._prompt) > ctx.n_ctx():
            raise PromptTooLong(f"the text is {len(self._prompt)} tokens, the context "
                                f"holds {ctx.n_ctx()}")
        _forget_tokens(ctx)
        n_batch = batch._n_tokens
        if len(self._prompt) > n_batch:
            raise PromptTooLong(f"the text is {len(self._prompt)} tokens, the batch holds "
                                f"{n_batch} (raise batch-size)")
        batch.reset()
        batch.add_sequence(self._prompt, 0, False)
        try:
            ctx.decode(batch)
        except RuntimeError as e:
            raise BackendError(f"llama.cpp decode failed: {e}") from None
        n_embd = self._model.n_embd()
        vector = np.ctypeslib.as_array(ctx.get_embeddings_seq(0), shape=(n_embd,)).astype(
            np.float64)
        norm = math.sqrt(float(np.dot(vector, vector))) or 1.0
        return json.dumps({"n_embedding": n_embd,
                           "embedding": [float(v) for v in vector / norm]}).encode()


class _Generation:
    """One run of sampling over a fresh KV cache: the prompt, then a token per step."""

    def __init__(self, model: internals.LlamaModel, ctx: internals.LlamaContext,
                 batch: internals.LlamaBatch, prompt: list[int], options: Options,
                 n_vocab: int) -> None:
        self._model = model
        self._ctx = ctx
        self._batch = batch
        self._options = options
        self._sampler = _sampler(model, options, n_vocab)
        self._n_past = 0
        self._text = b""
        self._reverse = options.reverse_prompt.encode()
        self._stopped = False
        self._pending: int | None = None
        self.generated = 0
        _forget_tokens(ctx)
        self._decode(prompt)

    def _decode(self, tokens: Sequence[int]) -> None:
        n_batch = self._batch._n_tokens
        for start in range(0, len(tokens), n_batch):
            chunk = tokens[start:start + n_batch]
            self._batch.set_batch(batch=chunk, n_past=self._n_past, logits_all=False)
            try:
                self._ctx.decode(self._batch)
            except RuntimeError as e:
                raise BackendError(f"llama.cpp decode failed: {e}") from None
            self._n_past += len(chunk)

    @property
    def text(self) -> bytes:
        """Everything generated so far, cut before a reverse prompt."""
        return self._text

    def step(self) -> bytes:
        """The next piece of text, or EndOfSequence / ContextFull. The token behind a piece is
        decoded at the next step, so a piece goes out as soon as it is sampled and the last
        token is never decoded for nothing."""
        o = self._options
        if self._stopped or 0 <= o.n_predict <= self.generated:
            raise EndOfSequence("n-predict reached" if not self._stopped else "reverse prompt")
        if self._pending is not None:
            if self._n_past >= self._ctx.n_ctx():
                raise ContextFull(f"the context of {self._ctx.n_ctx()} tokens is full")
            self._decode([self._pending])
            self._pending = None
        token = self._sampler.sample(self._ctx, -1)
        if llama_cpp.llama_vocab_is_eog(self._model.vocab, token):
            raise EndOfSequence("end of generation token")
        piece = self._model.token_to_piece(token, special=False).rstrip(b"\0")
        self.generated += 1
        self._pending = token
        before = len(self._text)
        self._text += piece
        if self._reverse:
            # the reverse prompt may span pieces: look from where it could have begun
            found = self._text.find(self._reverse, max(0, before - len(self._reverse) + 1))
            if found >= 0:
                self._stopped = True
                piece = self._text[before:found]
                self._text = self._text[:found]
                if not piece:
                    raise EndOfSequence("reverse prompt")
        return piece


def _sampler(model: internals.LlamaModel, o: Options, n_vocab: int) -> internals.LlamaSampler:
    """The chain llama-cpp-python's Llama builds (penalties, grammar, then greedy or
    top-k / typical / top-p / min-p / temperature / seeded draw)."""
    sampler = internals.LlamaSampler()
    sampler.add_penalties(n_vocab=n_vocab, penalty_last_n=_PENALTY_LAST_N,
                          penalty_repeat=o.repeat_penalty, penalty_freq=o.frequency_penalty,
                          penalty_present=o.presence_penalty)
    grammar = _grammar(o)
    if grammar is not None:
        # llama-cpp-python would add a NULL sampler for a grammar that does not parse (a crash)
        stage = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
        if not stage:
            raise InvalidArgument("the grammar does not parse (GBNF, with a `root` rule)")
        llama_cpp.llama_sampler_chain_add(sampler.sampler, stage)
    if o.temp < 0.0:
        sampler.add_dist(o.seed)
    elif o.temp == 0.0:
        sampler.add_greedy()
    else:
        sampler.add_top_k(o.top_k)
        sampler.add_typical(_TYPICAL_P, 1)
        sampler.add_top_p(o.top_p, 1)
        sampler.add_min_p(o.min_p, 1)
        sampler.add_temp(o.temp)
        sampler.add_dist(o.seed)
    return sampler


def _grammar(o: Options) -> str | None:
    """The GBNF text for `grammar` or `json-schema`, bounded so a guest cannot make llama.cpp's
    recursive parser overflow the host's stack."""
    text = o.grammar
    if not text and o.json_schema:
        try:
            text = LlamaGrammar.from_json_schema(o.json_schema, verbose=o.enable_log)._grammar
        except (ValueError, RuntimeError, TypeError, KeyError, RecursionError) as e:
            raise InvalidArgument(f"bad json-schema: {e}") from None
    if not text:
        return None
    if len(text) > _MAX_GRAMMAR:
        raise InvalidArgument(f"grammar longer than {_MAX_GRAMMAR} bytes")
    depth = deepest = 0
    for char in text:
        depth += (char == "(") - (char == ")")
        deepest = max(deepest, depth)
    if deepest > _MAX_GRAMMAR_DEPTH:
        raise InvalidArgument(f"grammar nests deeper than {_MAX_GRAMMAR_DEPTH}")
    return text


def _forget_tokens(ctx: internals.LlamaContext) -> None:
    """Empty the KV cache's cells. Their data stays (wiping it costs 9 ms a run on SmolLM2)
    but no later token can attend to an empty cell."""
    if ctx.memory is not None:
        llama_cpp.llama_memory_clear(ctx.memory, False)


def _echo(piece: bytes) -> None:
    """stream-stdout: the host prints pieces as they come, as WasmEdge does."""
    sys.stdout.buffer.write(piece)
    sys.stdout.buffer.flush()
