"""What the semantic cache asks of a store: keep entries, find the nearest ones in a scope.

The store is mechanism only: the cache decides the threshold, the TTL and the cap on entries
and passes them in. One implementation keeps entries in SQLite with an in-process vector index
(`SQLiteStore`); a shared one for several replicas (PostgreSQL with pgvector) keeps to the same
protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

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
