"""`wasinn cache eval DATASET`: the semantic cache on a labelled pair set, as it serves.

The protocol (../shared/datasets/README.md): store every distinct `a` with an answer of its
own, then look up every `b`. A hit is right when the entry served is in the query's duplicate
group (connected components over the label-1 pairs), wrong otherwise; precision is right hits
over hits, recall is right hits over the label-1 queries whose group has a stored entry.

What runs is the server's own path: the embedding model on the Host's backend, a real
SQLiteStore (a temporary file), and the Verifier when there is one; each lookup (embed one
question, search, verify) is timed. Candidates are recorded once at the lowest threshold,
so one pass gives the whole sweep.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._pairs import Pair, duplicate_groups, score
from ._sqlite import SQLiteStore
from ._store import Entry
from ._verify import CANDIDATES, Verifier

COSINE_SWEEP = (0.80, 0.85, 0.88, 0.90, 0.92, 0.93, 0.95, 0.97)
VERIFY_SWEEP = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_SCOPE = "eval"


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Lookup:
    """One query's candidates: (stored text, cosine, verifier probability or None)."""

    candidates: list[tuple[str, float, float | None]]
    search_seconds: float  # embed + nearest
    verify_seconds: float


@dataclass
class Report:
    dataset: str
    pairs: int
    stored: int
    embedding_model: str
    verifier: str | None
    floor: float
    cosine: list[tuple[float, float, float, int]] = field(default_factory=list)
    verified: list[tuple[float, float, float, int]] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)
    store_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Embed = Callable[[list[str]], np.ndarray]


async def _run(pairs: Sequence[Pair], embed: Embed, verifier: Verifier | None, floor: float,
               directory: Path) -> tuple[list[Lookup], float, int]:
    texts = sorted({p.a for p in pairs})
    store = SQLiteStore(directory / "eval.sqlite")
    try:
        start = time.perf_counter()
        now = time.time()
        for at in range(0, len(texts), 256):
            chunk = texts[at:at + 256]
            for text, vector in zip(chunk, embed(chunk)):
                await store.put(Entry(scope=_SCOPE, text=text, vector=vector, model="eval",
                                      answer=text, finish_reason="stop", prompt_tokens=0,
                                      completion_tokens=0, generation_seconds=0.0,
                                      created=now, expires=now + 86400.0),
                                max_entries=len(texts) + 1)
        stored_in = time.perf_counter() - start
        lookups = []
        lowest = min(min(COSINE_SWEEP), floor)
        for p in pairs:
            t0 = time.perf_counter()
            vector = embed([p.b])[0]
            matches = await store.nearest(_SCOPE, vector, k=CANDIDATES, min_similarity=lowest,
                                          now=now, oldest=0.0)
            t1 = time.perf_counter()
            found = [(m.entry.text, m.similarity) for m in matches]
            checked = [c for c in found if c[1] >= floor]
            probabilities: list[float | None] = [None] * len(found)
            if verifier is not None and checked:
                got = await verifier.check(p.b, checked)
                probabilities[:len(checked)] = [float(x) for x in got]  # nearest first
            t2 = time.perf_counter()
            lookups.append(Lookup([(t, c, pr) for (t, c), pr in zip(found, probabilities)],
                                  t1 - t0, t2 - t1))
    finally:
        await store.close()
    return lookups, stored_in, len(texts)


def evaluate(pairs: Sequence[Pair], embed: Embed, *, embedding_model: str,
             verifier: Verifier | None, floor: float, dataset: str = "") -> Report:
    """The protocol on `pairs`, every lookup through a real store (and the verifier)."""
    groups = duplicate_groups(pairs)
    with tempfile.TemporaryDirectory(prefix="wasinn-eval-") as tmp:
        lookups, stored_in, stored = asyncio.run(_run(pairs, embed, verifier, floor, Path(tmp)))
    report = Report(dataset=dataset, pairs=len(pairs), stored=stored,
                    embedding_model=embedding_model,
                    verifier=None if verifier is None else str(verifier.path), floor=floor,
                    store_seconds=round(stored_in, 1))
    for t in COSINE_SWEEP:
        served = [lk.candidates[0][0] if lk.candidates and lk.candidates[0][1] >= t else None
                  for lk in lookups]
        report.cosine.append((t, *score(pairs, groups, served)))
    if verifier is not None:
        for v in VERIFY_SWEEP:
            served = []
            for lk in lookups:
                ok = [(pr, t) for t, c, pr in lk.candidates if pr is not None and pr >= v]
                served.append(max(ok)[1] if ok else None)
            report.verified.append((v, *score(pairs, groups, served)))
    search = [lk.search_seconds * 1e3 for lk in lookups]
    total = [(lk.search_seconds + lk.verify_seconds) * 1e3 for lk in lookups]
    report.latency_ms = {"search_p50": _pct(search, 50), "search_p99": _pct(search, 99),
                         "total_p50": _pct(total, 50), "total_p99": _pct(total, 99)}
    return report


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if values else 0.0


def format_report(report: Report) -> str:
    lines = [f"{report.dataset}: {report.pairs:,} pairs, {report.stored:,} stored questions "
             f"(embedded and stored in {report.store_seconds} s); embeddings: "
             f"{report.embedding_model}",
             "", "cosine alone (the nearest stored question serves if its cosine >= t):",
             f"  {'t':>5}  {'hits':>6}  {'precision':>9}  {'recall':>6}"]
    lines += [f"  {t:5.2f}  {h:6,}  {p:9.3f}  {r:6.3f}" for t, p, r, h in report.cosine]
    if report.verifier is not None:
        lines += ["", f"with the verifier {report.verifier}: the {CANDIDATES} nearest with "
                      f"cosine >= {report.floor} are read; the most probable serves if its "
                      f"probability >= p:",
                  f"  {'p':>5}  {'hits':>6}  {'precision':>9}  {'recall':>6}"]
        lines += [f"  {v:5.2f}  {h:6,}  {p:9.3f}  {r:6.3f}" for v, p, r, h in report.verified]
    ms = report.latency_ms
    lines += ["", f"lookup latency (one question at a time): embed + search p50 "
                  f"{ms['search_p50']:.2f} ms, p99 {ms['search_p99']:.2f} ms"]
    if report.verifier is not None:
        lines.append(f"  with the verifier: p50 {ms['total_p50']:.2f} ms, "
                     f"p99 {ms['total_p99']:.2f} ms")
    return "\n".join(lines)

