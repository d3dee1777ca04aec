"""What the semantic cache asks of a store: keep entries, find the nearest ones in a scope.

The store is mechanism only: the cache decides the threshold, the TTL and the cap on entries
and passes them in. One implementation keeps entries in SQLite with an in-process vector index
(`SQLiteStore`); a shared one for several replicas (`PostgresStore`, PostgreSQL with pgvector)
keeps to the same protocol. `open_store` picks one by the location's form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl, urlsplit

import numpy as np


@dataclass(frozen=True, eq=False)
class Entry:
    """One cached answer. `scope` is the exact-match key (a hex digest: tenant, model,
    sampling, earlier conversation); `text` the question that was embedded into `vector`
    (float32, unit norm). Times are Unix seconds."""

    scope: str
    text: str
    vector: np.ndarray
    model: str
    answer: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    #: how long the answer took to generate: what a hit on it saves
    generation_seconds: float
    created: float
    expires: float
    #: the store's key, None until stored
    id: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Match:
    """A stored entry near a question, with their exact cosine similarity."""

    entry: Entry
    similarity: float


class CacheStore(Protocol):
    """Entries and nearest-neighbour search within a scope. Safe to call from one event loop
    with requests running concurrently; blocking work runs off the loop."""

    async def nearest(self, scope: str, vector: np.ndarray, *, k: int, min_similarity: float,
                      now: float, oldest: float) -> Sequence[Match]:
        """Up to `k` live entries of `scope` whose cosine to `vector` is at least
        `min_similarity`, nearest first. Live: `expires > now` and `created >= oldest`; an
        entry found dead is deleted on the way (TTL purges are lazy)."""
        ...

    async def put(self, entry: Entry, *, max_entries: int) -> int:
        """Store `entry` (it replaces one of the same scope and text), then evict the least
        recently used entries beyond `max_entries`. Durable when it returns. Returns how many
        were evicted."""
        ...

    async def touch(self, entry_id: int, now: float) -> None:
        """An entry was served: it is now the most recently used."""
        ...

    async def purge(self, *, now: float, oldest: float) -> int:
        """Delete every dead entry; returns how many."""
        ...

    def size(self) -> int:
        """Entries stored, as last known (for a gauge: must not block)."""
        ...

    async def close(self) -> None: ...


def is_dsn(location: object) -> bool:
    """Whether a store's location names a PostgreSQL database rather than a SQLite file."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def redacted(location: str | Path) -> str:
    """A store's location for messages and logs: a DSN without its password."""
    if not is_dsn(location):
        return str(location)
    scheme = str(location).partition("://")[0]
    try:
        parts = urlsplit(str(location))
        host = parts.netloc.rpartition("@")[2]
        user = f"{parts.username}@" if parts.username else ""
        query = "&".join(f"{k}={v}" for k, v in parse_qsl(parts.query) if k != "password")
    except ValueError:
        return f"{scheme}://..."
    return f"{scheme}://{user}{host}{parts.path}" + (f"?{query}" if query else "")


def open_store(location: str | Path) -> CacheStore:
    """The store at `location`: a `postgresql://` (or `postgres://`) DSN opens a PostgreSQL
    database shared by several servers (the `postgres` extra), anything else a SQLite file.
    A location that cannot be opened is a ValueError."""
    if is_dsn(location):
        try:
            from ._postgres import PostgresStore
        except ImportError as e:
            raise ValueError(f"cache {redacted(location)}: a PostgreSQL cache needs "
                             f"pip install 'wasinn[postgres]' ({e})") from None
        return PostgresStore(str(location))
    from ._sqlite import SQLiteStore

    return SQLiteStore(location)
