"""A semantic cache for `wasinn serve`: answers rewordings of earlier questions from a store.

    from wasinn.cache import SemanticCache, SQLiteStore
    cache = SemanticCache(completer, embedder, "minilm", SQLiteStore("cache.sqlite"))

`SemanticCache` is a Completer in front of another one. What it keeps goes to a `CacheStore`:
`SQLiteStore` (a SQLite file and an in-process vector index) is the embedded one.
"""

from ._cache import (CACHEABLE_FINISH, DEFAULT_MAX_ENTRIES, DEFAULT_THRESHOLD, DEFAULT_TTL,
                     SIMILARITY_HEADER, STATUS_HEADER, CacheConfig, SemanticCache, pieces,
                     registry_versions)
from ._scope import TENANT_HEADER, cache_mode, question_text, scope
from ._sqlite import SQLiteStore
from ._store import CacheStore, Entry, Match

__all__ = ["CACHEABLE_FINISH", "DEFAULT_MAX_ENTRIES", "DEFAULT_THRESHOLD", "DEFAULT_TTL",
           "SIMILARITY_HEADER", "STATUS_HEADER", "TENANT_HEADER", "CacheConfig", "CacheStore",
           "Entry", "Match", "SQLiteStore", "SemanticCache", "cache_mode", "pieces",
           "question_text", "registry_versions", "scope"]
