"""Named models: preload specs from either runtime's syntax, loaded lazily once, shared by all."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .backends import Backends, Graph, PathLoader, read_graph_dir
from .errors import ConfigError, NotFound, WasiNnError
from .tensor import ExecutionTarget, GraphEncoding

#: progress(name, bytes_done, bytes_total, phase) with phase "read", "build" or "ready"
Progress = Callable[[str, int, int, str], None]

_CHUNK = 8 << 20


@dataclass(frozen=True)
class ModelSpec:
    """A model the host offers by name. Only names resolve: a guest never sees these paths."""

    name: str
    encoding: GraphEncoding
    target: ExecutionTarget
    paths: tuple[Path, ...] = ()
    #: wasmtime's `--nn-graph`: files are found in this directory by the backend's fixed names
    directory: Path | None = None

    @classmethod
    def from_preload(cls, text: str) -> ModelSpec:
        """WasmEdge's `NAME:ENCODING:TARGET:PATH[:PATH...]`, case-insensitive enums."""
        parts = text.split(":")
        if len(parts) < 4 or not parts[0] or not all(parts[3:]):
            raise ConfigError(f"--nn-preload {text!r}: expected NAME:ENCODING:TARGET:PATH[:PATH...]")
        name, encoding, target, *paths = parts
        try:
            return cls(name, GraphEncoding.parse(encoding), ExecutionTarget.parse(target),
                       tuple(Path(p) for p in paths))
        except WasiNnError as e:
            raise ConfigError(f"--nn-preload {text!r}: {e}") from None

    @classmethod
    def from_graph_dir(cls, text: str, target: ExecutionTarget = ExecutionTarget.CPU) -> ModelSpec:
        """wasmtime's `ENCODING::DIR`; the name is the directory's last component."""
        encoding, sep, directory = text.partition("::")
        if not sep or not encoding or not directory:
            raise ConfigError(f"--nn-graph {text!r}: expected ENCODING::DIR")
        path = Path(directory)
        name = path.resolve().name
        try:
            return cls(name, GraphEncoding.parse(encoding), target, directory=path)
        except WasiNnError as e:
            raise ConfigError(f"--nn-graph {text!r}: {e}") from None


class Registry:
    """Owns the named models of one Host; each is loaded on first use, then shared."""

    def __init__(self, backends: Backends, progress: Progress | None = None,
                 progress_min_bytes: int = 64 << 20) -> None:
        self._backends = backends
        self._progress = progress
        self._progress_min_bytes = progress_min_bytes
        self._specs: dict[str, ModelSpec] = {}
        self._graphs: dict[str, Graph] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def register(self, spec: ModelSpec) -> None:
        if spec.name in self._specs:
            raise ConfigError(f"model name {spec.name!r} registered twice")
        self._specs[spec.name] = spec

    def names(self) -> list[str]:
        return sorted(self._specs)

    def spec(self, name: str) -> ModelSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise NotFound(f"no model named {name!r} (the host offers: "
                           f"{', '.join(self.names()) or 'none'})") from None

    def is_loaded(self, name: str) -> bool:
        return name in self._graphs

    def get(self, name: str) -> Graph:
        """The shared graph for `name`, loading it the first time (once, even under threads)."""
        graph = self._graphs.get(name)
        if graph is not None:
            return graph
        spec = self.spec(name)
        with self._lock:
            lock = self._loading.setdefault(name, threading.Lock())
        with lock:
            graph = self._graphs.get(name)
            if graph is None:
                graph = self._load(spec)
                self._graphs[name] = graph
        return graph

    def preload_all(self) -> None:
        for name in self.names():
            self.get(name)

    def _load(self, spec: ModelSpec) -> Graph:
        backend = self._backends.get(spec.encoding)
        # a file that cannot be opened: not_found, or the backend's own answer (GGML: 103)
        missing: type[WasiNnError] = getattr(backend, "missing_model_error", NotFound)
        paths = list(spec.paths)
        try:
            if spec.directory is not None:
                paths = read_graph_dir(backend, spec.directory)
            total = sum(p.stat().st_size for p in paths)
        except OSError as e:
            raise missing(f"model {spec.name!r} cannot be read: {e}") from None
        report = self._progress if self._progress and total >= self._progress_min_bytes else None
        if isinstance(backend, PathLoader):
            name = spec.name
            hear = None if report is None else (
                lambda fraction: report(name, int(fraction * total), total, "read"))
            graph = backend.load_paths(paths, spec.target, progress=hear)
            if report:
                report(spec.name, total, total, "ready")
            return graph
        builders = []
        try:
            for path in paths:
                builders.append(self._read(spec.name, path, report, sum(map(len, builders)), total))
        except OSError as e:
            raise missing(f"model {spec.name!r} cannot be read: {e}") from None
        if report:
            report(spec.name, total, total, "build")
        graph = backend.load(builders, spec.target)
        if report:
            report(spec.name, total, total, "ready")
        return graph

    @staticmethod
    def _read(name: str, path: Path, report: Progress | None, base: int, total: int) -> bytearray:
        size = path.stat().st_size
        data = bytearray(size)
        view = memoryview(data)
        done = 0
        with path.open("rb") as f:
            while done < size:
                n = f.readinto(view[done:done + _CHUNK])
                if not n:
                    break
                done += n
                if report:
                    report(name, base + done, total, "read")
        return data

    def close(self) -> None:
        for graph in self._graphs.values():
            graph.close()
        self._graphs.clear()
