"""The semantic cache in front of `wasinn serve`: the real server on loopback, the tiny GGUF as
both the chat model and the embedding model (ggml's embedding mode, 64-d), driven by the
official `openai` client; the cache's headers read through `with_raw_response`.

The tiny model's greedy answers never end early, so every answer is `max_tokens` long and the
same request always gets the same text: a hit must give exactly what a miss gave.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("numkong")
import httpx2 as httpx  # noqa: E402  (the HTTP client `openai` itself uses)

from loopback import LoopbackServer  # noqa: E402
from wasinn import Host  # noqa: E402
from wasinn.cache import (CacheConfig, Entry, SemanticCache, SQLiteStore, cache_mode,  # noqa: E402
                          open_store, pieces)
from wasinn.cli import default_cache_path  # noqa: E402
from wasinn.server import (ApiError, Caller, Completion, Embeddings, GenerationRequest,  # noqa: E402
                           Message, Metrics, Sampling, TextStream, create_app)

QUESTION = "What is the capital of France?"
REWORDED = "what's the capital city of France"


class Server(LoopbackServer):
    """The server, with its cache and clients at hand."""

    @property
    def cache(self) -> SemanticCache:
        return self.app.state.completer

    def client(self, api_key: str = "test") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics").text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}


@pytest.fixture(scope="module")
def host(tiny: Path) -> Iterator[Host]:
    host = Host(models=[f"tiny:GGML:AUTO:{tiny}"], module_cache=False)
    host.registry.preload_all()
    yield host
    host.close()


@contextmanager
def serving(host: Host, path: Path, **options: Any) -> Iterator[Server]:
    app = create_app(host, chat_model="tiny", embedding_model="tiny",
                     cache=CacheConfig(path=path, **options))
    with Server(app) as server:
        yield server


def chat(client: openai.OpenAI, question: str = QUESTION, *,
         messages: list[dict[str, str]] | None = None, headers: dict[str, str] | None = None,
         **settings: Any) -> tuple[str | None, Any, Any]:
    """(x-semantic-cache, the answer, all response headers) for one chat request."""
    settings = {"max_tokens": 8, "temperature": 0, **settings}
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=messages or [{"role": "user", "content": question}],
        extra_headers=headers, **settings)
    return raw.headers.get("x-semantic-cache"), raw.parse(), raw.headers


def status(client: openai.OpenAI, question: str = QUESTION, **kw: Any) -> str | None:
    return chat(client, question, **kw)[0]


def text_of(answer: Any) -> str:
    return answer.choices[0].message.content


# --- hits and misses -------------------------------------------------------------------------


def test_the_same_question_again_is_a_hit(host: Host, tmp_path: Path) -> None:
    with serving(host, tmp_path / "c.sqlite") as server:
        client = server.client()
        first, answer, headers = chat(client)
        assert first == "MISS" and "x-semantic-cache-similarity" not in headers
        again, cached, headers = chat(client)
        assert again == "HIT" and headers["x-semantic-cache-similarity"] == "1.0000"
        assert text_of(cached) == text_of(answer) != ""
        assert cached.usage == answer.usage and cached.choices[0].finish_reason == "length"
        assert cached.model == "tiny" and cached.id != answer.id

        # /v1/completions too, in a scope of its own (a prompt is not a chat)
        raw = client.completions.with_raw_response.create(model="tiny", prompt=QUESTION,
                                                          max_tokens=6, temperature=0)
        assert raw.headers["x-semantic-cache"] == "MISS"
        hit = client.completions.with_raw_response.create(model="tiny", prompt=QUESTION,
                                                          max_tokens=6, temperature=0)
        assert hit.headers["x-semantic-cache"] == "HIT"
        assert hit.parse().choices[0].text == raw.parse().choices[0].text
        assert hit.parse().usage == raw.parse().usage


def test_a_reworded_question_hits_only_above_the_threshold(host: Host, tmp_path: Path) -> None:
    with serving(host, tmp_path / "c.sqlite") as server:
        client = server.client()
        vectors = np.array([d.embedding for d in client.embeddings.create(
            model="tiny", input=[QUESTION, REWORDED]).data])
        similarity = float(vectors[0] @ vectors[1])
        assert 0.1 < similarity < 0.99

        server.cache.threshold = similarity - 0.02
        assert status(client, QUESTION) == "MISS"
        hit, answer, headers = chat(client, REWORDED)
        assert hit == "HIT"
        assert abs(float(headers["x-semantic-cache-similarity"]) - similarity) < 2e-3
        assert text_of(answer) == text_of(chat(client, QUESTION)[1])

        server.cache.threshold = (similarity + 1) / 2
        assert status(client, REWORDED + "?") == "MISS"


def test_an_entry_never_serves_another_tenant(host: Host, tmp_path: Path) -> None:
    with serving(host, tmp_path / "c.sqlite") as server:
        alice, bob = server.client("alice-secret-key"), server.client("bob-secret-key")
        assert status(alice) == "MISS"
        assert status(bob) == "MISS"
        assert status(alice) == "HIT" and status(bob) == "HIT"
        # a tenant header narrows a key's entries; it never reaches another key's
        team = {"x-wasinn-tenant": "team-1"}
        assert status(alice, headers=team) == "MISS"
        assert status(alice, headers={"x-wasinn-tenant": "team-2"}) == "MISS"
        assert status(alice, headers=team) == "HIT"
        assert status(bob, headers=team) == "MISS"
    # the raw keys are never written
    for file in tmp_path.iterdir():
        data = file.read_bytes()
        assert b"alice-secret-key" not in data and b"bob-secret-key" not in data


def test_other_sampling_settings_miss(host: Host, tmp_path: Path) -> None:
    with serving(host, tmp_path / "c.sqlite") as server:
        client = server.client()
        assert status(client) == "MISS"
        others: list[dict[str, Any]] = [{"temperature": 0.7, "seed": 3}, {"max_tokens": 9},
                                        {"stop": ["zz"]}, {"top_p": 0.5},
                                        {"extra_body": {"top_k": 5}}]
        for settings in others:
            assert status(client, **settings) == "MISS", settings
        for settings in others:
            assert status(client, **settings) == "HIT", settings
        assert status(client) == "HIT"


def test_another_earlier_conversation_misses(host: Host, tmp_path: Path) -> None:
    conversations = [
        [{"role": "system", "content": "Answer in English."}, {"role": "user", "content": QUESTION}],
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": QUESTION}],
        [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
         {"role": "user", "content": QUESTION}],
        [{"role": "user", "content": "Bonjour"}, {"role": "assistant", "content": "Hi"},
         {"role": "user", "content": QUESTION}],
        [{"role": "user", "content": QUESTION}],
    ]
    with serving(host, tmp_path / "c.sqlite") as server:
        client = server.client()
        for messages in conversations:
            assert status(client, messages=messages) == "MISS", messages
        for messages in conversations:
            assert status(client, messages=messages) == "HIT", messages


# --- lifetime --------------------------------------------------------------------------------


def test_entries_expire_after_the_ttl(host: Host, tmp_path: Path) -> None:
    with serving(host, tmp_path / "c.sqlite", ttl=0.5) as server:
        client = server.client()
        assert status(client) == "MISS"
        assert status(client) == "HIT"
        time.sleep(0.6)
        assert status(client) == "MISS"  # expired: never served, deleted, answered anew
        assert server.metrics()["wasinn_cache_entries"] == 1
        assert status(client) == "HIT"
    # an entry stored under a longer TTL obeys the TTL of now
    with serving(host, tmp_path / "d.sqlite", ttl=3600) as server:
        assert status(server.client()) == "MISS"
    time.sleep(0.3)
    with serving(host, tmp_path / "d.sqlite", ttl=0.2) as server:
        assert status(server.client()) == "MISS"


def test_the_least_recently_used_entry_is_evicted(host: Host, tmp_path: Path) -> None:
    with serving(host, tmp_path / "c.sqlite", max_entries=2, threshold=0.9999) as server:
        client = server.client()
        assert [status(client, q) for q in ("alpha", "beta", "alpha")] == ["MISS", "MISS", "HIT"]
        assert status(client, "gamma") == "MISS"  # beta was used least recently: it goes
        assert server.metrics()["wasinn_cache_entries"] == 2
        assert status(client, "alpha") == "HIT"
        assert status(client, "beta") == "MISS"
        assert server.metrics()["wasinn_cache_evictions_total"] == 2


def test_cache_control_no_store_and_no_cache(host: Host, tmp_path: Path) -> None:
    with serving(host, tmp_path / "c.sqlite") as server:
        client = server.client()
        _, answer, _ = chat(client, headers={"Cache-Control": "no-store"})
        assert status(client, headers={"Cache-Control": "no-store"}) == "BYPASS"
        assert server.metrics()["wasinn_cache_entries"] == 0  # no-store writes nothing
        assert status(client) == "MISS"
        stores = server.metrics()["wasinn_cache_stores_total"]
        # no-cache: not read (a fresh answer), but the fresh answer is stored
        bypass, fresh, _ = chat(client, headers={"Cache-Control": "no-cache"})
        assert bypass == "BYPASS" and text_of(fresh) == text_of(answer)
        after = server.metrics()
        assert after["wasinn_cache_stores_total"] == stores + 1
        assert after["wasinn_cache_entries"] == 1  # it replaced the entry of the same question
        assert status(client, "a new one", headers={"Cache-Control": "no-cache"}) == "BYPASS"
        assert status(client, "a new one") == "HIT"


# --- streams ---------------------------------------------------------------------------------


def stream(client: openai.OpenAI, question: str = QUESTION, **settings: Any) -> tuple[str, list]:
    settings = {"max_tokens": 40, "temperature": 0, **settings}
    with client.chat.completions.with_streaming_response.create(
            model="tiny", messages=[{"role": "user", "content": question}], stream=True,
            stream_options={"include_usage": True}, **settings) as response:
        return response.headers.get("x-semantic-cache"), list(response.parse())


def test_a_streamed_hit_is_replayed_as_a_real_stream(host: Host, tmp_path: Path) -> None:
    with serving(host, tmp_path / "c.sqlite") as server:
        client = server.client()
        first, generated = stream(client)
        assert first == "MISS"
        again, replayed = stream(client)
        assert again == "HIT"

        def text(chunks: list) -> str:
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        assert text(replayed) == text(generated) != ""
        deltas = [c for c in replayed if c.choices and c.choices[0].delta.content]
        assert len(deltas) > 3  # several pieces, not one blob
        assert replayed[0].choices[0].delta.role == "assistant"
        assert all(c.id == replayed[0].id and c.object == "chat.completion.chunk"
                   for c in replayed)
        finishes = [c.choices[0].finish_reason for c in replayed if c.choices]
        assert finishes[-1] == "length" and not any(finishes[:-1])
        assert replayed[-1].usage == generated[-1].usage and replayed[-1].usage.total_tokens
        # a streamed answer serves a whole request too, and the other way round
        assert text_of(chat(client, max_tokens=40)[1]) == text(generated)
        assert chat(client, max_tokens=40)[0] == "HIT"
        assert status(client, "whole first", max_tokens=40) == "MISS"
        assert stream(client, "whole first")[0] == "HIT"


def test_a_stream_cut_short_or_an_error_is_not_stored(host: Host, tmp_path: Path) -> None:
    with serving(host, tmp_path / "c.sqlite") as server:
        client = server.client()
        with client.chat.completions.with_streaming_response.create(
                model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=400,
                temperature=0, stream=True) as response:
            assert response.headers["x-semantic-cache"] == "MISS"
            for i, _ in enumerate(response.parse()):
                if i == 2:
                    break
        route = 'wasinn_requests_in_progress{route="/v1/chat/completions"}'
        deadline = time.monotonic() + 5
        while server.metrics()[route] != 0:
            assert time.monotonic() < deadline, "the cut stream is still running"
            time.sleep(0.01)
        with pytest.raises(openai.BadRequestError):  # a prompt too long for the model
            chat(client, "word " * 600)
        metrics = server.metrics()
        assert metrics["wasinn_cache_stores_total"] == 0
        assert metrics["wasinn_cache_entries"] == 0
        assert status(client, max_tokens=400) == "MISS"


# --- persistence -----------------------------------------------------------------------------


def test_a_restarted_server_still_hits(host: Host, tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with serving(host, path) as server:
        client = server.client()
        answers = {q: chat(client, q)[1] for q in (QUESTION, "Tell me a story", "Hello")}
        assert all(status(client, q) == "HIT" for q in answers)
    with serving(host, path, threshold=0.5) as server:  # the index, rebuilt from SQLite
        assert server.metrics()["wasinn_cache_entries"] == 3
        client = server.client()
        for q, answer in answers.items():
            hit, cached, _ = chat(client, q)
            assert hit == "HIT" and text_of(cached) == text_of(answer)
        assert status(client, REWORDED) == "HIT"


def test_metrics(host: Host, tmp_path: Path) -> None:
    with serving(host, tmp_path / "c.sqlite") as server:
        client = server.client()
        _, answer, _ = chat(client)
        chat(client)
        chat(client)
        chat(client, headers={"Cache-Control": "no-store"})
        m = server.metrics()
        assert m["wasinn_cache_hits_total"] == 2 and m["wasinn_cache_misses_total"] == 1
        assert m["wasinn_cache_bypasses_total"] == 1
        assert m["wasinn_cache_hit_ratio"] == pytest.approx(2 / 3)
        assert m['wasinn_cache_tokens_saved_total{type="completion"}'] == 2 * 8
        assert m['wasinn_cache_tokens_saved_total{type="prompt"}'] == \
            2 * answer.usage.prompt_tokens
        assert 0 < m["wasinn_cache_seconds_saved_total"] < 10
        assert m["wasinn_cache_entries"] == 1 and m["wasinn_cache_stores_total"] == 1
        assert m["wasinn_cache_lookup_seconds_count"] == 3
        text = httpx.get(f"{server.url}/metrics").text
        assert "# TYPE wasinn_cache_hit_ratio gauge" in text


# --- the command line ------------------------------------------------------------------------


def start(args: Sequence[str], env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "wasinn", "serve", "--port", "0", *args],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    assert process.stderr is not None
    for line in process.stderr:
        found = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
        if found:
            return process, found.group(1)
    process.wait(5)
    raise AssertionError("the server did not start")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=10)
    assert process.returncode == 0


def test_cli_serve_cache_options_and_config_keys(tiny: Path, tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(f'nn-preload = ["tiny:GGML:AUTO:{tiny}"]\nchat-model = "tiny"\n'
                      f'cache = "answers.sqlite"\nthreshold = 0.5\ncache-ttl = "1h"\n'
                      f'cache-max-entries = 10\n'
                      f'verifier = "none"\n')  # the tiny model's vectors: cosine alone
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    process, url = start(["--config", str(config)], env)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0)
        assert status(client) == "MISS"
        assert status(client, REWORDED) == "HIT"  # threshold 0.5 from the file
    finally:
        stop(process)
    assert (tmp_path / "answers.sqlite").is_file()  # relative to the config file
    process, url = start(["--config", str(config), "--no-cache"], env)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0)
        assert status(client) is None
    finally:
        stop(process)
    # (onnxruntime keeps a device id under XDG_CACHE_HOME/Microsoft: not ours to judge)
    assert not (tmp_path / "xdg" / "wasinn").exists()
    bad = subprocess.run([sys.executable, "-m", "wasinn", "serve", "--nn-preload",
                          f"tiny:GGML:AUTO:{tiny}", "--threshold", "1.5"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--threshold" in bad.stderr


def test_the_default_cache_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / "wasinn" / "cache.sqlite"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_path() == Path.home() / ".cache" / "wasinn" / "cache.sqlite"


# --- the parts, without a server -------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "word", "two words", "  leading and trailing  ",
                                  "a" * 50, "line\nbreaks\n\nand\ttabs", "émoji 🙂 ok"])
def test_replay_pieces_join_to_the_text(text: str) -> None:
    parts = pieces(text)
    assert "".join(parts) == text
    assert all(parts) and all(len(p) <= 16 + 2 or p.strip() == "" for p in parts)
    if len(text.split()) >= 2:
        assert len(parts) >= 2


def test_cache_control_parsing() -> None:
    def mode(value: str) -> str:
        return cache_mode(Caller(headers={"cache-control": value}))

    assert cache_mode(Caller()) == "use"
    assert mode("no-store") == "off" and mode("No-Cache, no-store") == "off"
    assert mode("no-cache") == "refresh" and mode("max-age=0") == "refresh"
    assert mode("max-age=60") == "use"


class FakeCompleter:
    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def models(self) -> list[str]:
        return ["m"]

    async def complete(self, request: GenerationRequest) -> Completion:
        self.calls += 1
        if self.fail:
            raise ApiError(500, "upstream failed", type="server_error")
        return Completion("m", f"answer {self.calls}", "stop", 3, 2)

    async def stream(self, request: GenerationRequest) -> TextStream:
        self.calls += 1

        async def source() -> AsyncIterator[str | Completion]:
            yield "partial"
            raise ApiError(502, "upstream cut the stream")

        return TextStream(source())


class FakeEmbedder:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def models(self) -> list[str]:
        return ["e"]

    async def embed(self, model: str, texts: Sequence[str]) -> Embeddings:
        if self.fail:
            raise ApiError(400, "too long for the embedder")
        rows = [[len(t), 1.0, 0.0] for t in texts]
        return Embeddings("e", np.asarray(rows, np.float32), 1)


def request(text: str = "hi") -> GenerationRequest:
    return GenerationRequest("m", Sampling(), messages=(Message("user", text),))


def test_failures_never_break_a_request_and_are_never_stored(tmp_path: Path) -> None:
    async def main() -> None:
        # an embedder that fails: the inner completer answers, nothing is stored
        store = SQLiteStore(tmp_path / "a.sqlite")
        metrics = Metrics()
        cache = SemanticCache(FakeCompleter(), FakeEmbedder(fail=True), "e", store,
                              metrics=metrics)
        answer = await cache.complete(request())
        assert answer.text == "answer 1" and answer.headers["x-semantic-cache"] == "BYPASS"
        assert store.size() == 0 and "wasinn_cache_errors_total" in metrics.render()
        await cache.close()

        # an inner completer that fails, whole or in the middle of a stream: nothing stored
        store = SQLiteStore(tmp_path / "b.sqlite")
        cache = SemanticCache(FakeCompleter(fail=True), FakeEmbedder(), "e", store)
        with pytest.raises(ApiError):
            await cache.complete(request())
        streamed = await cache.stream(request())
        with pytest.raises(ApiError):
            async for _ in streamed:
                pass
        assert streamed.completion is None and store.size() == 0
        # a chat without a user message is not looked up
        system_only = GenerationRequest("m", Sampling(), messages=(Message("system", "x"),))
        cache.inner = FakeCompleter()
        assert (await cache.complete(system_only)).headers["x-semantic-cache"] == "BYPASS"
        assert store.size() == 0
        await cache.close()

    asyncio.run(main())


def test_the_store_under_concurrent_requests(store_location: str) -> None:
    """Many lookups and stores at once, across scopes and dimensions; a same-text put
    replaces; everything survives a reopen. On each store."""
    rng = np.random.default_rng(0)

    def unit(v: np.ndarray) -> np.ndarray:
        return (v / np.linalg.norm(v)).astype(np.float32)

    def entry(scope: str, text: str, vector: np.ndarray, answer: str) -> Entry:
        now = time.time()
        return Entry(scope=scope, text=text, vector=vector, model="m", answer=answer,
                     finish_reason="stop", prompt_tokens=1, completion_tokens=1,
                     generation_seconds=0.1, created=now, expires=now + 60)

    vectors = {(s, i): unit(rng.standard_normal(384 if s != "small" else 8))
               for s in ("a", "b", "small") for i in range(300)}

    async def main() -> None:
        store = open_store(store_location)
        await asyncio.gather(*(store.put(entry(s, f"q{i}", v, f"{s}{i}"), max_entries=10_000)
                               for (s, i), v in vectors.items()))
        assert store.size() == 900

        async def look(s: str, i: int) -> None:
            now = time.time()
            found = await store.nearest(s, vectors[s, i], k=1, min_similarity=0.99, now=now,
                                        oldest=now - 60)
            assert [m.entry.answer for m in found] == [f"{s}{i}"]
            assert found[0].similarity == pytest.approx(1.0, abs=1e-5)

        await asyncio.gather(*(look(s, i) for (s, i) in vectors))
        await store.put(entry("a", "q0", vectors["a", 0], "replaced"), max_entries=10_000)
        assert store.size() == 900
        await store.close()

        again = open_store(store_location)
        now = time.time()
        found = await again.nearest("a", vectors["a", 0], k=3, min_similarity=-1.0, now=now,
                                    oldest=now - 60)
        assert found[0].entry.answer == "replaced" and len(found) == 3
        assert found[0].similarity >= found[1].similarity >= found[2].similarity
        assert await again.nearest("b", vectors["a", 0], k=1, min_similarity=0.99, now=now,
                                   oldest=now - 60) == []
        assert await again.nearest("a", vectors["small", 0], k=1, min_similarity=0.0,
                                   now=now, oldest=now - 60) == []  # another dimension
        await again.close()

    asyncio.run(main())


def test_a_file_that_is_not_a_cache_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "not.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match="not.sqlite"):
        SQLiteStore(bad)
