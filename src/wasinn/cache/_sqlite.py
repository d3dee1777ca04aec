"""The embedded store: entries in a SQLite file (WAL), vectors in an in-process index.

SQLite is the truth; the index is rebuilt from it at start. The index keeps each scope's
vectors as int8 rows, each scaled by its own largest component, and searches a scope
exhaustively with numkong's SIMD dot products (bench/cache_index.py: at 100k 384-d entries
that is 1.7 ms and exact, where HNSW graphs answer in 0.2-0.4 ms but miss one near neighbour
in eight, and take 14-60 s to rebuild at start). The int8 scores only pick candidates; their similarity
is recomputed in float32 from the embedding stored in SQLite before anything is served.

Durability: journal_mode=WAL with synchronous=NORMAL. A transaction is in the WAL file when
COMMIT returns, so a killed server (kill -9) loses no committed entry; a power cut may lose the
last few (FULL would fsync every commit for that: a cache need not pay it).
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numkong
import numpy as np

from ._store import Entry, Match

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY,
    scope TEXT NOT NULL,
    text_hash TEXT NOT NULL,
    text TEXT NOT NULL,
    embedding BLOB NOT NULL,
    model TEXT NOT NULL,
    answer TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    generation_seconds REAL NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    expires REAL NOT NULL,
    UNIQUE (scope, text_hash)
);
CREATE INDEX IF NOT EXISTS entries_expires ON entries (expires);
CREATE INDEX IF NOT EXISTS entries_created ON entries (created);
"""

_COLUMNS = ("id, scope, text, embedding, model, answer, finish_reason, prompt_tokens, "
            "completion_tokens, generation_seconds, created, expires")

#: scopes larger than this are searched on a worker thread, not on the event loop (~50 us)
_INLINE_ROWS = 4096
#: a scope this large is scanned in two halves at once (the second on a helper thread):
#: 100k rows take 1.0 ms instead of 1.6 on 2 cores
_SPLIT_ROWS = 32768
#: how far an int8 score may fall below the float32 cosine (measured error is ~0.002)
_QUANTIZATION_MARGIN = 0.02

T = TypeVar("T")


def quantize(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of int8, each scaled by its largest component, and the scales that undo it."""
    rows = np.atleast_2d(np.asarray(vectors, np.float32))
    top = np.abs(rows).max(axis=1)
    top[top == 0] = 1.0
    q = np.round(rows * (127.0 / top)[:, None]).astype(np.int8)
    return q, (top / 127.0).astype(np.float32)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class _Rows:
    """One scope's vectors, dense: a removal moves the last row into the hole."""

    __slots__ = ("created", "expires", "first_created", "first_expiry", "ids", "n", "pos",
                 "rows", "scales")

    def __init__(self, dim: int) -> None:
        cap = 8
        self.rows = np.empty((cap, dim), np.int8)
        self.scales = np.empty(cap, np.float32)
        self.ids = np.empty(cap, np.int64)
        self.created = np.empty(cap, np.float64)
        self.expires = np.empty(cap, np.float64)
        self.n = 0
        self.pos: dict[int, int] = {}
        # lower bounds of the rows' times: nothing can be dead before them (no scan per lookup)
        self.first_created = np.inf
        self.first_expiry = np.inf

    @property
    def dim(self) -> int:
        return self.rows.shape[1]

    def add(self, id: int, row: np.ndarray, scale: float, created: float,
            expires: float) -> None:
        if self.n == len(self.ids):  # grow: new arrays, so a search's snapshot stays whole
            cap = 2 * len(self.ids)
            for name in ("rows", "scales", "ids", "created", "expires"):
                old = getattr(self, name)
                new = np.empty((cap, *old.shape[1:]), old.dtype)
                new[:self.n] = old[:self.n]
                setattr(self, name, new)
        i = self.n
        self.rows[i] = row
        self.scales[i] = scale
        self.ids[i] = id
        self.created[i] = created
        self.expires[i] = expires
        self.pos[id] = i
        self.n += 1
        self.first_created = min(self.first_created, created)
        self.first_expiry = min(self.first_expiry, expires)

    def remove(self, id: int) -> None:
        i = self.pos.pop(id)
        last = self.n - 1
        if i != last:
            moved = int(self.ids[last])
            for array in (self.rows, self.scales, self.ids, self.created, self.expires):
                array[i] = array[last]
            self.pos[moved] = i
        self.n = last

    def dead(self, now: float, oldest: float) -> list[int]:
        """The ids of rows past their time (the caller removes them)."""
        if self.first_expiry > now and self.first_created >= oldest:
            return []
        n = self.n
        mask = (self.expires[:n] <= now) | (self.created[:n] < oldest)
        live = ~mask
        self.first_created = float(self.created[:n][live].min()) if live.any() else np.inf
        self.first_expiry = float(self.expires[:n][live].min()) if live.any() else np.inf
        return [int(i) for i in self.ids[:n][mask]]


def _dots(q: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.asarray(numkong.cdist(q, rows, metric="dot", out_dtype="float32"))[0]


def _search(rows: np.ndarray, scales: np.ndarray, ids: np.ndarray, query: np.ndarray,
            k: int, floor: float, helper: ThreadPoolExecutor | None = None) -> list[int]:
    """The ids of the (at most) k rows with the highest int8 scores >= floor, best first
    (with a `helper` thread, a large scope is scanned in two halves at once)."""
    q, qscale = quantize(query)
    if helper is not None and len(rows) >= _SPLIT_ROWS:
        half = len(rows) // 2
        second = helper.submit(_dots, q, rows[half:])
        dots = np.concatenate([_dots(q, rows[:half]), second.result()])
    else:
        dots = _dots(q, rows)
    scores = dots * scales * qscale[0]
    if k == 1 or len(scores) <= k:
        order = [int(np.argmax(scores))] if k == 1 else list(np.argsort(-scores))
    else:
        top = np.argpartition(-scores, k - 1)[:k]
        order = list(top[np.argsort(-scores[top])])
    return [int(ids[i]) for i in order if scores[i] >= floor]


class VectorIndex:
    """Every entry's vector by scope, and the entries in least-recently-used order.

    Mutations take the lock; a search works on a snapshot of its scope's arrays, without it
    (its candidates are checked against SQLite before they are served).
    """

    def __init__(self) -> None:
        self._scopes: dict[str, _Rows] = {}
        self._scope_of: dict[int, str] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._scope_of)

    def __contains__(self, id: int) -> bool:
        return id in self._scope_of

    def add_many(self, ids: Sequence[int], scopes: Sequence[str], vectors: np.ndarray,
                 created: Sequence[float], expires: Sequence[float]) -> None:
        """Entries in least- to most-recently-used order (a re-add replaces)."""
        if not len(ids):
            return
        rows, scales = quantize(vectors)
        with self._lock:
            for j, id in enumerate(ids):
                self._remove(id)
                rowset = self._scopes.get(scopes[j])
                if rowset is None or rowset.dim != rows.shape[1]:
                    if rowset is not None:  # another dimension: the old rows cannot match
                        for old in list(rowset.pos):
                            self._remove(old)
                    rowset = self._scopes[scopes[j]] = _Rows(rows.shape[1])
                rowset.add(id, rows[j], float(scales[j]), created[j], expires[j])
                self._scope_of[id] = scopes[j]
                self._lru[id] = None

    def remove(self, ids: Iterable[int]) -> None:
        with self._lock:
            for id in ids:
                self._remove(id)

    def _remove(self, id: int) -> None:
        scope = self._scope_of.pop(id, None)
        if scope is None:
            return
        rowset = self._scopes[scope]
        rowset.remove(id)
        if rowset.n == 0:
            del self._scopes[scope]
        self._lru.pop(id, None)

    def touch(self, id: int) -> None:
        with self._lock:
            if id in self._lru:
                self._lru.move_to_end(id)

    def least_recently_used(self, count: int, keep: int | None = None) -> list[int]:
        with self._lock:
            out = []
            for id in self._lru:
                if len(out) >= count:
                    break
                if id != keep:
                    out.append(id)
            return out

    def dead(self, scope: str | None, now: float, oldest: float) -> list[int]:
        with self._lock:
            if scope is not None:
                rowset = self._scopes.get(scope)
                return rowset.dead(now, oldest) if rowset is not None else []
            return [id for r in self._scopes.values() for id in r.dead(now, oldest)]

    def snapshot(self, scope: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        with self._lock:
            rowset = self._scopes.get(scope)
            if rowset is None:
                return None
            n = rowset.n
            return rowset.rows[:n], rowset.scales[:n], rowset.ids[:n]


class SQLiteStore:
    """A CacheStore in one SQLite file. One server process per file: each keeps its own
    index, so entries another process writes are seen after a restart only (PostgreSQL is
    the store for several replicas)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._open()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise ValueError(f"cache {self.path}: {e}") from None
        self._index = VectorIndex()
        self._touched: dict[int, float] = {}
        self._touch_lock = threading.Lock()
        # one thread owns the connection's work (SQLite serializes writers anyway); searches
        # of large scopes run on their own threads
        self._db_pool = ThreadPoolExecutor(1, thread_name_prefix="wasinn-cache-db")
        self._search_pool = ThreadPoolExecutor(2, thread_name_prefix="wasinn-cache-search")
        # its own pool: a search holding a search thread never waits for another one
        self._scan_helper = ThreadPoolExecutor(1, thread_name_prefix="wasinn-cache-scan")
        self._closed = False
        self._load()

    def _open(self) -> None:
        db = self._db
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.DatabaseError(f"cannot use WAL mode (journal_mode is {mode})")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise sqlite3.DatabaseError(
                f"schema version {version}, this wasinn knows {SCHEMA_VERSION} (delete the file "
                f"or point --cache elsewhere)")
        db.executescript("BEGIN;" + _SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};COMMIT;")

    def _load(self) -> None:
        """The index from SQLite: every entry, least recently used first."""
        rows = self._db.execute("SELECT id, scope, embedding, created, expires FROM entries "
                                "ORDER BY last_used, id").fetchall()
        by_dim: dict[int, list[tuple[Any, ...]]] = {}
        for row in rows:
            by_dim.setdefault(len(row[2]) // 4, []).append(row)
        # LRU order across dimensions matters only for eviction; rows of one dimension keep it
        for group in by_dim.values():
            vectors = np.frombuffer(b"".join(r[2] for r in group), "<f4").reshape(len(group), -1)
            self._index.add_many([r[0] for r in group], [r[1] for r in group], vectors,
                                 [r[3] for r in group], [r[4] for r in group])

    # --- CacheStore -------------------------------------------------------------------------

    def size(self) -> int:
        return len(self._index)

    async def nearest(self, scope: str, vector: np.ndarray, *, k: int, min_similarity: float,
                      now: float, oldest: float) -> list[Match]:
        dead = self._index.dead(scope, now, oldest)
        if dead:
            await self._run(self._delete, dead)
        snapshot = self._index.snapshot(scope)
        if snapshot is None:
            return []
        rows, scales, ids = snapshot
        if rows.shape[1] != len(vector):
            return []
        floor = min_similarity - _QUANTIZATION_MARGIN
        if len(ids) > _INLINE_ROWS:
            loop = asyncio.get_running_loop()
            found = await loop.run_in_executor(self._search_pool, _search, rows, scales, ids,
                                               vector, k, floor, self._scan_helper)
        else:
            found = _search(rows, scales, ids, vector, k, floor)
        if not found:
            return []
        entries = await self._run(self._fetch, found)
        matches = []
        gone = []
        for id in found:
            entry = entries.get(id)
            if entry is None or entry.scope != scope:  # deleted meanwhile
                gone.append(id)
                continue
            if entry.expires <= now or entry.created < oldest:
                continue
            similarity = float(np.dot(entry.vector, vector))
            if similarity >= min_similarity:
                matches.append(Match(entry, similarity))
        if gone:
            self._index.remove(gone)
        matches.sort(key=lambda m: -m.similarity)
        return matches[:k]

    async def put(self, entry: Entry, *, max_entries: int) -> int:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        return await self._run(self._put, entry, max_entries)

    async def touch(self, entry_id: int, now: float) -> None:
        self._index.touch(entry_id)
        with self._touch_lock:
            self._touched[entry_id] = now

    async def purge(self, *, now: float, oldest: float) -> int:
        return await self._run(self._purge, now, oldest)

    async def close(self) -> None:
        if self._closed:
            return
        await self._run(self._flush_touches)
        self._closed = True
        self._db_pool.shutdown(wait=True)
        self._search_pool.shutdown(wait=True)
        self._scan_helper.shutdown(wait=True)
        self._db.close()

    # --- on the database thread -------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError("the cache store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db_pool, fn, *args)

    def _fetch(self, ids: Sequence[int]) -> dict[int, Entry]:
        marks = ",".join("?" * len(ids))
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM entries WHERE id IN ({marks})",
                                list(ids)).fetchall()
        return {r[0]: _entry(r) for r in rows}

    def _delete(self, ids: Sequence[int]) -> int:
        with self._transaction():
            deleted = self._db.executemany("DELETE FROM entries WHERE id = ?",
                                           [(i,) for i in ids]).rowcount
        self._index.remove(ids)
        return deleted

    def _put(self, entry: Entry, max_entries: int) -> int:
        vector = np.asarray(entry.vector, np.float32)
        digest = text_hash(entry.text)
        values = (entry.text, vector.astype("<f4").tobytes(), entry.model, entry.answer,
                  entry.finish_reason, entry.prompt_tokens, entry.completion_tokens,
                  entry.generation_seconds, entry.created, entry.created, entry.expires)
        with self._transaction():
            self._write_touches()
            old = self._db.execute("SELECT id FROM entries WHERE scope = ? AND text_hash = ?",
                                   (entry.scope, digest)).fetchone()
            if old is not None:
                id = int(old[0])
                self._db.execute(
                    "UPDATE entries SET text = ?, embedding = ?, model = ?, answer = ?, "
                    "finish_reason = ?, prompt_tokens = ?, completion_tokens = ?, "
                    "generation_seconds = ?, created = ?, last_used = ?, expires = ? "
                    "WHERE id = ?", (*values, id))
            else:
                id = int(self._db.execute(
                    "INSERT INTO entries (text, embedding, model, answer, finish_reason, "
                    "prompt_tokens, completion_tokens, generation_seconds, created, last_used, "
                    "expires, scope, text_hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (*values, entry.scope, digest)).lastrowid)
            size = len(self._index) + (0 if id in self._index else 1)
            victims = (self._index.least_recently_used(size - max_entries, keep=id)
                       if size > max_entries else [])
            if victims:
                self._db.executemany("DELETE FROM entries WHERE id = ?", [(v,) for v in victims])
        # committed: now the index
        self._index.remove(victims)
        self._index.add_many([id], [entry.scope], vector[None, :], [entry.created],
                             [entry.expires])
        return len(victims)

    def _purge(self, now: float, oldest: float) -> int:
        with self._transaction():
            self._write_touches()
            dead = [r[0] for r in self._db.execute(
                "SELECT id FROM entries WHERE expires <= ? OR created < ?", (now, oldest))]
            self._db.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i in dead])
        self._index.remove(dead)
        return len(dead)

    def _flush_touches(self) -> None:
        with self._transaction():
            self._write_touches()

    def _write_touches(self) -> None:
        """Last-use times wait in memory for the next write (one UPDATE per hit would make
        every hit a write); a crash loses only them, which shifts the LRU order a little."""
        with self._touch_lock:
            touched, self._touched = self._touched, {}
        if touched:
            self._db.executemany("UPDATE entries SET last_used = ? WHERE id = ?",
                                 [(t, i) for i, t in touched.items()])

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if kind is not None else "COMMIT")


def _entry(row: tuple[Any, ...]) -> Entry:
    (id, scope, text, blob, model, answer, finish, prompt, completion, seconds, created,
     expires) = row
    return Entry(scope=scope, text=text, vector=np.frombuffer(blob, "<f4"), model=model,
                 answer=answer, finish_reason=finish, prompt_tokens=prompt,
                 completion_tokens=completion, generation_seconds=seconds, created=created,
                 expires=expires, id=id)
