"""What the HTTP layer asks of whatever answers it: a Completer for text, an Embedder for vectors.

The OpenAI routes turn a request into a `GenerationRequest` (model resolved, sampling settled)
and hand it to a Completer; anything that keeps to the protocol can stand in front of another
(a cache in front of the local models or an upstream API) without the routes knowing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Sampling:
    """Every setting that changes what the model answers (hashable: a cache may key on it).

    None means the backend's default. `stop` holds at most four strings; the text ends before
    the first one found, which never reaches the client.
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: llama.cpp extensions beyond OpenAI's parameters (the names its server takes)
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    #: a JSON schema the answer must follow (`response_format`), as JSON text
    json_schema: str | None = None


@dataclass(frozen=True)
class Message:
    """One chat turn; `content` is text (parts of other kinds are refused earlier)."""

    role: str
    content: str
    name: str | None = None

    def as_template_dict(self) -> dict[str, str]:
        d = {"role": self.role, "content": self.content}
        if self.name is not None:
            d["name"] = self.name
        return d


@dataclass(frozen=True)
class Caller:
    """Who asks: the bearer token (the whole Authorization for another scheme; None without
    one) and the request's headers, lower-cased."""

    api_key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationRequest:
    """One completion to make: a chat (`messages`) or a raw prompt (`prompt`), never both."""

    model: str
    sampling: Sampling
    messages: tuple[Message, ...] | None = None
    prompt: str | None = None
    caller: Caller = Caller()

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a GenerationRequest has messages or a prompt, not both or neither")


@dataclass(frozen=True)
class Completion:
    """A finished answer, with real token counts. `headers` go out on the HTTP response."""

    model: str
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    headers: Mapping[str, str] = field(default_factory=dict)


class TextStream:
    """Pieces of an answer as they come, then `completion` (None until the stream has ended
    in full: a stream cut short, or that failed, never has one).

    `source` yields text pieces and, last, the Completion. `headers` must be known before the
    first piece (they go out with the HTTP status line).
    """

    def __init__(self, source: AsyncIterator[str | Completion],
                 headers: Mapping[str, str] | None = None) -> None:
        self._source = source
        self.headers: Mapping[str, str] = dict(headers or {})
        self.completion: Completion | None = None

    def __aiter__(self) -> TextStream:
        return self

    async def __anext__(self) -> str:
        item = await self._source.__anext__()
        if isinstance(item, Completion):
            self.completion = item
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        """Stop early: the producer stops generating and frees what it holds."""
        close = getattr(self._source, "aclose", None)
        if close is not None:
            await close()


class Completer(Protocol):
    """Makes completions. `complete` and `stream` raise ApiError for what the client got wrong
    (an unknown model, a prompt too long); a stream raises only before its first piece, or
    ends early with an error the routes send as an SSE error event."""

    def models(self) -> Sequence[str]:
        """The model names this completer answers for."""
        ...

    async def complete(self, request: GenerationRequest) -> Completion: ...

    async def stream(self, request: GenerationRequest) -> TextStream: ...


@dataclass(frozen=True)
class Embeddings:
    """One unit-norm float32 row per input, and the tokens they took."""

    model: str
    vectors: np.ndarray  # (n_inputs, dimensions), float32
    prompt_tokens: int


class Embedder(Protocol):
    def models(self) -> Sequence[str]: ...

    async def embed(self, model: str, texts: Sequence[str]) -> Embeddings: ...


class ApiError(Exception):
    """An error the client gets as OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def model_not_found(name: str, offered: Sequence[str]) -> ApiError:
    return ApiError(404, f"The model {name!r} does not exist (this server offers: "
                         f"{', '.join(offered) or 'none'})", code="model_not_found",
                    param="model")
