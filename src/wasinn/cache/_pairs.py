"""The labelled pairs of ../shared/datasets and the protocol that scores a cache on them (see
_eval.py). Standard library only: scripts/train_verifier.py loads this file by path, so a
training machine needs neither the server extra nor wasmtime."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


# --- the data ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    label: int


def load_pairs(path: Path) -> list[Pair]:
    """JSON lines of {"a": text, "b": text, "label": 0|1}, gzip'd or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    pairs = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    a, b, label = row["a"], row["b"], row["label"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{number}: not a pair "
                                     f'{{"a": ..., "b": ..., "label": 0|1}} ({e})') from None
                if not isinstance(a, str) or not isinstance(b, str) or label not in (0, 1):
                    raise ValueError(f"{path}:{number}: a and b must be texts, label 0 or 1")
                pairs.append(Pair(a, b, int(label)))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


class _Union:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        parent = self.parent
        root = parent.setdefault(x, x)
        while root != parent[root]:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def join(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def duplicate_groups(pairs: Sequence[Pair]) -> dict[str, str]:
    """Text -> its duplicate group: components over the label-1 pairs."""
    union = _Union()
    for p in pairs:
        union.find(p.a), union.find(p.b)
        if p.label:
            union.join(p.a, p.b)
    return {t: union.find(t) for t in union.parent}


def parts_of(pairs: Sequence[Pair], parts: int) -> list[int]:
    """Each pair's part out of `parts`, by a stable hash of its component over all pairs: a
    text never falls in two parts (scripts/train_verifier.py trains on parts 1-3 of 4)."""
    union = _Union()
    for p in pairs:
        union.join(p.a, p.b)
    return [int(hashlib.sha256(union.find(p.a).encode()).hexdigest(), 16) % parts
            for p in pairs]


def score(pairs: Sequence[Pair], groups: dict[str, str],
          served: Sequence[str | None]) -> tuple[float, float, int]:
    """(precision, recall, hits) of the entries served to each pair's `b` (None: a miss)."""
    stored = {groups[p.a] for p in pairs}
    hits = right = wanted = found = 0
    for p, entry in zip(pairs, served):
        is_right = entry is not None and groups[entry] == groups[p.b]
        if p.label and groups[p.b] in stored:
            wanted += 1
            found += is_right
        if entry is not None:
            hits += 1
            right += is_right
    return (right / hits if hits else 1.0), (found / wanted if wanted else 0.0), hits


