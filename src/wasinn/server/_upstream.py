"""An upstream OpenAI-compatible API as a Completer: `wasinn serve --upstream URL`.

The routes validate a request as they always do and hand the upstream what they understood:
the model name as asked, the messages or the prompt, and the sampling settings that differ from
OpenAI's defaults (a default is left out, so the upstream applies its own). The answer comes back
as the same Completion or TextStream a local model gives, so the semantic cache stands in front
of it unchanged. The client's Authorization header goes upstream as it came (the cache's tenant
derives from it); a client without one gets the server's own key, if it has one.

What goes wrong upstream reaches the client as an OpenAI error: the upstream's 4xx as they are
(status, message, type, code), its 5xx as a 502, no answer in time as a 504, a refused
connection, a broken one or a stream that ends before its end as a 502 (inside a stream that
had begun: an error event, then the end). None of them is a whole answer, so none is cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httpx2

from ._api import ApiError, Caller, Completer, Completion, GenerationRequest, Sampling, TextStream

log = logging.getLogger("wasinn.server")

DEFAULT_TIMEOUT = 60.0
#: how long the upstream's model list is kept, per credential
MODELS_TTL = 60.0
#: the server's own key for the upstream, for clients that send no Authorization
API_KEY_ENV = "WASINN_UPSTREAM_API_KEY"
#: settings sent only when they differ from OpenAI's defaults (`Sampling()`)
_SETTINGS = ("max_tokens", "temperature", "top_p", "seed", "presence_penalty",
             "frequency_penalty", "top_k", "min_p", "repeat_penalty")
_JSON_OBJECT = {"type": "object"}  # what `response_format: json_object` becomes in Sampling
_MAX_MESSAGE = 500  # characters of an upstream's error that is not OpenAI's shape


@dataclass(frozen=True)
class UpstreamConfig:
    """Where `create_app(upstream=...)` and `wasinn serve --upstream` send requests."""

    #: the API's base URL, as the openai client's `base_url` (for OpenAI: https://api.openai.com/v1)
    url: str
    #: seconds to wait to connect, and for each piece of an answer (a whole answer when the
    #: client does not stream); past it the client gets a 504
    timeout: float = DEFAULT_TIMEOUT
    #: sent as `Authorization: Bearer KEY` when the client sends no Authorization
    api_key: str | None = None
    models_ttl: float = MODELS_TTL

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{self.url!r} is not an http(s) URL (the API's base URL, e.g. "
                             f"https://api.openai.com/v1)")
        if not self.timeout > 0:
            raise ValueError(f"upstream timeout must be positive, got {self.timeout}")
        object.__setattr__(self, "url", self.url.rstrip("/"))


class UpstreamCompleter:
    """Chat and text completions from an upstream OpenAI-compatible API (a Completer). It takes
    any model name: the upstream says whether it has it (its 404 comes back as it is)."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self._client = httpx2.AsyncClient(timeout=httpx2.Timeout(config.timeout))
        self._listed: dict[str, tuple[float, list[str]]] = {}

    def models(self) -> list[str]:
        """None known without asking: which models the upstream has depends on the caller's
        key (`list_models`)."""
        return []

    async def list_models(self, caller: Caller) -> list[str]:
        """The models the upstream lists for this caller's credential (kept `models_ttl`)."""
        headers = self._headers(caller)
        key = hashlib.sha256(headers.get("Authorization", "").encode("utf-8")).hexdigest()
        now = time.monotonic()
        self._listed = {k: v for k, v in self._listed.items()
                        if now - v[0] < self.config.models_ttl}
        if key in self._listed:
            return list(self._listed[key][1])
        data = await self._call("GET", "/models", headers)
        rows = data.get("data")
        if not isinstance(rows, list):
            raise _bad_answer("its model list has no `data` list")
        names = [row["id"] for row in rows
                 if isinstance(row, dict) and isinstance(row.get("id"), str)]
        self._listed[key] = (now, names)
        return list(names)

    async def complete(self, request: GenerationRequest) -> Completion:
        chat = request.messages is not None
        data = await self._call("POST", _path(request), self._headers(request.caller),
                                _payload(request, stream=False))
        return _completion(data, chat, request.model)

    async def stream(self, request: GenerationRequest) -> TextStream:
        """Returns once the first piece (or the end, or an error) is there, so that an error
        before any text is an HTTP error, not a broken stream."""
        events = self._events(request)
        try:
            first = await events.__anext__()
        except BaseException:
            await events.aclose()
            raise
        return TextStream(_Peeked(first, events))

    async def aclose(self) -> None:
        await self._client.aclose()

    # --- HTTP ---------------------------------------------------------------------------------

    def _headers(self, caller: Caller) -> dict[str, str]:
        auth = caller.headers.get("authorization")
        if auth:
            return {"Authorization": auth}  # as the client sent it
        if self.config.api_key:
            return {"Authorization": f"Bearer {self.config.api_key}"}
        return {}

    async def _call(self, method: str, path: str, headers: dict[str, str],
                    payload: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = await self._client.request(method, self.config.url + path, json=payload,
                                                  headers=headers)
        except httpx2.HTTPError as e:
            raise self._failed(e) from None
        if not 200 <= response.status_code < 300:
            raise self._refused(response)
        try:
            data = response.json()
        except ValueError:
            raise _bad_answer("its answer is not JSON") from None
        if not isinstance(data, dict):
            raise _bad_answer("its answer is not a JSON object")
        return data

    async def _events(self, request: GenerationRequest) -> AsyncIterator[str | Completion]:
        """The upstream's SSE stream as text pieces, then the Completion: only once the stream
        has ended in full (`data: [DONE]` after a finish_reason)."""
        answer = _StreamedAnswer(request.messages is not None, request.model)
        try:
            async with self._client.stream("POST", self.config.url + _path(request),
                                           json=_payload(request, stream=True),
                                           headers=self._headers(request.caller)) as response:
                if not 200 <= response.status_code < 300:
                    await response.aread()
                    raise self._refused(response)
                async for data in _sse_data(response.aiter_lines()):
                    if data == "[DONE]":
                        yield answer.completion()
                        return
                    piece = answer.feed(data)
                    if piece:
                        yield piece
        except httpx2.HTTPError as e:
            raise self._failed(e) from None
        raise ApiError(502, "the upstream API ended the stream before its end (no [DONE])",
                       type="server_error", code="upstream_error")

    def _failed(self, e: httpx2.HTTPError) -> ApiError:
        """A request that got no (whole) answer."""
        log.warning("upstream %s: %s: %s", self.config.url, type(e).__name__, e)
        if isinstance(e, httpx2.TimeoutException):
            return ApiError(504, f"the upstream API did not answer within "
                                 f"{self.config.timeout:g} s", type="server_error",
                            code="upstream_timeout")
        if isinstance(e, httpx2.ConnectError):
            return ApiError(502, f"could not connect to the upstream API: {e}",
                            type="server_error", code="upstream_unreachable")
        return ApiError(502, f"the upstream API broke off its answer: {type(e).__name__}: {e}",
                        type="server_error", code="upstream_error")

    def _refused(self, response: httpx2.Response) -> ApiError:
        """An upstream's error status: a 4xx as it is, anything else as a 502."""
        status = response.status_code
        error: dict[str, Any] = {}
        try:
            body = response.json()
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                error = body["error"]
        except ValueError:
            pass
        message = error.get("message")
        if not isinstance(message, str) or not message:
            message = response.text.strip()[:_MAX_MESSAGE] or response.reason_phrase
        if 400 <= status < 500:
            return ApiError(status, message, type=_text(error.get("type"))
                            or "invalid_request_error", code=_text(error.get("code")),
                            param=_text(error.get("param")))
        log.warning("upstream %s answered %d: %s", self.config.url, status, message)
        return ApiError(502, f"the upstream API failed ({status}): {message}",
                        type="server_error", code="upstream_error")


class LocalOrUpstream:
    """A Completer: requests for the local completer's models go to it, any other name to the
    upstream."""

    def __init__(self, local: Completer, upstream: UpstreamCompleter) -> None:
        self.local = local
        self.upstream = upstream

    def models(self) -> Sequence[str]:
        return self.local.models()

    def _for(self, model: str) -> Completer:
        return self.local if model in self.local.models() else self.upstream

    async def complete(self, request: GenerationRequest) -> Completion:
        return await self._for(request.model).complete(request)

    async def stream(self, request: GenerationRequest) -> TextStream:
        return await self._for(request.model).stream(request)


# --- requests ---------------------------------------------------------------------------------


def _path(request: GenerationRequest) -> str:
    return "/chat/completions" if request.messages is not None else "/completions"


def _payload(request: GenerationRequest, *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": request.model}
    if request.messages is not None:
        body["messages"] = [m.as_template_dict() for m in request.messages]
    else:
        body["prompt"] = request.prompt
    sampling, defaults = request.sampling, Sampling()
    for name in _SETTINGS:
        value = getattr(sampling, name)
        if value != getattr(defaults, name):
            body[name] = value
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if sampling.json_schema is not None:
        schema = json.loads(sampling.json_schema)
        body["response_format"] = (
            {"type": "json_object"} if schema == _JSON_OBJECT else
            # the client's schema name is not kept in Sampling (it does not change the answer)
            {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}})
    if stream:
        # the last chunk then carries the token counts the Completion needs
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


# --- answers ----------------------------------------------------------------------------------


def _bad_answer(what: str) -> ApiError:
    return ApiError(502, f"the upstream API's answer was not understood: {what}",
                    type="server_error", code="upstream_error")


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _tokens(usage: Any) -> tuple[int, int]:
    """(prompt, completion) tokens; 0 where the upstream did not count them."""
    if not isinstance(usage, dict):
        return 0, 0
    counts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
    return cast(tuple[int, int], tuple(c if isinstance(c, int) else 0 for c in counts))


def _completion(data: dict[str, Any], chat: bool, model: str) -> Completion:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _bad_answer("no choices")
    choice = choices[0]
    if chat:
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else None
    else:
        text = choice.get("text")
    finish = choice.get("finish_reason")
    if not isinstance(text, str) or not isinstance(finish, str):
        raise _bad_answer("no text or no finish_reason")
    prompt_tokens, completion_tokens = _tokens(data.get("usage"))
    # another finish_reason (`content_filter`) goes to the client as it is; the cache keeps
    # only `stop` and `length`
    return Completion(model=_text(data.get("model")) or model, text=text,
                      finish_reason=finish,  # type: ignore[arg-type]
                      prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


class _StreamedAnswer:
    """What an upstream's stream has said so far: its text, its finish_reason and usage."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.parts: list[str] = []
        self.finish: str | None = None
        self.usage: Any = None

    def feed(self, data: str) -> str:
        """One event's data: the text it adds ("" for none); raises the upstream's error."""
        try:
            event = json.loads(data)
        except ValueError:
            raise _bad_answer(f"a stream event is not JSON: {data[:80]!r}") from None
        if not isinstance(event, dict):
            raise _bad_answer("a stream event is not a JSON object")
        error = event.get("error")
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise ApiError(502, f"the upstream API failed in the stream: {message}",
                           type="server_error", code="upstream_error")
        if event.get("usage"):
            self.usage = event["usage"]
        self.model = _text(event.get("model")) or self.model
        text = ""
        for choice in event.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if self.chat:
                delta = choice.get("delta")
                piece = delta.get("content") if isinstance(delta, dict) else None
            else:
                piece = choice.get("text")
            if isinstance(piece, str):
                text += piece
            if isinstance(choice.get("finish_reason"), str):
                self.finish = choice["finish_reason"]
        if text:
            self.parts.append(text)
        return text

    def completion(self) -> Completion:
        if self.finish is None:
            raise _bad_answer("the stream ended without a finish_reason")
        prompt_tokens, completion_tokens = _tokens(self.usage)
        return Completion(model=self.model, text="".join(self.parts),
                          finish_reason=self.finish,  # type: ignore[arg-type]
                          prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each server-sent event (its `data:` lines joined); comments and other
    fields are skipped, and an event the stream cut before its blank line is dropped."""
    data: list[str] | None = None
    async for line in lines:
        if not line:
            if data is not None:
                yield "\n".join(data)
            data = None
        elif line.startswith("data:"):
            value = line[5:]
            if data is None:
                data = []
            data.append(value[1:] if value.startswith(" ") else value)


class _Peeked:
    """An async iterator whose first item was taken already; closing it closes the rest."""

    def __init__(self, first: str | Completion,
                 rest: AsyncIterator[str | Completion]) -> None:
        self._first: str | Completion | None = first
        self._rest = rest

    def __aiter__(self) -> _Peeked:
        return self

    async def __anext__(self) -> str | Completion:
        if self._first is not None:
            item, self._first = self._first, None
            return item
        return await self._rest.__anext__()

    async def aclose(self) -> None:
        await self._rest.aclose()  # type: ignore[attr-defined]
