"""Prometheus text exposition (format 0.0.4) from a registry the server owns: no global state.

Other parts add their own families to the same registry (`metrics.counter(...)`), and /metrics
shows them all, in the order they were made.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: request durations, seconds: from a cache hit (ms) to a long generation (minutes)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)

Labels = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Family:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> Labels:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def samples(self) -> Iterable[str]:
        raise NotImplementedError

    def render(self) -> str:
        head = f"# HELP {self.name} {self.help}\n# TYPE {self.name} {self.kind}\n"
        return head + "".join(line + "\n" for line in self.samples())


class Counter(_Family):
    """A value that only goes up (requests, tokens), one per combination of label values."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterable[str]:
        with self._lock:
            items = sorted(self._values.items())
        for key, value in items:
            yield f"{self.name}{_labels(self.labelnames, key)} {_format(value)}"


class Gauge(_Family):
    """A value that goes up and down, or one computed when scraped (`read`, unlabelled)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (),
                 read: Callable[[], float] | None = None) -> None:
        super().__init__(name, help, labelnames)
        if read is not None and labelnames:
            raise ValueError("a computed gauge has no labels")
        self._read = read
        self._values: dict[Labels, float] = {}

    def add(self, amount: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = value

    def samples(self) -> Iterable[str]:
        if self._read is not None:
            yield f"{self.name} {_format(self._read())}"
            return
        with self._lock:
            items = sorted(self._values.items())
        for key, value in items:
            yield f"{self.name}{_labels(self.labelnames, key)} {_format(value)}"


class Histogram(_Family):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = DURATION_BUCKETS) -> None:
        super().__init__(name, help, labelnames)
        self.buckets = tuple(sorted(buckets))
        self._counts: dict[Labels, list[int]] = {}
        self._sums: dict[Labels, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
                    break
            else:
                counts[-1] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def samples(self) -> Iterable[str]:
        with self._lock:
            items = sorted((k, list(c), self._sums[k]) for k, c in self._counts.items())
        for key, counts, total in items:
            running = 0
            for bound, n in zip((*self.buckets, math.inf), counts):
                running += n
                le = f'le="{_format(bound)}"'
                yield f"{self.name}_bucket{_labels(self.labelnames, key, le)} {running}"
            yield f"{self.name}_sum{_labels(self.labelnames, key)} {_format(total)}"
            yield f"{self.name}_count{_labels(self.labelnames, key)} {running}"


class Metrics:
    """A registry of metric families, rendered together as Prometheus text."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}

    def _add(self, family: _Family) -> _Family:
        if family.name in self._families:
            raise ValueError(f"metric {family.name} made twice")
        self._families[family.name] = family
        return family

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help, labelnames))  # type: ignore[return-value]

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = (),
              read: Callable[[], float] | None = None) -> Gauge:
        return self._add(Gauge(name, help, labelnames, read))  # type: ignore[return-value]

    def histogram(self, name: str, help: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = DURATION_BUCKETS) -> Histogram:
        return self._add(Histogram(name, help, labelnames, buckets))  # type: ignore[return-value]

    def render(self) -> str:
        return "".join(f.render() for f in self._families.values())


class ServerMetrics(Metrics):
    """The families every request feeds: counts, tokens and durations per route and model."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = self.counter(
            "wasinn_requests_total", "Requests answered, by route, model and HTTP status.",
            ("route", "model", "status"))
        self.prompt_tokens = self.counter(
            "wasinn_prompt_tokens_total", "Tokens read from prompts and embedding inputs.",
            ("route", "model"))
        self.completion_tokens = self.counter(
            "wasinn_completion_tokens_total", "Tokens generated.", ("route", "model"))
        self.in_progress = self.gauge(
            "wasinn_requests_in_progress", "Requests being answered now.", ("route",))
        self.duration = self.histogram(
            "wasinn_request_duration_seconds",
            "Time from the request to the last byte of the answer.", ("route",))

    def record(self, route: str, model: str, status: int, prompt_tokens: int,
               completion_tokens: int, seconds: float) -> None:
        self.requests.inc(route=route, model=model, status=str(status))
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens, route=route, model=model)
        if completion_tokens:
            self.completion_tokens.inc(completion_tokens, route=route, model=model)
        self.duration.observe(seconds, route=route)
