"""The shared store: entries in PostgreSQL, searched with pgvector, for several server replicas.

Every replica reads and writes one table, so an answer stored through one is a hit through all.

Search is exact within a scope: the scope's rows come from the (scope, text_hash) b-tree and are
ranked by pgvector's cosine distance `<=>`. pgvector 0.6's HNSW and IVFFlat indexes cannot serve
this query: they filter after the index scan (HNSW hands back `ef_search` candidates from all
scopes, then the scope filter drops most of them). Measured with 100 scopes that each hold a
rewording of the same 100 questions (as tenants do): through an HNSW index the right entry came
back for 9 lookups in 20, by exact search for 20 in 20. Filtered scans that keep going came
with pgvector 0.8. The cost: a lookup in a scope of 10k 384-d entries took 12 ms (p50, 2 busy
cores; 5-7 ms of it in PostgreSQL, reading the scope's 2,500 pages), in one of 100 entries
1.5 ms. The `vector` column has no fixed dimension, since that matters only to an index: one
table holds the scopes of several embedding models.

Durability: a put is one transaction, committed as the server commits (synchronous_commit on,
PostgreSQL's default: in the WAL on disk when put returns). Puts take an advisory lock, so the
cap on entries holds across replicas. Last-use times are written behind, in batches.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import psycopg
from psycopg.adapt import Dumper, Loader
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import Format
from psycopg_pool import AsyncConnectionPool

from ._sqlite import text_hash
from ._store import Entry, Match, redacted

log = logging.getLogger("wasinn.cache")

SCHEMA_VERSION = 1
TABLE = "wasinn_cache_entries"
_COMMENT = f"wasinn semantic cache, schema {SCHEMA_VERSION}"
#: pg_advisory_xact_lock's key: replicas create the schema, and put, one at a time
_LOCK = 0x7761_7369_6E6E  # "wasinn"

_SCHEMA = f"""
CREATE TABLE {TABLE} (
    id bigserial PRIMARY KEY,
    scope text NOT NULL,
    text_hash text NOT NULL,
    text text NOT NULL,
    embedding vector NOT NULL,
    -- vector_dims(embedding), kept apart: a lookup compares it on every row of a scope
    dims integer NOT NULL,
    model text NOT NULL,
    answer text NOT NULL,
    finish_reason text NOT NULL,
    prompt_tokens integer NOT NULL,
    completion_tokens integer NOT NULL,
    generation_seconds double precision NOT NULL,
    created double precision NOT NULL,
    last_used double precision NOT NULL,
    expires double precision NOT NULL,
    UNIQUE (scope, text_hash)
);
CREATE INDEX {TABLE}_expires ON {TABLE} (expires);
CREATE INDEX {TABLE}_created ON {TABLE} (created);
CREATE INDEX {TABLE}_lru ON {TABLE} (last_used, id);
COMMENT ON TABLE {TABLE} IS '{_COMMENT}';
"""

_COLUMNS = ("id, scope, text, embedding, model, answer, finish_reason, prompt_tokens, "
            "completion_tokens, generation_seconds, created, expires")

_NEAREST = f"""
SELECT {_COLUMNS} FROM {TABLE}
WHERE scope = %(scope)s AND expires > %(now)s AND created >= %(oldest)s
    AND dims = %(dims)s
ORDER BY embedding <=> %(vector)b, id
LIMIT %(k)s
"""
_DELETE_DEAD_IN_SCOPE = (f"DELETE FROM {TABLE} WHERE scope = %(scope)s "
                         f"AND (expires <= %(now)s OR created < %(oldest)s)")
_UPSERT = f"""
INSERT INTO {TABLE} (scope, text_hash, text, embedding, dims, model, answer, finish_reason,
    prompt_tokens, completion_tokens, generation_seconds, created, last_used, expires)
VALUES (%s, %s, %s, %b, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (scope, text_hash) DO UPDATE SET text = EXCLUDED.text,
    embedding = EXCLUDED.embedding, dims = EXCLUDED.dims, model = EXCLUDED.model,
    answer = EXCLUDED.answer, finish_reason = EXCLUDED.finish_reason,
    prompt_tokens = EXCLUDED.prompt_tokens, completion_tokens = EXCLUDED.completion_tokens,
    generation_seconds = EXCLUDED.generation_seconds, created = EXCLUDED.created,
    last_used = EXCLUDED.last_used, expires = EXCLUDED.expires
RETURNING id
"""
_EVICT = (f"DELETE FROM {TABLE} WHERE id IN (SELECT id FROM {TABLE} WHERE id <> %s "
          f"ORDER BY last_used, id LIMIT %s)")
_TOUCH = (f"UPDATE {TABLE} SET last_used = greatest({TABLE}.last_used, u.at) "
          f"FROM unnest(%s::bigint[], %s::float8[]) AS u(id, at) WHERE {TABLE}.id = u.id")
_COUNT = f"SELECT count(*) FROM {TABLE}"


class _VectorDumper(Dumper):
    """numpy vectors in pgvector's binary form: the dimension, a spare int16, float4s, all
    big-endian. Subclassed with the `vector` type's oid of the database."""

    format = Format.BINARY

    def dump(self, obj: np.ndarray) -> bytes:
        vector = np.asarray(obj, ">f4")
        return struct.pack(">HH", len(vector), 0) + vector.tobytes()


class _VectorLoader(Loader):
    format = Format.BINARY

    def load(self, data: Any) -> np.ndarray:
        (dims,) = struct.unpack_from(">H", data)
        return np.frombuffer(data, ">f4", dims, 4).astype(np.float32)


class PostgresStore:
    """A CacheStore in a PostgreSQL database with pgvector, shared by several server
    processes. Creates the extension, the table and its indexes if missing. A DSN that is
    wrong, or a server that cannot be reached, is a ValueError here, not on first use.
    `timeout` bounds connecting, and a request's wait for one of `max_connections`."""

    def __init__(self, dsn: str, *, max_connections: int = 4, timeout: float = 5.0) -> None:
        self.where = redacted(dsn)
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.Error as e:
            message = _one_line(e).replace(dsn, self.where)  # libpq may quote it
            raise ValueError(f"cache {self.where}: not a PostgreSQL DSN ({message})") from None
        params.setdefault("connect_timeout", max(2, round(timeout)))
        self._conninfo = make_conninfo(**params)
        try:
            with psycopg.connect(self._conninfo, autocommit=True) as conn:
                self._vector_oid, self._size = _prepare(conn)
        except psycopg.Error as e:
            raise ValueError(f"cache {self.where}: {_one_line(e)}") from None
        self._dumper = type("VectorDumper", (_VectorDumper,), {"oid": self._vector_oid})
        self._max_connections = max_connections
        self._timeout = timeout
        self._pool: AsyncConnectionPool | None = None
        self._pool_open = False
        self._touched: dict[int, float] = {}
        self._writing_touches: asyncio.Task[None] | None = None
        self._closed = False

    # --- CacheStore -------------------------------------------------------------------------

    def size(self) -> int:
        return self._size

    async def nearest(self, scope: str, vector: np.ndarray, *, k: int, min_similarity: float,
                      now: float, oldest: float) -> list[Match]:
        query = np.asarray(vector, np.float32)
        params = {"scope": scope, "now": now, "oldest": oldest, "dims": len(query),
                  "vector": query, "k": k}
        async with self._connection() as conn:
            deleted = (await conn.execute(_DELETE_DEAD_IN_SCOPE, params)).rowcount
            rows = await (await conn.execute(_NEAREST, params, binary=True)).fetchall()
        self._size = max(0, self._size - deleted)
        matches = []
        for row in rows:
            entry = _entry(row)
            similarity = float(np.dot(entry.vector, query))
            if similarity >= min_similarity:
                matches.append(Match(entry, similarity))
        matches.sort(key=lambda m: -m.similarity)
        return matches

    async def put(self, entry: Entry, *, max_entries: int) -> int:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        vector = np.asarray(entry.vector, np.float32)
        values = (entry.scope, text_hash(entry.text), entry.text, vector, len(vector),
                  entry.model, entry.answer, entry.finish_reason, entry.prompt_tokens,
                  entry.completion_tokens, entry.generation_seconds, entry.created,
                  entry.created, entry.expires)
        if self._writing_touches is not None:  # the eviction below goes by them
            await asyncio.shield(self._writing_touches)
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            await self._write_touches(conn)
            (id,) = await (await conn.execute(_UPSERT, values)).fetchone()  # type: ignore[misc]
            (count,) = await (await conn.execute(_COUNT)).fetchone()  # type: ignore[misc]
            evicted = 0
            if count > max_entries:
                evicted = (await conn.execute(_EVICT, (id, count - max_entries))).rowcount
        self._size = count - evicted
        return evicted

    async def touch(self, entry_id: int, now: float) -> None:
        self._touched[entry_id] = max(now, self._touched.get(entry_id, now))
        if self._writing_touches is None or self._writing_touches.done():
            self._writing_touches = asyncio.create_task(self._write_touches_behind())

    async def purge(self, *, now: float, oldest: float) -> int:
        async with self._connection() as conn, conn.transaction():
            purged = (await conn.execute(f"DELETE FROM {TABLE} WHERE expires <= %s "
                                         f"OR created < %s", (now, oldest))).rowcount
            (count,) = await (await conn.execute(_COUNT)).fetchone()  # type: ignore[misc]
        self._size = count  # the other replicas' puts too
        return purged

    async def close(self) -> None:
        if self._closed:
            return
        if self._writing_touches is not None:
            await asyncio.shield(self._writing_touches)
        if self._touched:
            await self._write_touches_behind()
        self._closed = True
        if self._pool is not None:
            await self._pool.close()

    # --- connections ------------------------------------------------------------------------

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        if self._closed:
            raise RuntimeError("the cache store is closed")
        if self._pool is None:  # opened on the event loop that uses it
            self._pool = AsyncConnectionPool(
                self._conninfo, min_size=1, max_size=self._max_connections, open=False,
                timeout=self._timeout, configure=self._configure, name="wasinn-cache",
                kwargs={"autocommit": True})
        if not self._pool_open:
            await self._pool.open()
            self._pool_open = True
        async with self._pool.connection() as conn:
            yield conn

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        conn.adapters.register_dumper(np.ndarray, self._dumper)
        conn.adapters.register_loader(self._vector_oid, _VectorLoader)

    async def _write_touches(self, conn: psycopg.AsyncConnection[Any]) -> None:
        touched, self._touched = self._touched, {}
        if touched:
            await conn.execute(_TOUCH, (list(touched), list(touched.values())))

    async def _write_touches_behind(self) -> None:
        """Last-use times, in batches: a hit does not wait for a write. They need no flush to
        disk (a crash loses only them, which shifts the LRU order a little)."""
        while self._touched:
            try:
                async with self._connection() as conn, conn.transaction():
                    await conn.execute("SET LOCAL synchronous_commit TO OFF")
                    await self._write_touches(conn)
            except Exception as e:
                log.warning("the semantic cache could not record entries' last use (%s: %s)",
                            type(e).__name__, _one_line(e))
                return


def _prepare(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """The schema, made if missing; the `vector` type's oid and the entries stored."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        exists, comment = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL, obj_description(to_regclass(%s), 'pg_class')",
            (TABLE, TABLE)).fetchone()  # type: ignore[misc]
        if not exists:
            conn.execute(_SCHEMA)
        elif comment != _COMMENT:
            raise psycopg.ProgrammingError(
                f"table {TABLE} is not a wasinn cache of schema {SCHEMA_VERSION} (its comment "
                f"is {comment!r}): drop it or use another database")
        (oid,) = conn.execute("SELECT 'vector'::regtype::oid").fetchone()  # type: ignore[misc]
        (count,) = conn.execute(_COUNT).fetchone()  # type: ignore[misc]
    return int(oid), int(count)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _entry(row: tuple[Any, ...]) -> Entry:
    (id, scope, text, vector, model, answer, finish, prompt, completion, seconds, created,
     expires) = row
    return Entry(scope=scope, text=text, vector=vector, model=model, answer=answer,
                 finish_reason=finish, prompt_tokens=prompt, completion_tokens=completion,
                 generation_seconds=seconds, created=created, expires=expires, id=id)
