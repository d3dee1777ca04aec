"""Which in-process vector index the semantic cache should use: build time, query latency and
recall at 10k and 100k unit vectors of 384 dimensions (all-MiniLM-L6-v2's), one query at a time
as the server asks them.

    python bench/cache_index.py            # about 5 minutes on 2 cores
    python bench/cache_index.py --quick    # 2k and 10k entries, a smoke run

Candidates: exact search with numpy (one float32 matrix-vector product), faiss's exact
IndexFlatIP, exact search over int8 rows with numkong (usearch's SIMD kernels, installed with
it), and HNSW graphs (M=16, efConstruction=128; faiss IndexHNSWFlat, hnswlib, usearch at f32
and i8) at two search depths `ef`. A library that is not installed is skipped.

Data: random unit vectors (the hardest case for a graph index: no clusters). Two query sets:
`near` are stored vectors with noise added (cosine about 0.95 to their source, a cache hit's
shape); `random` are fresh random vectors (a miss: nothing is near, the whole search runs).
A second table times wasinn's own SQLiteStore the same way (when wasinn is installed).
`recall` is the share of `near` queries whose top-1 is their source (what a graph loses is a
hit it does not find; a hit it finds is checked against the exact cosine anyway). Latency is
per single query, p50 and p99 over both sets; `build` adds every vector (the cache rebuilds its
index from SQLite at start).
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DIM = 384


@dataclass
class Result:
    name: str
    n: int
    build_s: float
    p50_us: float
    p99_us: float
    recall: float
    removes: bool


Search = Callable[[np.ndarray], int]  # one query (DIM,) -> the id of its nearest neighbour


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def make_data(n: int, queries: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    base = unit(rng.standard_normal((n, DIM), dtype=np.float32))
    sources = rng.choice(n, queries, replace=False)
    # noise of norm ~0.33 at 384-d: cosine ~0.95 to the source
    noise = rng.standard_normal((queries, DIM), dtype=np.float32) * (0.33 / np.sqrt(DIM))
    near = unit(base[sources] + noise)
    far = unit(rng.standard_normal((queries, DIM), dtype=np.float32))
    return base, sources, near, far


def numpy_exact(base: np.ndarray) -> Search:
    def search(q: np.ndarray) -> int:
        return int(np.argmax(base @ q))
    return search


def faiss_flat(base: np.ndarray) -> Search:
    import faiss
    index = faiss.IndexFlatIP(DIM)
    index.add(base)

    def search(q: np.ndarray) -> int:
        return int(index.search(q[None, :], 1)[1][0, 0])
    return search


def faiss_hnsw(base: np.ndarray) -> Search:
    import faiss
    index = faiss.IndexHNSWFlat(DIM, 16, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 128
    index.hnsw.efSearch = 64  # faiss cannot remove from an HNSW graph
    index.add(base)

    def search(q: np.ndarray) -> int:
        return int(index.search(q[None, :], 1)[1][0, 0])
    return search


def numkong_exact_i8(base: np.ndarray) -> Search:
    """Exact search over int8 rows (each scaled by its own largest component) with numkong's
    SIMD kernels (a dependency of usearch); the int8 scores pick the candidate."""
    import numkong
    scale = np.abs(base).max(axis=1) / 127
    rows = np.round(base / scale[:, None]).astype(np.int8)

    def search(q: np.ndarray) -> int:
        q8 = np.round(q * (127 / np.abs(q).max())).astype(np.int8)[None, :]
        dots = np.asarray(numkong.cdist(q8, rows, metric="dot", out_dtype="float32"))[0]
        return int(np.argmax(dots * scale))
    return search


def hnswlib_hnsw(ef: int) -> Callable[[np.ndarray], Search]:
    def build(base: np.ndarray) -> Search:
        import hnswlib
        index = hnswlib.Index(space="ip", dim=DIM)
        index.init_index(max_elements=len(base), M=16, ef_construction=128)
        index.add_items(base, np.arange(len(base)), num_threads=os.cpu_count() or 1)
        index.set_ef(ef)

        def search(q: np.ndarray) -> int:
            return int(index.knn_query(q, k=1, num_threads=1)[0][0, 0])
        return search
    return build


def usearch_hnsw(dtype: str, ef: int) -> Callable[[np.ndarray], Search]:
    def build(base: np.ndarray) -> Search:
        from usearch.index import Index
        index = Index(ndim=DIM, metric="ip", dtype=dtype, connectivity=16, expansion_add=128,
                      expansion_search=ef)
        index.add(np.arange(len(base)), base, threads=os.cpu_count() or 1)

        def search(q: np.ndarray) -> int:
            return int(index.search(q, 1, threads=1).keys[0])
        return search
    return build


CANDIDATES: list[tuple[str, str, Callable[[np.ndarray], Search], bool]] = [
    # name, the module it needs, builder, whether it can remove an entry in place
    ("numpy exact f32", "numpy", numpy_exact, True),
    ("faiss IndexFlatIP", "faiss", faiss_flat, False),
    ("faiss HNSWFlat", "faiss", faiss_hnsw, False),
    ("numkong exact i8", "numkong", numkong_exact_i8, True),
    ("hnswlib ef=64", "hnswlib", hnswlib_hnsw(64), True),
    ("hnswlib ef=256", "hnswlib", hnswlib_hnsw(256), True),
    ("usearch f32 ef=64", "usearch", usearch_hnsw("f32", 64), True),
    ("usearch i8 ef=64", "usearch", usearch_hnsw("i8", 64), True),
    ("usearch i8 ef=256", "usearch", usearch_hnsw("i8", 256), True),
]


def available(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def measure(name: str, builder: Callable[[np.ndarray], Search], removes: bool,
            data: tuple[np.ndarray, ...]) -> Result:
    base, sources, near, far = data
    gc.collect()
    start = time.perf_counter()
    search = builder(base)
    build = time.perf_counter() - start
    for q in near[:20]:  # warm up
        search(q)
    times = []
    found = 0
    for q, source in zip(near, sources):
        t = time.perf_counter()
        got = search(q)
        times.append(time.perf_counter() - t)
        found += got == source
    for q in far:
        t = time.perf_counter()
        search(q)
        times.append(time.perf_counter() - t)
    us = np.array(times) * 1e6
    return Result(name, len(base), build, float(np.percentile(us, 50)),
                  float(np.percentile(us, 99)), found / len(near), removes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2k and 10k entries, fewer queries")
    parser.add_argument("--queries", type=int, default=1000, help="queries per set (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = (2_000, 10_000) if args.quick else (10_000, 100_000)
    queries = 200 if args.quick else args.queries
    print(f"{os.cpu_count()} CPUs; {DIM}-d random unit vectors; {queries} near + {queries} "
          f"random single queries per size\n")
    print("| index | entries | build s | query p50 us | query p99 us | recall@1 near | "
          "removes |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        data = make_data(n, queries, np.random.default_rng(args.seed))
        for name, module, builder, removes in CANDIDATES:
            if not available(module):
                print(f"| {name} | {n:,} | not installed | | | | |")
                continue
            r = measure(name, builder, removes, data)
            print(f"| {r.name} | {r.n:,} | {r.build_s:.2f} | {r.p50_us:,.0f} | {r.p99_us:,.0f} "
                  f"| {r.recall:.3f} | {'yes' if r.removes else 'no'} |", flush=True)
    if available("wasinn.cache"):
        store_table(sizes, queries, args.seed)
    return 0


def store_table(sizes: tuple[int, ...], queries: int, seed: int) -> None:
    """wasinn's own store end to end (no embedding): SQLiteStore.nearest in one scope, the
    int8 search plus the float32 check from SQLite on a hit, and the index rebuilt at open."""
    import asyncio
    import tempfile
    from pathlib import Path

    from wasinn.cache import Entry, SQLiteStore

    print("\n| SQLiteStore, one scope | entries | fill s | reopen s | hit p50 us | hit p99 us | "
          "miss p50 us | miss p99 us |")
    print("|---|---|---|---|---|---|---|---|")

    async def fill(path: Path, base: np.ndarray) -> float:
        store = SQLiteStore(path)
        now = time.time()
        start = time.perf_counter()
        for i in range(0, len(base), 1000):  # as fast as it goes: many puts at a time
            await asyncio.gather(*(store.put(Entry(
                scope="s", text=f"question {j}", vector=base[j], model="m",
                answer=f"answer {j}", finish_reason="stop", prompt_tokens=10,
                completion_tokens=20, generation_seconds=1.0, created=now,
                expires=now + 3600), max_entries=len(base))
                for j in range(i, min(len(base), i + 1000))))
        took = time.perf_counter() - start
        await store.close()
        return took

    async def look(store: SQLiteStore, queries: np.ndarray) -> list[float]:
        times = []
        for q in queries:
            now = time.time()
            t = time.perf_counter()
            await store.nearest("s", q, k=1, min_similarity=0.9, now=now, oldest=now - 3600)
            times.append(time.perf_counter() - t)
        return times

    async def reopen_and_look(path: Path, near: np.ndarray,
                              far: np.ndarray) -> tuple[float, list[float], list[float]]:
        start = time.perf_counter()
        store = SQLiteStore(path)
        reopen = time.perf_counter() - start
        await look(store, near[:20])
        hits, misses = await look(store, near), await look(store, far)
        await store.close()
        return reopen, hits, misses

    for n in sizes:
        base, _, near, far = make_data(n, queries, np.random.default_rng(seed))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.sqlite"
            filled = asyncio.run(fill(path, base))
            reopen, hits, misses = asyncio.run(reopen_and_look(path, near, far))
            h, m = np.array(hits) * 1e6, np.array(misses) * 1e6
            print(f"| int8 exact + SQLite | {n:,} | {filled:.1f} | {reopen:.2f} | "
                  f"{np.percentile(h, 50):,.0f} | {np.percentile(h, 99):,.0f} | "
                  f"{np.percentile(m, 50):,.0f} | {np.percentile(m, 99):,.0f} |", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
