"""The FastAPI application: OpenAI's routes over a Completer and an Embedder, /health, /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..host import Host
from ..tensor import GraphEncoding
from . import _openai as oa
from ._api import ApiError, Completer, Embedder, GenerationRequest, TextStream, model_not_found
from ._local import LocalCompleter, LocalEmbedder
from ._metrics import CONTENT_TYPE, ServerMetrics
from ._sentence import EmbedderRouter, OnnxEmbedder
from ._upstream import LocalOrUpstream, UpstreamCompleter, UpstreamConfig
from ._wagi import WagiRoute, mount

if TYPE_CHECKING:
    from ..cache import CacheConfig

log = logging.getLogger("wasinn.server")

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health",
          "/metrics")
_RECORD = "wasinn.record"


class _Record:
    """What a route learns about its request, for the metrics taken when the answer ends."""

    __slots__ = ("model", "prompt_tokens", "completion_tokens", "status")

    def __init__(self) -> None:
        self.model = ""
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.status: int | None = None  # an error inside a stream that began with 200


def _record(request: Request) -> _Record:
    return request.scope[_RECORD]


class _Measure:
    """ASGI middleware: counts every request when its last byte has gone (streams included)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = (path if path in ROUTES
                 else "/v1/models/{model}" if path.startswith("/v1/models/") else "other")
        record = scope[_RECORD] = _Record()
        status = 500

        async def measured(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.perf_counter()
        self.metrics.in_progress.add(1, route=route)
        try:
            await self.app(scope, receive, measured)
        finally:
            self.metrics.in_progress.add(-1, route=route)
            self.metrics.record(route, record.model, record.status or status,
                                record.prompt_tokens, record.completion_tokens,
                                time.perf_counter() - start)


def _resolve(requested: str, offered: Sequence[str], default: str | None) -> str:
    """The model a request names if offered, else the server's default for the route."""
    if requested in offered:
        return requested
    if default is not None:
        return default
    raise model_not_found(requested, offered)


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _sse(stream: TextStream, maker: oa.ChunkMaker, record: _Record) -> AsyncIterator[str]:
    """A TextStream as OpenAI's server-sent events, ending with `data: [DONE]`."""
    try:
        first = maker.first()
        if first is not None:
            yield _event(first)
        async for piece in stream:
            yield _event(maker.piece(piece))
            # pieces already queued come without a pause: let the loop see a client that left
            await asyncio.sleep(0)
        completion = stream.completion
        if completion is None:  # the producer stopped without an answer
            raise ApiError(500, "the stream ended early", type="server_error")
        record.prompt_tokens = completion.prompt_tokens
        record.completion_tokens = completion.completion_tokens
        for chunk in maker.last(completion):
            yield _event(chunk)
        yield "data: [DONE]\n\n"
    except ApiError as e:
        record.status = e.status
        yield _event(e.body())
    except Exception as e:  # the status line has gone: the client learns of it in the stream
        log.exception("a stream failed")
        record.status = 500
        yield _event(_internal(e).body())
    finally:
        await stream.aclose()


def _internal(e: BaseException) -> ApiError:
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")


def create_app(host: Host, *, chat_model: str | None = None,
               embedding_model: str | None = None, parallel: int = 2,
               completer: Completer | None = None, embedder: Embedder | None = None,
               metrics: ServerMetrics | None = None,
               cache: CacheConfig | None = None,
               embedding_tokenizer: Path | None = None,
               upstream: UpstreamConfig | None = None,
               routes: Sequence[WagiRoute] = ()) -> FastAPI:
    """An OpenAI-compatible app over `host`'s models.

    `chat_model` / `embedding_model` answer requests that name a model the server does not
    offer (without one, such a request is a 404). `parallel` bounds the requests generating
    at once (and, separately, those embedding). A `completer` or `embedder` given replaces
    the local one (the caller then owns and closes it); `metrics` may carry more families.
    `cache` puts a semantic cache in front of the completer (the app opens and closes it).
    Embeddings come from the GGUF models (ggml) and the ONNX ones (BERT-style sentence models,
    tokenized with `embedding_tokenizer`: a tokenizer.json or a BERT vocab.txt; None: the
    BERT uncased vocabulary wasinn ships, all-MiniLM-L6-v2's).
    `upstream` sends chat and completion requests for any model but the local ones to an
    OpenAI-compatible API (so there is no `chat_model` to fall back on).
    `routes` serve guests as HTTP handlers, WAGI-style (each at its path and those under it).
    """
    for route in routes:
        if route.route in ROUTES or route.route in ("/", "/v1") or route.route.startswith("/v1/"):
            raise ValueError(f"--route {route.route}: the OpenAI API's paths are taken")
    if upstream is not None and chat_model is not None:
        raise ValueError(f"--chat-model {chat_model!r} and --upstream: with an upstream, a "
                         f"model this server does not offer is the upstream's to answer")
    owned: list[LocalCompleter | EmbedderRouter] = []
    if completer is None:
        completer = LocalCompleter(host.registry, parallel)
        owned.append(completer)
    if embedder is None:
        try:
            onnx = OnnxEmbedder(host.registry, parallel, tokenizer=embedding_tokenizer)
        except BaseException:
            for o in owned:
                o.close()
            raise
        # ONNX first: the cache's default embedding model is the first offered
        embedder = EmbedderRouter(onnx, LocalEmbedder(host.registry, parallel))
        owned.append(embedder)
    metrics = metrics or ServerMetrics()
    for flag, name, offered in (("chat-model", chat_model, completer.models()),
                                ("embedding-model", embedding_model, embedder.models())):
        if name is not None and name not in offered:
            for o in owned:
                o.close()
            raise ValueError(f"--{flag} {name!r}: not a model this server offers "
                             f"({', '.join(offered) or 'none'})")
    remote = None
    if upstream is not None:
        remote = UpstreamCompleter(upstream)
        completer = LocalOrUpstream(completer, remote)
    semantic = None
    if cache is not None:
        try:
            semantic = _semantic_cache(cache, host, completer, embedder, embedding_model,
                                       metrics)
        except BaseException:
            for o in owned:
                o.close()
            raise
        completer = semantic

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if semantic is not None:
            await semantic.close()
        if remote is not None:
            await remote.aclose()
        for o in owned:
            o.close()

    app = FastAPI(title="wasinn", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.host = host
    app.state.completer = completer
    app.state.embedder = embedder
    app.state.metrics = metrics
    app.add_middleware(_Measure, metrics=metrics)  # type: ignore[arg-type]

    # --- errors, OpenAI's shape ---------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
            loc = []  # the location is a character offset, not a parameter
        else:
            where = ".".join(loc) or "body"
            message = f"{where}: {first.get('msg', 'invalid')}"
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more)"
        error = ApiError(400, message, param=".".join(loc) or None)
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(_internal(e).body(), status_code=500)  # uvicorn logs the traceback

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        error = ApiError(e.status_code, str(e.detail),
                         code="not_found" if e.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=e.status_code, headers=e.headers)

    # --- generation ---------------------------------------------------------------------------

    async def answer(request: Request, body: oa._GenerationBody, generation: GenerationRequest,
                     chat: bool) -> Response:
        record = _record(request)
        if body.stream:
            stream = await completer.stream(generation)
            maker = oa.ChunkMaker(chat, generation.model, body.include_usage)
            headers = {**stream.headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(_sse(stream, maker, record), media_type="text/event-stream",
                                     headers=headers)
        completion = await completer.complete(generation)
        record.prompt_tokens = completion.prompt_tokens
        record.completion_tokens = completion.completion_tokens
        make = oa.chat_completion if chat else oa.text_completion
        content = make(oa.new_id("chatcmpl" if chat else "cmpl"), oa.now(), completion)
        return JSONResponse(content, headers=dict(completion.headers))

    def chat_target(name: str) -> str:
        if remote is not None:
            return name  # the upstream says whether it has it
        return _resolve(name, completer.models(), chat_model)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: oa.ChatCompletionBody, request: Request) -> Response:
        body.refuse_unsupported()
        model = chat_target(body.model)
        _record(request).model = model
        generation = GenerationRequest(model=model, sampling=body.to_sampling(),
                                       messages=body.to_messages(),
                                       caller=oa.caller(request.headers))
        return await answer(request, body, generation, chat=True)

    @app.post("/v1/completions")
    async def completions(body: oa.CompletionBody, request: Request) -> Response:
        body.refuse_unsupported()
        model = chat_target(body.model)
        _record(request).model = model
        generation = GenerationRequest(model=model, sampling=body.sampling(),
                                       prompt=body.text(), caller=oa.caller(request.headers))
        return await answer(request, body, generation, chat=False)

    # --- embeddings ---------------------------------------------------------------------------

    @app.post("/v1/embeddings")
    async def embeddings(body: oa.EmbeddingBody, request: Request) -> JSONResponse:
        model = _resolve(body.model, embedder.models(), embedding_model)
        record = _record(request)
        record.model = model
        result = await embedder.embed(model, body.texts())
        if body.dimensions is not None and body.dimensions != result.vectors.shape[1]:
            raise ApiError(400, f"{model} gives {result.vectors.shape[1]} dimensions and cannot "
                                f"give {body.dimensions}", param="dimensions")
        record.prompt_tokens = result.prompt_tokens
        return JSONResponse(oa.embeddings(result, body.encoding_format))

    # --- the rest -----------------------------------------------------------------------------

    started = oa.now()

    def offered() -> list[str]:
        return sorted(set(completer.models()) | set(embedder.models()))

    async def listed(request: Request) -> list[str]:
        """The local models and those the upstream lists for this caller's key."""
        if remote is None:
            return offered()
        upstream_models = await remote.list_models(oa.caller(request.headers))
        return sorted(set(offered()) | set(upstream_models))

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        names = await listed(request)
        return {"object": "list", "data": [oa.model_card(n, started) for n in names]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict[str, Any]:
        names = await listed(request)
        if name not in names:
            raise model_not_found(name, names)
        return oa.model_card(name, started)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": offered()}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    for route in routes:
        mount(app, route)

    return app


def _semantic_cache(config: CacheConfig, host: Host, completer: Completer, embedder: Embedder,
                    embedding_model: str | None, metrics: ServerMetrics) -> Any:
    """The SemanticCache in front of `completer`, on the store at `config.path`."""
    from ..cache import SemanticCache, Verifier, open_store, redacted, registry_versions

    offered = list(embedder.models())
    model = config.embedding_model or embedding_model or (offered[0] if offered else None)
    if model is None:
        raise ValueError("the semantic cache needs an embedding model and the server offers "
                         "none (or run without the cache: --no-cache)")
    if model not in offered:
        raise ValueError(f"the semantic cache's embedding model {model!r} is not one this "
                         f"server offers ({', '.join(offered) or 'none'})")
    verifier = (None if config.verifier is None
                else Verifier(config.verifier, threshold=config.verify_threshold,
                              backend=host.backends.get(GraphEncoding.ONNX)))
    try:
        store = open_store(config.path)  # a DSN that fails fails now, not on the first request
    except BaseException:
        if verifier is not None:
            verifier.close()
        raise
    log.info("semantic cache: %s (%d entries), embeddings from %s, threshold %s, verifier %s",
             redacted(config.path), store.size(), model, config.threshold,
             "none" if verifier is None else f"{verifier.path} (>= {verifier.threshold})")
    return SemanticCache(completer, embedder, model, store, threshold=config.threshold,
                         ttl=config.ttl, max_entries=config.max_entries, metrics=metrics,
                         model_version=registry_versions(host.registry), verifier=verifier)


def serve(host: Host, *, bind: str = "127.0.0.1", port: int = 8000, access_log: bool = False,
          **options: Any) -> None:
    """Run the app on uvicorn until interrupted (options: those of create_app). Port 0 takes
    a free port; uvicorn's start-up line on stderr says which."""
    import uvicorn

    app = create_app(host, **options)
    uvicorn.run(app, host=bind, port=port, log_level="info", access_log=access_log)
