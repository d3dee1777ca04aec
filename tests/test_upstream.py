"""`wasinn serve --upstream URL`: the semantic cache in front of an upstream OpenAI-compatible API.

Everything runs over real HTTP on loopback. The upstream of the happy path is a real wasinn
server (the tiny GGUF, named `tiny`, no cache of its own) behind a recorder, a real ASGI app that
notes each request it passes on (its path and Authorization header). The front is wasinn with
`upstream=` pointing at it and a semantic cache; its one local model is the same GGUF named
`embedder`, which embeds the cache's questions. The faults come from a small real Starlette app
that misbehaves as a test tells it to (too slow, a 500, a stream that stops or a connection that
drops half-way), and from a closed port.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
import httpx2 as httpx  # noqa: E402  (the HTTP client `openai` itself uses)
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from loopback import LoopbackServer  # noqa: E402
from test_cache import QUESTION, Server, chat, start, status, stop, text_of  # noqa: E402
from wasinn import Host  # noqa: E402
from wasinn.cache import CacheConfig  # noqa: E402
from wasinn.cli import (build_parser, merge_serve_config,  # noqa: E402
                        upstream_config)
from wasinn.server import UpstreamConfig, create_app  # noqa: E402

FAULT_TIMEOUT = 0.5  # the front's upstream timeout where the upstream misbehaves


class Recorder:
    """A real ASGI app in front of another: notes each request's method, path and Authorization
    (None without one), then passes it on untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[tuple[str, str, str | None]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                       for k, v in scope["headers"]}
            self.seen.append((scope["method"], scope["path"], headers.get("authorization")))
        await self.app(scope, receive, send)

    def generations(self) -> int:
        return sum(1 for method, _, _ in self.seen if method == "POST")


@dataclass
class Upstream:
    server: LoopbackServer
    recorder: Recorder

    @property
    def url(self) -> str:
        return f"{self.server.url}/v1"

    def client(self, api_key: str = "test") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0)


@pytest.fixture(scope="module")
def upstream(tiny: Path) -> Iterator[Upstream]:
    host = Host(models=[f"tiny:GGML:AUTO:{tiny}"], module_cache=False)
    host.registry.preload_all()
    recorder = Recorder(create_app(host, embedding_model="tiny"))
    try:
        with LoopbackServer(recorder) as server:
            yield Upstream(server, recorder)
    finally:
        host.close()


@pytest.fixture(scope="module")
def front_host(tiny: Path) -> Iterator[Host]:
    host = Host(models=[f"embedder:GGML:AUTO:{tiny}"], module_cache=False)
    host.registry.preload_all()
    yield host
    host.close()


@contextmanager
def front(host: Host, url: str, path: Path, *, timeout: float = 30.0,
          api_key: str | None = None) -> Iterator[Server]:
    """wasinn with the semantic cache in front of the upstream at `url`."""
    app = create_app(host, embedding_model="embedder", cache=CacheConfig(path=path),
                     upstream=UpstreamConfig(url, timeout=timeout, api_key=api_key))
    with Server(app) as server:
        yield server


def streamed(client: openai.OpenAI, question: str = QUESTION,
             **settings: Any) -> tuple[str | None, str, list]:
    """(x-semantic-cache, the text, the chunks) of one streamed chat."""
    settings = {"max_tokens": 12, "temperature": 0, **settings}
    with client.chat.completions.with_streaming_response.create(
            model="tiny", messages=[{"role": "user", "content": question}], stream=True,
            stream_options={"include_usage": True}, **settings) as response:
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return response.headers.get("x-semantic-cache"), text, chunks


# --- the happy path --------------------------------------------------------------------------


def test_answers_are_the_upstreams_own_and_a_hit_does_not_call_it(
        upstream: Upstream, front_host: Host, tmp_path: Path) -> None:
    direct = upstream.client()
    with front(front_host, upstream.url, tmp_path / "c.sqlite") as server:
        client = server.client()
        # whole
        expected = direct.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=8,
            temperature=0)
        calls = upstream.recorder.generations()
        miss, answer, _ = chat(client)
        assert miss == "MISS" and upstream.recorder.generations() == calls + 1
        assert text_of(answer) == text_of(expected) != ""
        assert answer.usage == expected.usage and answer.usage.completion_tokens == 8
        assert answer.model == "tiny" and answer.choices[0].finish_reason == "length"
        hit, cached, headers = chat(client)
        assert hit == "HIT" and headers["x-semantic-cache-similarity"] == "1.0000"
        assert text_of(cached) == text_of(expected) and cached.usage == expected.usage
        assert upstream.recorder.generations() == calls + 1  # the upstream was not asked

        # streamed
        question = "Tell me a story"
        _, reference, reference_chunks = streamed(direct, question)
        calls = upstream.recorder.generations()
        miss, text, chunks = streamed(client, question)
        assert miss == "MISS" and text == reference != ""
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
        assert chunks[-1].usage == reference_chunks[-1].usage and chunks[-1].usage.total_tokens
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        hit, replayed, _ = streamed(client, question)
        assert hit == "HIT" and replayed == reference
        assert upstream.recorder.generations() == calls + 1

        # /v1/completions
        expected_text = direct.completions.create(model="tiny", prompt=QUESTION, max_tokens=6,
                                                  temperature=0)
        raw = client.completions.with_raw_response.create(model="tiny", prompt=QUESTION,
                                                          max_tokens=6, temperature=0)
        assert raw.headers["x-semantic-cache"] == "MISS"
        assert raw.parse().choices[0].text == expected_text.choices[0].text != ""
        assert raw.parse().usage == expected_text.usage
        pieces = list(client.completions.create(model="tiny", prompt="Once upon a time",
                                                max_tokens=6, temperature=0, stream=True))
        alone = direct.completions.create(model="tiny", prompt="Once upon a time",
                                          max_tokens=6, temperature=0)
        assert "".join(p.choices[0].text for p in pieces if p.choices) == alone.choices[0].text


def test_sampling_settings_reach_the_upstream(upstream: Upstream, front_host: Host,
                                              tmp_path: Path) -> None:
    direct = upstream.client()
    settings: list[dict[str, Any]] = [
        {"temperature": 0.9, "seed": 7, "top_p": 0.9, "max_tokens": 10},
        {"temperature": 0.9, "seed": 8, "max_tokens": 10, "presence_penalty": 1.0,
         "extra_body": {"top_k": 5, "min_p": 0.05, "repeat_penalty": 1.2}},
        {"temperature": 0, "max_tokens": 30, "frequency_penalty": 0.5},
    ]
    with front(front_host, upstream.url, tmp_path / "c.sqlite") as server:
        client = server.client()
        texts = []
        for s in settings:
            expected = direct.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": QUESTION}], **s)
            miss, answer, _ = chat(client, **s)
            assert miss == "MISS" and text_of(answer) == text_of(expected), s
            assert answer.usage == expected.usage
            texts.append(text_of(answer))
        assert len(set(texts)) == len(texts)  # the settings did change the answers
        # a stop string cuts the upstream's answer before it, and the front's answer with it
        greedy = texts[2]
        stop = greedy[len(greedy) // 2:len(greedy) // 2 + 3]
        expected = direct.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=30,
            temperature=0, frequency_penalty=0.5, stop=[stop])
        _, answer, _ = chat(client, max_tokens=30, frequency_penalty=0.5, stop=[stop])
        assert text_of(answer) == text_of(expected) == greedy[:greedy.index(stop)]
        assert answer.choices[0].finish_reason == "stop"
        # a JSON schema goes too: the upstream's grammar holds the answer to it
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                  "additionalProperties": False}
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        _, answer, _ = chat(client, max_tokens=40, response_format=fmt)
        assert isinstance(json.loads(text_of(answer))["n"], int)


def test_the_authorization_header_reaches_the_upstream_unchanged(
        upstream: Upstream, front_host: Host, tmp_path: Path) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 4, "temperature": 0}

    def post(url: str, authorization: str | None) -> httpx.Response:
        headers = {"Authorization": authorization} if authorization is not None else {}
        return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers)

    def last_authorization() -> str | None:
        return [auth for method, _, auth in upstream.recorder.seen if method == "POST"][-1]

    with front(front_host, upstream.url, tmp_path / "c.sqlite") as server:
        alice, bob = server.client("alice-key"), server.client("bob-key")
        assert status(alice) == "MISS" and last_authorization() == "Bearer alice-key"
        assert status(bob) == "MISS" and last_authorization() == "Bearer bob-key"
        # the tenant still comes from the key: an entry never serves another key
        assert status(alice) == "HIT" and status(bob) == "HIT"
        # another scheme goes as it is, and two such credentials are two tenants
        for credential in ("Basic YWxpY2U6MQ==", "Basic Ym9iOjI="):
            response = post(server.url, credential)
            assert response.status_code == 200
            assert response.headers["x-semantic-cache"] == "MISS"
            assert last_authorization() == credential
        assert post(server.url, "Basic Ym9iOjI=").headers["x-semantic-cache"] == "HIT"
        # a client without one sends none
        calls = upstream.recorder.generations()
        assert post(server.url, None).headers["x-semantic-cache"] == "MISS"
        assert upstream.recorder.generations() == calls + 1 and last_authorization() is None

    # with a key of the server's own: it goes for clients without one, never over theirs
    with front(front_host, upstream.url, tmp_path / "d.sqlite",
               api_key="server-key") as server:
        assert post(server.url, None).status_code == 200
        assert last_authorization() == "Bearer server-key"
        assert status(server.client("carol-key")) == "MISS"
        assert last_authorization() == "Bearer carol-key"


def test_models_and_an_unknown_model(upstream: Upstream, front_host: Host,
                                     tmp_path: Path) -> None:
    with front(front_host, upstream.url, tmp_path / "c.sqlite") as server:
        client = server.client()
        listings = sum(1 for _, path, _ in upstream.recorder.seen if path == "/v1/models")
        # the upstream's models and the local one
        assert sorted(m.id for m in client.models.list()) == ["embedder", "tiny"]
        assert client.models.retrieve("tiny").id == "tiny"
        assert sorted(m.id for m in client.models.list()) == ["embedder", "tiny"]
        # the upstream's list is kept a while: it was asked once
        assert sum(1 for _, path, _ in upstream.recorder.seen if path == "/v1/models") == \
            listings + 1
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("gpt-nothing")

        # a model neither has: the upstream's own 404 comes back
        calls = upstream.recorder.generations()
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="gpt-nothing", messages=[
                {"role": "user", "content": QUESTION}], max_tokens=4)
        assert upstream.recorder.generations() == calls + 1
        assert missing.value.code == "model_not_found" and missing.value.param == "model"
        assert "'gpt-nothing' does not exist" in missing.value.message
        with pytest.raises(openai.NotFoundError):
            list(client.chat.completions.create(model="gpt-nothing", messages=[
                {"role": "user", "content": QUESTION}], max_tokens=4, stream=True))

        # a 4xx of the upstream passes with its status, message and code, and is not cached
        for _ in range(2):
            with pytest.raises(openai.BadRequestError) as too_long:
                chat(client, "word " * 600)
            assert too_long.value.code == "context_length_exceeded"
            assert "context is too small" in too_long.value.message
        assert server.metrics()["wasinn_cache_entries"] == 0

        # the local model is still served by the front itself, and embeds
        local = client.embeddings.create(model="embedder", input=["hello"])
        assert len(local.data[0].embedding) == 64


# --- faults ----------------------------------------------------------------------------------


@dataclass
class Faults:
    """A real upstream that misbehaves as told. `mode`: ok, slow (answers nothing), error (a 500
    with an OpenAI error body), stop (a stream that ends after two pieces, no finish and no
    [DONE]), stall (two pieces, then nothing), drop (the connection breaks half-way)."""

    mode: str = "ok"
    calls: int = 0
    left: int = 0  # requests whose client went away while they were held
    url: str = ""

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> Response:
        self.calls += 1
        body = await request.json()
        stream = bool(body.get("stream"))
        if self.mode == "slow":
            await self._until_gone(request)
            return Response(status_code=204)
        if self.mode == "error":
            return JSONResponse({"error": {"message": "the model fell over",
                                           "type": "server_error", "code": None}}, 500)
        if not stream:
            if self.mode == "drop":
                return StreamingResponse(self._broken([b'{"choices": [{"mess']),
                                         media_type="application/json")
            return JSONResponse({
                "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant",
                                                     "content": "Paris, of course."},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}})
        return StreamingResponse(self._events(request, body["model"]),
                                 media_type="text/event-stream")

    async def _until_gone(self, request: Request) -> None:
        try:
            for _ in range(500):  # at most 10 s: the front leaves after its timeout
                if await request.is_disconnected():
                    break
                await asyncio.sleep(0.02)
            else:
                return
        except asyncio.CancelledError:  # a StreamingResponse saw the front leave first
            self.left += 1
            raise
        self.left += 1

    async def _events(self, request: Request, model: str) -> AsyncIterator[bytes]:
        def event(data: Any) -> bytes:
            return f"data: {json.dumps(data)}\n\n".encode()

        def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
            return event({"id": "x", "object": "chat.completion.chunk", "created": 0,
                          "model": model, "choices": [{"index": 0, "delta": delta,
                                                       "finish_reason": finish}]})

        yield chunk({"role": "assistant", "content": ""})
        yield chunk({"content": "Paris,"})
        yield chunk({"content": " of"})
        if self.mode == "stop":
            return
        if self.mode == "stall":
            await self._until_gone(request)
            return
        if self.mode == "drop":
            raise ConnectionAbortedError("the upstream's connection breaks")
        yield chunk({"content": " course."})
        yield chunk({}, "stop")
        yield event({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": model,
                     "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4,
                                              "total_tokens": 11}})
        yield b"data: [DONE]\n\n"

    @staticmethod
    async def _broken(parts: list[bytes]) -> AsyncIterator[bytes]:
        for part in parts:
            yield part
        raise ConnectionAbortedError("the upstream's connection breaks")


@pytest.fixture(scope="module")
def faults() -> Iterator[Faults]:
    upstream = Faults()
    with LoopbackServer(upstream.app()) as server:
        upstream.url = f"{server.url}/v1"
        yield upstream


def ask(client: openai.OpenAI, stream: bool) -> str | None:
    """One chat, whole or streamed: its x-semantic-cache; the text must be the good one."""
    if not stream:
        hit, answer, _ = chat(client)
        assert text_of(answer) == "Paris, of course."
        return hit
    hit, text, chunks = streamed(client)
    assert text == "Paris, of course." and chunks[-1].usage.total_tokens == 11
    return hit


WHOLE_FAULTS = [("slow", 504, "upstream_timeout", f"did not answer within {FAULT_TIMEOUT:g} s"),
                ("error", 502, "upstream_error", "failed (500): the model fell over"),
                ("drop", 502, "upstream_error", "broke off its answer")]
# before the first piece, a streamed request fails as a whole one does
STREAM_START_FAULTS = [("slow", 504, "upstream_timeout", "did not answer within"),
                       ("error", 502, "upstream_error", "the model fell over")]
# after it, the stream has begun (200): an error event, then the end
STREAM_FAULTS = [("stop", "upstream_error", "ended the stream before its end"),
                 ("stall", "upstream_timeout", f"did not answer within {FAULT_TIMEOUT:g} s"),
                 ("drop", "upstream_error", "broke off its answer")]


def assert_nothing_cached_and_asked_again(server: Server, faults: Faults, stream: bool) -> None:
    metrics = server.metrics()
    assert metrics["wasinn_cache_entries"] == 0 and metrics["wasinn_cache_stores_total"] == 0
    faults.mode = "ok"
    calls = faults.calls
    client = server.client()
    assert ask(client, stream) == "MISS" and faults.calls == calls + 1
    assert ask(client, stream) == "HIT" and faults.calls == calls + 1


@pytest.mark.parametrize("mode,code,error,message", WHOLE_FAULTS)
def test_a_failed_upstream_answer_is_a_clear_error_and_not_cached(
        faults: Faults, front_host: Host, tmp_path: Path, mode: str, code: int, error: str,
        message: str) -> None:
    with front(front_host, faults.url, tmp_path / "c.sqlite", timeout=FAULT_TIMEOUT) as server:
        faults.mode = mode
        with pytest.raises(openai.InternalServerError) as failed:
            chat(server.client())
        assert failed.value.status_code == code and failed.value.code == error
        assert failed.value.type == "server_error" and message in failed.value.message
        assert_nothing_cached_and_asked_again(server, faults, stream=False)


@pytest.mark.parametrize("mode,code,error,message", STREAM_START_FAULTS)
def test_a_stream_that_fails_before_its_first_piece_is_an_http_error(
        faults: Faults, front_host: Host, tmp_path: Path, mode: str, code: int, error: str,
        message: str) -> None:
    with front(front_host, faults.url, tmp_path / "c.sqlite", timeout=FAULT_TIMEOUT) as server:
        faults.mode = mode
        with pytest.raises(openai.InternalServerError) as failed:
            streamed(server.client())
        assert failed.value.status_code == code and failed.value.code == error
        assert message in failed.value.message
        assert_nothing_cached_and_asked_again(server, faults, stream=True)


@pytest.mark.parametrize("mode,error,message", STREAM_FAULTS)
def test_a_stream_the_upstream_breaks_ends_with_an_error_event_and_is_not_cached(
        faults: Faults, front_host: Host, tmp_path: Path, mode: str, error: str,
        message: str) -> None:
    with front(front_host, faults.url, tmp_path / "c.sqlite", timeout=FAULT_TIMEOUT) as server:
        faults.mode = mode
        pieces = []
        with server.client().chat.completions.with_streaming_response.create(
                model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=12,
                temperature=0, stream=True) as response:
            assert response.status_code == 200
            assert response.headers["x-semantic-cache"] == "MISS"
            with pytest.raises(openai.APIError) as failed:
                for chunk in response.parse():
                    pieces.append(chunk.choices[0].delta.content or "")
        assert "".join(pieces) == "Paris, of"  # what came before the fault
        assert failed.value.code == error and message in failed.value.message
        route = 'wasinn_requests_total{route="/v1/chat/completions",model="tiny",status="%d"}'
        assert server.metrics()[route % (504 if mode == "stall" else 502)] == 1
        assert_nothing_cached_and_asked_again(server, faults, stream=True)


def test_a_client_that_leaves_a_stream_closes_the_upstreams(faults: Faults, front_host: Host,
                                                            tmp_path: Path) -> None:
    with front(front_host, faults.url, tmp_path / "c.sqlite") as server:  # a long timeout
        faults.mode = "stall"
        left = faults.left
        stream = server.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=12,
            stream=True)
        chunks = iter(stream)
        assert next(chunks).choices[0].delta.role == "assistant"
        assert next(chunks).choices[0].delta.content == "Paris,"
        stream.close()  # while the upstream holds its stream open
        deadline = time.monotonic() + 10
        while faults.left == left:
            assert time.monotonic() < deadline, "the upstream's stream is still open"
            time.sleep(0.01)
        assert server.metrics()["wasinn_cache_entries"] == 0
        assert_nothing_cached_and_asked_again(server, faults, stream=True)


def test_an_upstream_that_refuses_connections(front_host: Host, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with front(front_host, f"http://127.0.0.1:{port}/v1", tmp_path / "c.sqlite",
               timeout=FAULT_TIMEOUT) as server:
        client = server.client()
        for call in (lambda: chat(client), lambda: streamed(client),
                     lambda: client.models.list()):
            with pytest.raises(openai.InternalServerError) as failed:
                call()
            assert failed.value.status_code == 502
            assert failed.value.code == "upstream_unreachable"
            assert "could not connect to the upstream API" in failed.value.message
        metrics = server.metrics()
        assert metrics["wasinn_cache_entries"] == 0 and metrics["wasinn_cache_stores_total"] == 0
        assert metrics["wasinn_cache_misses_total"] == 2  # looked up, never stored


# --- the command line ------------------------------------------------------------------------


def test_cli_serve_upstream_flags_and_config_keys(upstream: Upstream, tiny: Path,
                                                  tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(f'nn-preload = ["embedder:GGML:AUTO:{tiny}"]\n'
                      f'upstream = "{upstream.url}"\nupstream-timeout = 20\n'
                      f'cache = "answers.sqlite"\n')
    process, url = start(["--config", str(config)], {"WASINN_UPSTREAM_API_KEY": "env-key"})
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="cli-key", max_retries=0)
        expected = upstream.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=8,
            temperature=0)
        miss, answer, _ = chat(client)
        assert miss == "MISS" and text_of(answer) == text_of(expected)
        assert upstream.recorder.seen[-1][2] == "Bearer cli-key"
        assert status(client) == "HIT"
        keyless = httpx.post(f"{url}/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert keyless.status_code == 200
        assert upstream.recorder.seen[-1][2] == "Bearer env-key"
    finally:
        stop(process)
    assert (tmp_path / "answers.sqlite").is_file()

    def refused(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "wasinn", "serve", "--port", "0", *args],
                                capture_output=True, text=True, timeout=60,
                                env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")})
        assert result.returncode == 2, result.stderr
        return result.stderr

    assert "not an http(s) URL" in refused("--upstream", "localhost:8000", "--no-cache")
    assert "--upstream-timeout must be positive" in \
        refused("--upstream", upstream.url, "--upstream-timeout", "0", "--no-cache")
    assert "--chat-model and --upstream" in \
        refused("--upstream", upstream.url, "--chat-model", "x", "--no-cache")
    assert "--upstream-key needs --upstream" in \
        refused("--nn-preload", f"embedder:GGML:AUTO:{tiny}", "--upstream-key", "k")


def test_cli_upstream_key_comes_from_the_flag_the_config_or_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def key(*args: str) -> str | None:
        parsed = build_parser().parse_args(["serve", "--upstream", "http://127.0.0.1:9/v1",
                                            "--no-cache", *args])
        return upstream_config(merge_serve_config(parsed)).api_key

    config = tmp_path / "serve.toml"
    config.write_text('upstream-key = "from-config"\n')
    monkeypatch.delenv("WASINN_UPSTREAM_API_KEY", raising=False)
    assert key() is None
    monkeypatch.setenv("WASINN_UPSTREAM_API_KEY", "from-env")
    assert key() == "from-env"
    assert key("--config", str(config)) == "from-config"
    assert key("--config", str(config), "--upstream-key", "from-flag") == "from-flag"
    parsed = build_parser().parse_args(["serve", "--upstream", "http://127.0.0.1:9/v1/",
                                        "--upstream-timeout", "2.5"])
    config = upstream_config(merge_serve_config(parsed))
    assert config.url == "http://127.0.0.1:9/v1" and config.timeout == 2.5
