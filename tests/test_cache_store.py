"""The semantic cache's stores: the contract every store keeps (on SQLite and on PostgreSQL),
then what only the shared PostgreSQL store does: several replicas, one set of entries. The
PostgreSQL is real (the pgserver wheel: PostgreSQL 16 with pgvector 0.6, in a temp dir); the
replicas are real `wasinn serve` processes driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("numkong")
from test_cache import chat, start, status, stop, text_of  # noqa: E402
from wasinn.cache import CacheStore, Entry, open_store  # noqa: E402

NOW = 1_000_000.0  # the stores take the time from their caller: these tests choose it
DIMS = 8


def unit(vector: Any) -> np.ndarray:
    vector = np.asarray(vector, np.float32)
    return vector / np.linalg.norm(vector)


def at_cosine(cosine: float, direction: int) -> np.ndarray:
    """A unit vector whose cosine to the first axis is `cosine` (each `direction` apart)."""
    vector = np.zeros(DIMS, np.float32)
    vector[0] = cosine
    vector[direction] = np.sqrt(1 - cosine**2)
    return vector


def axis(i: int) -> np.ndarray:
    return np.eye(DIMS, dtype=np.float32)[i]


AXIS = axis(0)


def entry(scope: str, text: str, vector: np.ndarray, answer: str | None = None, *,
          created: float = NOW, expires: float = NOW + 3600) -> Entry:
    return Entry(scope=scope, text=text, vector=vector, model="m", answer=answer or text,
                 finish_reason="stop", prompt_tokens=3, completion_tokens=2,
                 generation_seconds=0.5, created=created, expires=expires)


async def answers(store: CacheStore, scope: str, vector: np.ndarray, *, k: int = 10,
                  min_similarity: float = -1.0, now: float = NOW,
                  oldest: float = NOW - 3600) -> list[str]:
    found = await store.nearest(scope, vector, k=k, min_similarity=min_similarity, now=now,
                                oldest=oldest)
    return [m.entry.answer for m in found]


def on_store(location: str, test: Callable[[CacheStore], Awaitable[None]]) -> None:
    async def main() -> None:
        store = open_store(location)
        try:
            await test(store)
        finally:
            await store.close()

    asyncio.run(main())


# --- the contract, on every store ------------------------------------------------------------


def test_a_lookup_stays_in_its_scope(store_location: str) -> None:
    async def test(store: CacheStore) -> None:
        await store.put(entry("alice", "q", AXIS, "for alice"), max_entries=10)
        await store.put(entry("bob", "q", AXIS, "for bob"), max_entries=10)
        assert await answers(store, "alice", AXIS) == ["for alice"]
        assert await answers(store, "bob", AXIS) == ["for bob"]
        assert await answers(store, "carol", AXIS) == []
        assert store.size() == 2

    on_store(store_location, test)


def test_the_threshold_and_the_k_nearest_first(store_location: str) -> None:
    cosines = [0.5, 0.99, 0.9, 0.95]

    async def test(store: CacheStore) -> None:
        for i, cosine in enumerate(cosines):
            await store.put(entry("s", f"q{i}", at_cosine(cosine, i + 1), f"{cosine}"),
                            max_entries=10)
        found = await store.nearest("s", AXIS, k=10, min_similarity=0.89, now=NOW,
                                    oldest=NOW - 1)
        assert [m.entry.answer for m in found] == ["0.99", "0.95", "0.9"]
        assert [m.similarity for m in found] == pytest.approx([0.99, 0.95, 0.9], abs=1e-6)
        np.testing.assert_allclose(found[0].entry.vector, at_cosine(0.99, 2), atol=1e-7)
        assert found[0].entry.id is not None and found[0].entry.generation_seconds == 0.5
        assert await answers(store, "s", AXIS, k=2) == ["0.99", "0.95"]
        assert await answers(store, "s", AXIS, k=1, min_similarity=0.96) == ["0.99"]
        assert await answers(store, "s", AXIS, min_similarity=0.995) == []
        assert await answers(store, "s", AXIS) == ["0.99", "0.95", "0.9", "0.5"]
        assert await answers(store, "s", unit(np.ones(DIMS + 1))) == []  # another dimension

    on_store(store_location, test)


def test_a_dead_entry_is_never_served_and_goes(store_location: str) -> None:
    """Live: `expires > now` and `created >= oldest` (a TTL shortened since it was stored)."""

    async def test(store: CacheStore) -> None:
        await store.put(entry("s", "live", at_cosine(0.9, 1), created=NOW - 10), max_entries=10)
        await store.put(entry("s", "expired", at_cosine(0.99, 2), expires=NOW), max_entries=10)
        await store.put(entry("s", "too old", AXIS, created=NOW - 50), max_entries=10)
        await store.put(entry("other", "expired", AXIS, expires=NOW - 1), max_entries=10)
        assert store.size() == 4
        assert await answers(store, "s", AXIS, oldest=NOW - 20) == ["live"]
        assert store.size() == 2  # found dead on the way: deleted
        assert await answers(store, "s", AXIS, oldest=NOW - 3600) == ["live"]  # for good
        assert await store.purge(now=NOW, oldest=NOW - 20) == 1  # the other scope's
        assert store.size() == 1
        assert await store.purge(now=NOW + 10**6, oldest=NOW - 20) == 1
        assert store.size() == 0 and await answers(store, "s", AXIS) == []

    on_store(store_location, test)


def test_a_put_of_the_same_scope_and_text_replaces(store_location: str) -> None:
    async def test(store: CacheStore) -> None:
        await store.put(entry("s", "q", AXIS, "first"), max_entries=10)
        await store.put(entry("s", "q", at_cosine(0.8, 3), "second", created=NOW + 1),
                        max_entries=10)
        await store.put(entry("t", "q", AXIS, "another scope"), max_entries=10)
        assert store.size() == 2
        found = await store.nearest("s", AXIS, k=10, min_similarity=-1, now=NOW + 2,
                                    oldest=NOW - 1)
        assert [(m.entry.answer, m.entry.created) for m in found] == [("second", NOW + 1)]
        assert found[0].similarity == pytest.approx(0.8, abs=1e-6)

    on_store(store_location, test)


def test_the_least_recently_used_go_past_the_cap(store_location: str) -> None:
    vectors = [axis(i) for i in range(1, 6)]

    async def test(store: CacheStore) -> None:
        for i in range(3):
            assert await store.put(entry("s", f"q{i}", vectors[i], created=NOW + i),
                                   max_entries=3) == 0
        (first,) = await store.nearest("s", vectors[0], k=1, min_similarity=0.99, now=NOW + 3,
                                       oldest=NOW - 1)
        assert first.entry.id is not None
        await store.touch(first.entry.id, NOW + 3)  # q0 served: now q1 is the least used
        assert await store.put(entry("s", "q3", vectors[3], created=NOW + 4), max_entries=3) == 1
        assert store.size() == 3
        left = [await answers(store, "s", v, k=1, min_similarity=0.99, now=NOW + 5)
                for v in vectors[:4]]
        assert left == [["q0"], [], ["q2"], ["q3"]]
        # a put never evicts the entry it stores
        assert await store.put(entry("s", "q4", vectors[4], created=NOW + 6), max_entries=1) == 3
        assert store.size() == 1
        assert await answers(store, "s", AXIS, now=NOW + 7) == ["q4"]
        with pytest.raises(ValueError):
            await store.put(entry("s", "q5", AXIS), max_entries=0)

    on_store(store_location, test)


# --- PostgreSQL: shared by replicas ----------------------------------------------------------


def test_replicas_share_entries_and_one_cap(postgres_dsn: str) -> None:
    async def main() -> None:
        one, two = open_store(postgres_dsn), open_store(postgres_dsn)
        await one.put(entry("s", "q0", axis(1), created=NOW), max_entries=3)
        assert await answers(two, "s", axis(1), min_similarity=0.99) == ["q0"]
        await two.put(entry("s", "q1", axis(2), created=NOW + 1), max_entries=3)
        await one.put(entry("s", "q2", axis(3), created=NOW + 2), max_entries=3)
        assert one.size() == 3
        # the second replica serves q0: the first's next put evicts q1, not q0
        (served,) = await two.nearest("s", axis(1), k=1, min_similarity=0.99, now=NOW + 3,
                                      oldest=NOW - 1)
        await two.touch(served.entry.id, NOW + 3)  # type: ignore[arg-type]
        await two.close()  # last uses are written behind; close writes what is left
        assert await one.put(entry("s", "q3", axis(4), created=NOW + 4), max_entries=3) == 1
        assert sorted(await answers(one, "s", AXIS, now=NOW + 5)) == ["q0", "q2", "q3"]
        await one.close()

    asyncio.run(main())


def test_a_wrong_or_unreachable_database_is_refused_at_once(postgres_server: str,
                                                            postgres_dsn: str) -> None:
    psycopg = pytest.importorskip("psycopg")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match=r"cache postgresql://wasinn@127\.0\.0\.1:\d+/cache: "
                                         r".*refused") as refused:
        open_store(f"postgresql://wasinn:secret@127.0.0.1:{port}/cache")
    assert "secret" not in str(refused.value)
    with pytest.raises(ValueError, match="not a PostgreSQL DSN.*bogus"):
        open_store("postgresql://wasinn@127.0.0.1/cache?bogus=1")
    missing = postgres_server.replace("/postgres?", "/no_such_db?")
    with pytest.raises(ValueError, match='database "no_such_db" does not exist'):
        open_store(missing)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE wasinn_cache_entries (id integer)")
    with pytest.raises(ValueError, match="not a wasinn cache of schema 1"):
        open_store(postgres_dsn)


def test_two_server_processes_share_one_cache(tiny: Path, postgres_dsn: str,
                                              tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    first, first_url = start(["--nn-preload", f"tiny:GGML:AUTO:{tiny}", "--chat-model", "tiny",
                              "--cache", postgres_dsn], env)
    try:
        config = tmp_path / "serve.toml"  # the second one takes the DSN from a config file
        config.write_text(f'nn-preload = ["tiny:GGML:AUTO:{tiny}"]\nchat-model = "tiny"\n'
                          f'cache = "{postgres_dsn}"\n')
        second, second_url = start(["--config", str(config)], env)
        try:
            one, two = (openai.OpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0)
                        for url in (first_url, second_url))
            miss, answer, _ = chat(one)
            assert miss == "MISS"
            hit, cached, headers = chat(two)
            assert hit == "HIT" and headers["x-semantic-cache-similarity"] == "1.0000"
            assert text_of(cached) == text_of(answer) != ""
            assert status(two, "Tell me a story") == "MISS"
            assert status(one, "Tell me a story") == "HIT"
        finally:
            stop(second)
    finally:
        stop(first)
    # (onnxruntime keeps a device id under XDG_CACHE_HOME/Microsoft: not ours to judge)
    assert not (tmp_path / "xdg" / "wasinn").exists()  # no SQLite file on the side


def test_serve_refuses_a_database_it_cannot_reach(tiny: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def serve(cache: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "wasinn", "serve", "--port", "0",
                               "--nn-preload", f"tiny:GGML:AUTO:{tiny}", "--cache", cache],
                              capture_output=True, text=True, timeout=120)

    down = serve(f"postgres://wasinn:secret@127.0.0.1:{port}/cache")
    assert down.returncode == 2, down.stderr
    assert f"wasinn: cache postgres://wasinn@127.0.0.1:{port}/cache: connection" in down.stderr
    assert "secret" not in down.stderr
    other = serve("redis://127.0.0.1/0")
    assert other.returncode == 2 and "a SQLite file path or a postgresql:// DSN" in other.stderr
