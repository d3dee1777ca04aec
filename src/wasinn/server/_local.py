"""The Host's GGUF models as a Completer and an Embedder, in-process through the ggml backend.

Each request gets its own execution context (its own llama_context and sampler), so requests
running at once never share tokens. Requests run on bounded thread pools, one for generation
and one for embeddings (so a short embedding never waits behind long generations); llama.cpp
releases the GIL while it decodes, so the event loop stays free and the pools' threads run
side by side.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import (ContextFull, EndOfSequence, InvalidArgument, NotFound, PromptTooLong,
                      UnsupportedOperation, WasiNnError)
from ..registry import Registry
from ..tensor import GraphEncoding, Tensor, TensorType
from ._api import (ApiError, Completion, Embeddings, FinishReason, GenerationRequest, Sampling,
                   TextStream, model_not_found)
from ._template import ChatTemplate

_SEED_RANGE = 0xFFFFFFFF  # llama.cpp seeds are uint32, and 0xFFFFFFFF means "random"


def ggml_models(registry: Registry) -> list[str]:
    return [n for n in registry.names() if registry.spec(n).encoding == GraphEncoding.GGML]


def backend_config(s: Sampling) -> dict[str, Any]:
    """The ggml backend's metadata keys (WasmEdge's names) for these settings."""
    config: dict[str, Any] = {
        "n-predict": -1 if s.max_tokens is None else s.max_tokens,
        "temp": s.temperature,
        "top-p": s.top_p,
        "presence-penalty": s.presence_penalty,
        "frequency-penalty": s.frequency_penalty,
    }
    if s.seed is not None:
        config["seed"] = s.seed % _SEED_RANGE
    if s.top_k is not None:
        config["top-k"] = s.top_k
    if s.min_p is not None:
        config["min-p"] = s.min_p
    if s.repeat_penalty is not None:
        config["repeat-penalty"] = s.repeat_penalty
    if s.json_schema is not None:
        config["json-schema"] = s.json_schema
    return config


def api_error(e: WasiNnError) -> ApiError:
    """A backend's error as the client should see it."""
    if isinstance(e, PromptTooLong):
        return ApiError(400, f"This model's context is too small for the prompt: {e}",
                        code="context_length_exceeded", param="messages")
    if isinstance(e, (InvalidArgument, UnsupportedOperation)):
        return ApiError(400, str(e))
    if isinstance(e, NotFound):
        return ApiError(404, str(e), code="model_not_found", param="model")
    return ApiError(500, f"the model failed: {e}", type="server_error")


def _prompt_tensor(text: str) -> Tensor:
    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    return Tensor((len(data),), TensorType.U8, data)


class _StopScanner:
    """Finds the first of the stop strings in text that arrives piece by piece, holding back
    a tail that could still become one so that no part of a stop string reaches the client."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string ended the answer)."""
        if not self._stops:
            return text, False
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[:min(hits)], True
        keep = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:k]):
                    keep = k
                    break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class LocalCompleter:
    """Chat and text completions from the Host's GGUF models (a Completer)."""

    def __init__(self, registry: Registry, parallel: int = 2) -> None:
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        self._registry = registry
        self._pool = ThreadPoolExecutor(max_workers=parallel,
                                        thread_name_prefix="wasinn-generate")
        self._templates: dict[str, ChatTemplate] = {}
        self._lock = threading.Lock()

    def models(self) -> list[str]:
        return ggml_models(self._registry)

    def chat_template(self, model: str) -> ChatTemplate:
        """The model's template (loads the model if it is not yet loaded)."""
        with self._lock:
            template = self._templates.get(model)
        if template is None:
            graph = self._registry.get(model)
            template = ChatTemplate.for_model(graph.model)  # type: ignore[attr-defined]
            with self._lock:
                self._templates[model] = template
        return template

    def render(self, request: GenerationRequest) -> str:
        """The text the model reads for this request."""
        if request.prompt is not None:
            return request.prompt
        assert request.messages is not None
        return self.chat_template(request.model).render(request.messages)

    async def complete(self, request: GenerationRequest) -> Completion:
        self._check(request.model)
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        try:
            completion = await loop.run_in_executor(self._pool, self._run, request,
                                                    lambda piece: None, cancel)
        except asyncio.CancelledError:
            cancel.set()  # the caller is gone: the worker stops at its next token
            raise
        assert completion is not None
        return completion

    async def stream(self, request: GenerationRequest) -> TextStream:
        """Starts generating and returns once the first piece (or the end, or an error) is
        there, so that an error before any text is an HTTP error, not a broken stream."""
        self._check(request.model)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        cancel = threading.Event()

        def on_piece(piece: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, piece)

        future = loop.run_in_executor(self._pool, self._run, request, on_piece, cancel)
        # pieces and the future's result both reach the loop by call_soon_threadsafe from the
        # worker, in order, so the end marker always comes after the last piece
        future.add_done_callback(lambda _: queue.put_nowait(None))
        source = _QueueSource(queue, future, cancel)
        try:
            await source.peek()
        except BaseException:
            cancel.set()
            raise
        return TextStream(source)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _check(self, model: str) -> None:
        if model not in self.models():
            raise model_not_found(model, self.models())

    def _run(self, request: GenerationRequest, on_piece: Callable[[str], None],
             cancel: threading.Event) -> Completion | None:
        """One whole generation on a pool thread; None if cancelled."""
        try:
            graph = self._registry.get(request.model)
            prompt = self.render(request)
            ctx = graph.init_execution_context(backend_config(request.sampling))
        except WasiNnError as e:
            raise api_error(e) from None
        try:
            ctx.set_input(0, _prompt_tensor(prompt))
            return self._generate(ctx, request, on_piece, cancel)
        except WasiNnError as e:
            raise api_error(e) from None
        finally:
            ctx.close()

    @staticmethod
    def _generate(ctx: Any, request: GenerationRequest, on_piece: Callable[[str], None],
                  cancel: threading.Event) -> Completion | None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = _StopScanner(request.sampling.stop)
        parts: list[str] = []

        def send(text: str) -> None:
            if text:
                parts.append(text)
                on_piece(text)

        finish: FinishReason | None = None
        ended = False
        while not ended:
            if cancel.is_set():
                return None
            try:
                ctx.compute_single()
            except EndOfSequence:
                ended = True
                text = decoder.decode(b"", final=True)
            except ContextFull:
                ended = True
                finish = "length"
                text = decoder.decode(b"", final=True)
            else:
                text = decoder.decode(bytes(ctx.get_output_single(0)))
            safe, hit = stops.feed(text)
            send(safe)
            if hit:
                finish = "stop"
                break
        else:
            send(stops.flush())
        counts = json.loads(ctx.get_output_single(1))
        generated = int(counts["output_tokens"])
        if finish is None:
            limit = request.sampling.max_tokens
            finish = "length" if limit is not None and generated >= limit else "stop"
        return Completion(model=request.model, text="".join(parts), finish_reason=finish,
                          prompt_tokens=int(counts["input_tokens"]), completion_tokens=generated)


class _QueueSource:
    """The loop's side of a generation: pieces from the worker, then its Completion."""

    def __init__(self, queue: asyncio.Queue[str | None], future: asyncio.Future[Completion | None],
                 cancel: threading.Event) -> None:
        self._queue = queue
        self._future = future
        self._cancel = cancel
        self._peeked: str | None = None
        self._has_peeked = False
        self._done = False

    async def peek(self) -> None:
        self._peeked = await self._next()
        self._has_peeked = True

    async def _next(self) -> str | None:
        item = await self._queue.get()
        if item is None:
            self._future.result()  # raises the worker's error
        return item

    def __aiter__(self) -> _QueueSource:
        return self

    async def __anext__(self) -> str | Completion:
        if self._done:
            raise StopAsyncIteration
        try:
            if self._has_peeked:
                item, self._peeked, self._has_peeked = self._peeked, None, False
            else:
                item = await self._next()
        except BaseException:
            self._done = True
            self._cancel.set()
            raise
        if item is not None:
            return item
        self._done = True
        completion = self._future.result()
        if completion is None:
            raise StopAsyncIteration
        return completion

    async def aclose(self) -> None:
        self._done = True
        self._cancel.set()


class LocalEmbedder:
    """Embeddings from the Host's GGUF models: the ggml backend's embedding mode (mean-pooled,
    L2-normed), one execution context per request (an Embedder)."""

    def __init__(self, registry: Registry, parallel: int = 2) -> None:
        self._registry = registry
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="wasinn-embed")

    def models(self) -> list[str]:
        return ggml_models(self._registry)

    async def embed(self, model: str, texts: Sequence[str]) -> Embeddings:
        if model not in self.models():
            raise model_not_found(model, self.models())
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._embed, model, list(texts))

    def _embed(self, model: str, texts: list[str]) -> Embeddings:
        try:
            graph = self._registry.get(model)
            ctx = graph.init_execution_context({"embedding": True})
        except WasiNnError as e:
            raise api_error(e) from None
        rows: list[list[float]] = []
        tokens = 0
        try:
            for text in texts:
                ctx.set_input(0, _prompt_tensor(text))
                ctx.compute()
                rows.append(json.loads(ctx.get_output(0))["embedding"])
                tokens += int(json.loads(ctx.get_output(1))["input_tokens"])
        except PromptTooLong as e:
            raise ApiError(400, f"an input is too long for the model: {e}",
                           code="context_length_exceeded", param="input") from None
        except WasiNnError as e:
            raise api_error(e) from None
        finally:
            ctx.close()
        return Embeddings(model=model, vectors=np.asarray(rows, dtype=np.float32),
                          prompt_tokens=tokens)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
