"""SemanticCache: a Completer in front of another that answers rewordings of earlier questions.

    store = SQLiteStore("~/.cache/wasinn/cache.sqlite")
    cache = SemanticCache(local, embedder, "minilm", store, threshold=0.95)
    app = create_app(host, completer=cache)

A request's last user message (or prompt) is embedded; the nearest stored question of the same
scope (tenant, model, sampling, earlier conversation: see _scope.py) answers if its cosine
similarity reaches the threshold. With a `Verifier` (the second stage, _verify.py), the few
nearest at or above the threshold are read together with the question by a cross-encoder,
and the most probable one answers if the verifier accepts it. Otherwise the inner completer answers and, when the answer
came whole, it is stored. The cache never breaks a request: if the embedder or the store fails,
the inner completer answers and the failure is logged and counted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import WasiNnError
from ..registry import Registry
from ..server._api import Completer, Completion, Embedder, GenerationRequest, TextStream
from ..server._metrics import Metrics
from ._scope import CacheMode, cache_mode, question_text, scope
from ._store import CacheStore, Entry, Match
from ._verify import CANDIDATES, DEFAULT_VERIFY_THRESHOLD, Verifier

log = logging.getLogger("wasinn.cache")

#: response headers
STATUS_HEADER = "x-semantic-cache"
SIMILARITY_HEADER = "x-semantic-cache-similarity"
VERIFIED_HEADER = "x-semantic-cache-verified"

#: cosine alone (no verifier): precision 0.906 at recall 0.348 on the held-out quarter of the
#: QQP dev pairs (`wasinn cache eval`; README); with the verifier the floor is 0.85
DEFAULT_THRESHOLD = 0.95
DEFAULT_TTL = 7 * 24 * 3600.0
DEFAULT_MAX_ENTRIES = 100_000
#: answers kept: both end a whole answer (`length` is what max_tokens, part of the scope, asked)
CACHEABLE_FINISH = ("stop", "length")
#: how often dead entries of scopes nobody asks are swept
_PURGE_EVERY = 60.0
#: a replayed word longer than this is sent in several pieces
_MAX_PIECE = 16

_LOOKUP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class CacheConfig:
    """What `create_app(cache=...)` and `wasinn serve --cache` set up."""

    #: a SQLite file, or a PostgreSQL DSN (a str: `postgresql://...`) that replicas share
    path: Path | str
    threshold: float = DEFAULT_THRESHOLD
    ttl: float = DEFAULT_TTL
    max_entries: int = DEFAULT_MAX_ENTRIES
    #: None: the server's --embedding-model, else the first model its embedder offers
    embedding_model: str | None = None
    #: the second stage's cross-encoder (an ONNX file, see _verify.py); None: cosine alone
    verifier: Path | None = None
    verify_threshold: float = DEFAULT_VERIFY_THRESHOLD

    def __post_init__(self) -> None:
        check(self.threshold, self.ttl, self.max_entries)
        if not 0.0 < self.verify_threshold < 1.0:
            raise ValueError(f"verify threshold must be in (0, 1), got {self.verify_threshold}")


def check(threshold: float, ttl: float, max_entries: int) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if not ttl > 0:
        raise ValueError(f"cache TTL must be positive, got {ttl}")
    if max_entries < 1:
        raise ValueError(f"cache max entries must be at least 1, got {max_entries}")


class _CacheMetrics:
    def __init__(self, metrics: Metrics, store: CacheStore) -> None:
        self.hits = metrics.counter("wasinn_cache_hits_total",
                                    "Requests answered from the semantic cache.")
        self.misses = metrics.counter("wasinn_cache_misses_total",
                                      "Requests looked up in the semantic cache and not found.")
        self.bypasses = metrics.counter(
            "wasinn_cache_bypasses_total",
            "Requests not looked up: Cache-Control no-cache or no-store, or no question.")
        metrics.gauge("wasinn_cache_hit_ratio", "Hits / (hits + misses) since start.",
                      read=self.ratio)
        self.tokens_saved = metrics.counter(
            "wasinn_cache_tokens_saved_total", "Tokens of the answers served from cache "
            "(the prompt's and the completion's, as counted when they were generated).",
            ("type",))
        self.seconds_saved = metrics.counter(
            "wasinn_cache_seconds_saved_total",
            "Generation time of the answers served from cache, as measured when generated.")
        self.stored = metrics.counter("wasinn_cache_stores_total", "Answers stored.")
        self.evictions = metrics.counter(
            "wasinn_cache_evictions_total", "Entries evicted by the cap (least recently used).")
        self.expired = metrics.counter("wasinn_cache_expired_total",
                                       "Entries deleted by the periodic TTL sweep.")
        self.errors = metrics.counter(
            "wasinn_cache_errors_total", "Embedder, store or verifier failures (the request "
            "went on without the cache).", ("stage",))
        self.rejections = metrics.counter(
            "wasinn_cache_verifier_rejections_total",
            "Lookups whose candidates all failed the verifier (counted as misses too).")
        metrics.gauge("wasinn_cache_entries", "Entries in the semantic cache.", read=store.size)
        self.lookup = metrics.histogram(
            "wasinn_cache_lookup_seconds", "Embedding plus nearest-neighbour search.",
            buckets=_LOOKUP_BUCKETS)
        # counters show 0 from the start, not only once they have counted
        for counter in (self.hits, self.misses, self.bypasses, self.seconds_saved, self.stored,
                        self.evictions, self.expired, self.rejections):
            counter.inc(0)
        for kind in ("prompt", "completion"):
            self.tokens_saved.inc(0, type=kind)

    def ratio(self) -> float:
        hits, misses = self.hits.value(), self.misses.value()
        return hits / (hits + misses) if hits + misses else 0.0


class SemanticCache:
    """A Completer that answers from `store` when a near-enough question was answered before,
    and otherwise asks `inner` (and stores whole answers)."""

    def __init__(self, inner: Completer, embedder: Embedder, embedding_model: str,
                 store: CacheStore, *, threshold: float = DEFAULT_THRESHOLD,
                 ttl: float = DEFAULT_TTL, max_entries: int = DEFAULT_MAX_ENTRIES,
                 metrics: Metrics | None = None,
                 model_version: Callable[[str], str] | None = None,
                 verifier: Verifier | None = None) -> None:
        check(threshold, ttl, max_entries)
        self.inner = inner
        self.embedder = embedder
        self.embedding_model = embedding_model
        self.store = store
        self.threshold = threshold
        self.ttl = ttl
        self.max_entries = max_entries
        self._metrics = _CacheMetrics(metrics if metrics is not None else Metrics(), store)
        self._model_version = model_version or (lambda model: "")
        self.verifier = verifier
        self._last_purge = 0.0

    def models(self) -> Sequence[str]:
        return self.inner.models()

    async def close(self) -> None:
        """Closes the store and the verifier (the inner completer and the embedder are the
        caller's)."""
        await self.store.close()
        if self.verifier is not None:
            self.verifier.close()

    # --- Completer --------------------------------------------------------------------------

    async def complete(self, request: GenerationRequest) -> Completion:
        mode = cache_mode(request.caller)
        found = await self._lookup(request, mode)
        if isinstance(found, Completion):
            return found
        start = time.perf_counter()
        completion = await self.inner.complete(request)
        seconds = time.perf_counter() - start
        await self._save(request, mode, found, completion, seconds)
        status = "MISS" if mode == "use" and found is not None else "BYPASS"
        return dataclasses.replace(completion,
                                   headers={**completion.headers, STATUS_HEADER: status})

    async def stream(self, request: GenerationRequest) -> TextStream:
        mode = cache_mode(request.caller)
        found = await self._lookup(request, mode)
        if isinstance(found, Completion):
            return TextStream(_replay(found), headers=found.headers)
        start = time.perf_counter()
        inner = await self.inner.stream(request)
        status = "MISS" if mode == "use" and found is not None else "BYPASS"
        return TextStream(self._recorded(inner, request, mode, found, start),
                          headers={**inner.headers, STATUS_HEADER: status})

    # --- lookup and store -------------------------------------------------------------------

    async def _lookup(self, request: GenerationRequest,
                      mode: CacheMode) -> Completion | _Asked | None:
        """A hit as a Completion; or what was learned on the way to a miss (the question and
        its vector, for storing the answer); None when the cache was not asked."""
        if mode != "use":
            self._metrics.bypasses.inc()
            return None
        start = time.perf_counter()
        asked = await self._ask(request)
        if asked is None:
            self._metrics.bypasses.inc()
            return None
        now = time.time()
        try:
            await self._maybe_purge(now)
            matches = await self.store.nearest(
                asked.scope, asked.vector, k=1 if self.verifier is None else CANDIDATES,
                min_similarity=self.threshold, now=now, oldest=now - self.ttl)
        except Exception:
            log.exception("the semantic cache's store failed a lookup")
            self._metrics.errors.inc(stage="lookup")
            self._metrics.lookup.observe(time.perf_counter() - start)
            return None
        verified: float | None = None
        if matches and self.verifier is not None:
            try:
                chosen = await self._verify(asked.text, matches)
            except Exception:  # never serve what was not checked
                log.exception("the semantic cache's verifier failed")
                self._metrics.errors.inc(stage="verify")
                chosen = None
            if chosen is None:
                self._metrics.rejections.inc()
                matches = []
            else:
                matches, verified = [chosen[0]], chosen[1]
        self._metrics.lookup.observe(time.perf_counter() - start)
        if not matches:
            self._metrics.misses.inc()
            return asked
        return await self._hit(request, matches[0], now, verified)

    async def _verify(self, question: str,
                      matches: Sequence[Match]) -> tuple[Match, float] | None:
        """The candidate the verifier finds most probable, if it accepts it. The very same
        question, stored in the same scope, needs no reading."""
        assert self.verifier is not None
        for match in matches:
            if match.entry.text == question:
                return match, 1.0
        probabilities = await self.verifier.check(
            question, [(m.entry.text, m.similarity) for m in matches])
        best = int(np.argmax(probabilities))
        p = float(probabilities[best])
        return (matches[best], p) if p >= self.verifier.threshold else None

    async def _ask(self, request: GenerationRequest) -> _Asked | None:
        """The request's question, embedded; None if it has none or the embedder failed."""
        text = question_text(request)
        if text is None:
            return None
        try:
            embedded = await self.embedder.embed(self.embedding_model, [text])
        except Exception as e:
            log.warning("the semantic cache could not embed a question (%s: %s); answering "
                        "without the cache", type(e).__name__, e)
            self._metrics.errors.inc(stage="embed")
            return None
        vector = np.asarray(embedded.vectors[0], np.float32)
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm) or norm == 0.0:
            self._metrics.errors.inc(stage="embed")
            return None
        key = scope(request, embedding_model=self.embedding_model, dimensions=len(vector),
                    model_version=self._model_version(request.model))
        return _Asked(text, key, vector / norm)

    async def _hit(self, request: GenerationRequest, match: Match, now: float,
                   verified: float | None = None) -> Completion:
        entry = match.entry
        self._metrics.hits.inc()
        self._metrics.tokens_saved.inc(entry.prompt_tokens, type="prompt")
        self._metrics.tokens_saved.inc(entry.completion_tokens, type="completion")
        self._metrics.seconds_saved.inc(max(entry.generation_seconds, 0.0))
        if entry.id is not None:
            try:
                await self.store.touch(entry.id, now)
            except Exception:  # only the LRU order suffers
                log.exception("the semantic cache's store failed to mark an entry used")
                self._metrics.errors.inc(stage="touch")
        # the similarity is floored so that a hit never shows more than it had
        similarity = int(match.similarity * 10_000) / 10_000
        headers = {STATUS_HEADER: "HIT", SIMILARITY_HEADER: f"{similarity:.4f}"}
        if verified is not None:
            headers[VERIFIED_HEADER] = f"{int(verified * 10_000) / 10_000:.4f}"
        return Completion(model=request.model, text=entry.answer,
                          finish_reason=entry.finish_reason,  # type: ignore[arg-type]
                          prompt_tokens=entry.prompt_tokens,
                          completion_tokens=entry.completion_tokens, headers=headers)

    async def _save(self, request: GenerationRequest, mode: CacheMode, asked: _Asked | None,
                    completion: Completion, seconds: float) -> None:
        if mode == "off" or completion.finish_reason not in CACHEABLE_FINISH:
            return
        if asked is None:
            if mode != "refresh":
                return  # no question, or the embedder failed on it
            asked = await self._ask(request)
            if asked is None:
                return
        now = time.time()
        entry = Entry(scope=asked.scope, text=asked.text, vector=asked.vector,
                      model=completion.model, answer=completion.text,
                      finish_reason=completion.finish_reason,
                      prompt_tokens=completion.prompt_tokens,
                      completion_tokens=completion.completion_tokens,
                      generation_seconds=seconds, created=now, expires=now + self.ttl)
        try:
            evicted = await self.store.put(entry, max_entries=self.max_entries)
        except Exception:
            log.exception("the semantic cache's store failed to store an answer")
            self._metrics.errors.inc(stage="store")
            return
        self._metrics.stored.inc()
        if evicted:
            self._metrics.evictions.inc(evicted)

    async def _maybe_purge(self, now: float) -> None:
        if now - self._last_purge < _PURGE_EVERY:
            return
        self._last_purge = now
        purged = await self.store.purge(now=now, oldest=now - self.ttl)
        if purged:
            self._metrics.expired.inc(purged)

    async def _recorded(self, inner: TextStream, request: GenerationRequest, mode: CacheMode,
                        asked: _Asked | None, start: float) -> AsyncIterator[str | Completion]:
        """The inner stream passed through; stored once it has ended whole. A stream cut short
        (the client left) or failed ends without its Completion and is not stored."""
        try:
            async for piece in inner:
                yield piece
            completion = inner.completion
            if completion is None:
                return
            await self._save(request, mode, asked, completion, time.perf_counter() - start)
            yield completion
        finally:
            await inner.aclose()


@dataclass(frozen=True)
class _Asked:
    """A question on its way to a miss: kept to store the answer under."""

    text: str
    scope: str
    vector: np.ndarray


_WORD = re.compile(r"\s*\S+|\s+")


def pieces(text: str) -> list[str]:
    """A cached answer cut as a model would send it: word by word (a word keeps the spaces
    before it), long words in several pieces. The pieces join to the text exactly."""
    out = []
    for word in _WORD.findall(text):
        out.extend(word[i:i + _MAX_PIECE] for i in range(0, len(word), _MAX_PIECE))
    return out


async def _replay(completion: Completion) -> AsyncIterator[str | Completion]:
    for piece in pieces(completion.text):
        yield piece
        await asyncio.sleep(0)
    yield completion


def registry_versions(registry: Registry) -> Callable[[str], str]:
    """Which file each of a registry's models is (paths, sizes, modification times), for the
    scope: a different model under the same name never gets the old one's answers. Models the
    registry does not hold (an upstream's) are known by name only."""
    known: dict[str, str] = {}

    def version(model: str) -> str:
        if model not in known:
            try:
                spec = registry.spec(model)
            except WasiNnError:
                return ""
            parts = [spec.encoding.name, spec.target.name]
            files = list(spec.paths)
            if spec.directory is not None:
                files += sorted(p for p in spec.directory.iterdir() if p.is_file())
            for path in files:
                try:
                    st = path.stat()
                    parts.append(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}")
                except OSError:
                    parts.append(str(path))
            known[model] = "|".join(parts)
        return known[model]

    return version
