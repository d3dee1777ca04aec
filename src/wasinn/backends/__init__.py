"""The one protocol between the ABI glue and the frameworks, in three levels as in wasmtime:
a backend loads graphs, a graph makes execution contexts, a context runs."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import InvalidArgument, InvalidEncoding, UnsupportedOperation
from ..tensor import ExecutionTarget, GraphEncoding, Tensor


class ExecutionContext(Protocol):
    """One inference state. Inputs and outputs are addressed by index, in the graph's order."""

    def set_input(self, index: int, tensor: Tensor) -> None: ...

    def compute(self) -> None: ...

    def get_output(self, index: int) -> np.ndarray | bytes:
        """The output as bytes or a C-contiguous array: its bytes are what the guest receives.
        An array may be rewritten in place by the next compute (onnx does): copy to keep it."""
        ...

    def compute_single(self) -> None: ...

    def get_output_single(self, index: int) -> np.ndarray | bytes: ...

    def fini_single(self) -> None: ...

    def close(self) -> None: ...


class Graph(Protocol):
    """A loaded model; thread-safe, shared by every context made from it."""

    def init_execution_context(self, config: Mapping[str, Any] | None = None) -> ExecutionContext:
        """A new context; `config` is what the guest passed to load_by_name_with_config."""
        ...

    def input_dtype(self, index: int) -> np.dtype | None:
        """The dtype input `index` expects, or None when the graph does not say."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    encoding: GraphEncoding
    #: fixed file names inside a `--nn-graph ENCODING::DIR` directory (wasmtime's convention)
    graph_files: tuple[str, ...]

    def load(self, builders: Sequence[bytes | memoryview], target: ExecutionTarget) -> Graph: ...


@runtime_checkable
class PathLoader(Protocol):
    """Optional: a backend whose framework opens model files itself (e.g. llama.cpp's mmap).
    The registry then hands it paths instead of reading the bytes."""

    def load_paths(self, paths: Sequence[Path], target: ExecutionTarget,
                   progress: Callable[[float], None] | None = None) -> Graph:
        """`progress`, if given, hears the fraction loaded (0..1) as the framework goes."""
        ...


class NotStreaming:
    """Mixin for contexts of backends that do not stream: the single-step calls are unsupported."""

    def compute_single(self) -> None:
        raise UnsupportedOperation("this backend does not stream (compute_single)")

    def get_output_single(self, index: int) -> np.ndarray:
        raise UnsupportedOperation("this backend does not stream (get_output_single)")

    def fini_single(self) -> None:
        raise UnsupportedOperation("this backend does not stream (fini_single)")


def output_at(outputs: Sequence[np.ndarray] | None, index: int) -> np.ndarray:
    """A context's output `index` after compute, as its get_output answers it."""
    if outputs is None:
        raise InvalidArgument("get_output before compute")
    if not 0 <= index < len(outputs):
        raise InvalidArgument(f"output index {index} out of range: the model has "
                              f"{len(outputs)} output(s)")
    return np.ascontiguousarray(outputs[index])


# encoding -> (module, class, extra to install): imported lazily so a missing framework only
# matters to the guests that ask for it.
_KNOWN: dict[GraphEncoding, tuple[str, str, str]] = {
    GraphEncoding.OPENVINO: ("wasinn.backends.openvino", "OpenvinoBackend", "openvino"),
    GraphEncoding.ONNX: ("wasinn.backends.onnx", "OnnxBackend", "onnx"),
    GraphEncoding.TENSORFLOWLITE: ("wasinn.backends.litert", "LiteRtBackend", "litert"),
    GraphEncoding.GGML: ("wasinn.backends.ggml", "GgmlBackend", "llm"),
    GraphEncoding.PYTORCH: ("wasinn.backends.pytorch", "PytorchBackend", "pytorch"),
}

BackendFactory = Callable[[], Backend]


class Backends:
    """The backends one Host offers, made on first use and kept for the Host's life."""

    def __init__(self, threads: int | None = None,
                 factories: dict[GraphEncoding, BackendFactory] | None = None,
                 options: Mapping[GraphEncoding, Mapping[str, Any]] | None = None) -> None:
        """`options`: keyword arguments for a backend's constructor, by encoding (e.g.
        `{GraphEncoding.ONNX: {"spin_after_run": False}}`)."""
        self._threads = threads
        self._factories = dict(factories or {})
        self._options = {GraphEncoding(k): dict(v) for k, v in (options or {}).items()}
        self._made: dict[GraphEncoding, Backend] = {}

    def get(self, encoding: GraphEncoding | int) -> Backend:
        try:
            encoding = GraphEncoding(encoding)
        except ValueError:
            raise InvalidEncoding(f"unknown graph encoding {encoding}") from None
        backend = self._made.get(encoding)
        if backend is None:
            backend = self._make(encoding)
            self._made[encoding] = backend
        return backend

    def _make(self, encoding: GraphEncoding) -> Backend:
        factory = self._factories.get(encoding)
        if factory is not None:
            return factory()
        if encoding == GraphEncoding.AUTODETECT:
            from ._autodetect import AutodetectBackend  # it asks this Backends for the real one

            return AutodetectBackend(self)
        known = _KNOWN.get(encoding)
        if known is None:
            raise InvalidEncoding(f"no backend for encoding {encoding.name.lower()} in this host")
        module_name, class_name, extra = known
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise InvalidEncoding(
                f"the {encoding.name.lower()} backend needs {e.name or 'its framework'}: "
                f"pip install 'wasinn[{extra}]'") from None
        return getattr(module, class_name)(threads=self._threads,
                                           **self._options.get(encoding, {}))


def read_graph_dir(backend: Backend, directory: Path) -> list[Path]:
    """The files of a wasmtime-style graph directory, by the backend's fixed names."""
    paths = [directory / name for name in backend.graph_files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"graph directory {directory} lacks {', '.join(missing)}")
    return paths
