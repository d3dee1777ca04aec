"""`wasinn serve`: an OpenAI-compatible HTTP server over the Host's named models.

    from wasinn import Host
    from wasinn.server import create_app
    host = Host(models=["chat:GGML:AUTO:SmolLM2-135M-Instruct.Q4_1.gguf"])
    app = create_app(host, chat_model="chat")      # a FastAPI app: run it on uvicorn

The routes speak OpenAI's API; what answers them is a `Completer` (text) and an `Embedder`
(vectors). The local ones run the Host's models in-process: GGUF chat models, and embeddings
from GGUF models or ONNX sentence-embedding models (`OnnxEmbedder`, e.g. all-MiniLM-L6-v2);
another Completer can stand in front of them (a cache) or instead of them, through
`create_app(completer=...)`; `create_app(upstream=UpstreamConfig(url))` sends the other
models' requests to an upstream API. `create_app(routes=[WagiRoute(host, "app.wasm",
route="/app")])` serves guests as HTTP handlers, WAGI-style (a fresh instance per request).
"""

from ._api import (ApiError, Caller, Completer, Completion, Embedder, Embeddings,
                   GenerationRequest, Message, Sampling, TextStream)
from ._app import create_app, serve
from ._local import LocalCompleter, LocalEmbedder
from ._metrics import Metrics, ServerMetrics
from ._sentence import EmbedderRouter, OnnxEmbedder
from ._template import ChatTemplate
from ._upstream import UpstreamCompleter, UpstreamConfig
from ._wagi import WagiPool, WagiRequest, WagiResponse, WagiRoute

__all__ = ["ApiError", "Caller", "ChatTemplate", "Completer", "Completion", "Embedder",
           "EmbedderRouter", "Embeddings", "GenerationRequest", "LocalCompleter",
           "LocalEmbedder", "Message", "Metrics", "OnnxEmbedder", "Sampling", "ServerMetrics",
           "TextStream", "UpstreamCompleter", "UpstreamConfig", "WagiPool", "WagiRequest",
           "WagiResponse", "WagiRoute", "create_app", "serve"]
