"""OpenAI's request bodies (validated with pydantic) and response bodies (plain dicts).

Parameters this server cannot honour are refused with a 400 naming them, never ignored
silently; fields that do not change the answer (`user`, `store`, `metadata`...) pass.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ._api import ApiError, Caller, Completion, Embeddings, Message, Sampling

MAX_STOPS = 4  # as OpenAI


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _GenerationBody(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    # llama.cpp's extensions (pass them in the OpenAI client's `extra_body`)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, ge=0)

    def refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise ApiError(400, "n > 1 is not supported: ask once per choice", param="n")
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")

    def sampling(self, max_tokens: int | None = None, json_schema: str | None = None) -> Sampling:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"at most {MAX_STOPS} stop sequences", param="stop")
        return Sampling(
            max_tokens=self.max_tokens if max_tokens is None else max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=tuple(s for s in stops if s),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            top_k=self.top_k, min_p=self.min_p, repeat_penalty=self.repeat_penalty,
            json_schema=json_schema)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionBody(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    logprobs: bool | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools or self.functions:
            raise ApiError(400, "tools and functions are not supported", param="tools")
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")

    def to_messages(self) -> tuple[Message, ...]:
        out = []
        for i, m in enumerate(self.messages):
            if isinstance(m.content, list):
                texts = []
                for part in m.content:
                    if part.type != "text" or part.text is None:
                        raise ApiError(400, f"messages[{i}]: only text content is supported, "
                                            f"not {part.type!r}", param="messages")
                    texts.append(part.text)
                content = "\n".join(texts)
            else:
                content = m.content or ""
            # OpenAI's newer name for the system role; chat templates know only `system`
            role = "system" if m.role == "developer" else m.role
            out.append(Message(role=role, content=content, name=m.name))
        return tuple(out)

    def to_sampling(self) -> Sampling:
        schema = None
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            schema = json.dumps({"type": "object"})
        elif fmt is not None and fmt.type == "json_schema":
            inner = (fmt.json_schema or {}).get("schema")
            if not isinstance(inner, dict):
                raise ApiError(400, "response_format.json_schema.schema must be a JSON schema",
                               param="response_format")
            schema = json.dumps(inner)
        return self.sampling(self.max_completion_tokens, schema)


class CompletionBody(_GenerationBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("echo", "suffix", "logprobs"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported", param=name)
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of > 1 is not supported", param="best_of")

    def text(self) -> str:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise ApiError(400, "prompt must be one string (several prompts and token "
                                    "arrays are not supported)", param="prompt")
            prompt = prompt[0]
        return prompt


class EmbeddingBody(_Body):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else self.input
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "input must be a string or a list of strings (token arrays "
                                "are not supported)", param="input")
        if any(not t for t in texts):
            raise ApiError(400, "input must not contain empty strings", param="input")
        return texts  # type: ignore[return-value]


def caller(headers: Any) -> Caller:
    """Who asks, from the HTTP headers (a Starlette Headers or a mapping). The key is the bearer
    token, or the whole Authorization of another scheme: two credentials are never one tenant."""
    lowered = {k.lower(): v for k, v in headers.items()}
    auth = lowered.get("authorization", "").strip()
    scheme, _, token = auth.partition(" ")
    api_key = token.strip() if scheme.lower() == "bearer" else auth
    return Caller(api_key=api_key or None, headers=lowered)


# --- responses --------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def chat_completion(id: str, created: int, c: Completion) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion", "created": created, "model": c.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                         "logprobs": None, "finish_reason": c.finish_reason}],
            "usage": usage(c)}


def text_completion(id: str, created: int, c: Completion) -> dict[str, Any]:
    return {"id": id, "object": "text_completion", "created": created, "model": c.model,
            "choices": [{"index": 0, "text": c.text, "logprobs": None,
                         "finish_reason": c.finish_reason}],
            "usage": usage(c)}


class ChunkMaker:
    """The chunks of one streamed answer: chat deltas or text pieces, OpenAI's shapes."""

    def __init__(self, chat: bool, model: str, include_usage: bool) -> None:
        self.chat = chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()
        self.model = model
        self.include_usage = include_usage

    def _chunk(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created, "model": self.model,
            "choices": [] if choice is None else [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def first(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant's role, as OpenAI's do."""
        if not self.chat:
            return None
        return self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None})

    def piece(self, text: str) -> dict[str, Any]:
        if self.chat:
            return self._chunk({"index": 0, "delta": {"content": text}, "logprobs": None,
                                "finish_reason": None})
        return self._chunk({"index": 0, "text": text, "logprobs": None, "finish_reason": None})

    def last(self, c: Completion) -> list[dict[str, Any]]:
        if self.chat:
            end = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}
        else:
            end = {"index": 0, "text": "", "logprobs": None, "finish_reason": c.finish_reason}
        chunks = [self._chunk(end)]
        if self.include_usage:
            tail = self._chunk(None)
            tail["usage"] = usage(c)
            chunks.append(tail)
        return chunks


def embeddings(result: Embeddings, encoding_format: str) -> dict[str, Any]:
    data = []
    for i, row in enumerate(result.vectors):
        if encoding_format == "base64":
            value: Any = base64.b64encode(np.asarray(row, "<f4").tobytes()).decode("ascii")
        else:
            value = [float(v) for v in row]
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": result.model,
            "usage": {"prompt_tokens": result.prompt_tokens,
                      "total_tokens": result.prompt_tokens}}


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "wasinn"}
