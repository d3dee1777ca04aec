"""A semantic cache for `wasinn serve`: answers rewordings of earlier questions from a store.

    from wasinn.cache import SemanticCache, SQLiteStore
    cache = SemanticCache(completer, embedder, "minilm", SQLiteStore("cache.sqlite"))

`SemanticCache` is a Completer in front of another one. What it keeps goes to a `CacheStore`:
`SQLiteStore` (a SQLite file and an in-process vector index) is the embedded one;
`PostgresStore` (PostgreSQL with pgvector, the `postgres` extra) is shared by several servers.
`open_store(location)` opens either, from a file path or a `postgresql://` DSN.
"""

from ._cache import (CACHEABLE_FINISH, DEFAULT_MAX_ENTRIES, DEFAULT_THRESHOLD, DEFAULT_TTL,
                     SIMILARITY_HEADER, STATUS_HEADER, VERIFIED_HEADER, CacheConfig,
                     SemanticCache, pieces, registry_versions)
from ._scope import TENANT_HEADER, cache_mode, question_text, scope
from ._sqlite import SQLiteStore
from ._store import CacheStore, Entry, Match, is_dsn, open_store, redacted
from ._verify import (DEFAULT_VERIFIER, DEFAULT_VERIFY_THRESHOLD, VERIFIED_COSINE_FLOOR,
                      Verifier)

__all__ = ["CACHEABLE_FINISH", "DEFAULT_MAX_ENTRIES", "DEFAULT_THRESHOLD", "DEFAULT_TTL",
           "DEFAULT_VERIFIER", "DEFAULT_VERIFY_THRESHOLD", "SIMILARITY_HEADER", "STATUS_HEADER",
           "TENANT_HEADER", "VERIFIED_COSINE_FLOOR", "VERIFIED_HEADER", "CacheConfig",
           "CacheStore", "Entry", "Match", "SQLiteStore", "SemanticCache", "Verifier",
           "cache_mode", "is_dsn", "open_store", "pieces", "question_text", "redacted",
           "registry_versions", "scope"]


def __getattr__(name: str) -> object:
    # PostgresStore is imported on demand (and left out of __all__): psycopg is an extra
    if name == "PostgresStore":
        from ._postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
