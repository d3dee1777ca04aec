"""Tensors and the enums every layer shares."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from .errors import InvalidArgument, InvalidEncoding


class GraphEncoding(IntEnum):
    """witx `graph_encoding`, with WasmEdge's extensions."""

    OPENVINO = 0
    ONNX = 1
    TENSORFLOW = 2
    PYTORCH = 3
    TENSORFLOWLITE = 4
    AUTODETECT = 5
    GGML = 6
    NEURALSPEED = 7
    BURN = 8
    WHISPER = 9
    MLX = 10
    PIPER = 11
    CHATTTS = 12
    OPENVINOGENAI = 13
    BITNET = 14

    @classmethod
    def parse(cls, text: str) -> GraphEncoding:
        """Accepts a name in any case (`onnx`, `GGML`) or a number."""
        key = text.strip()
        if key.isdigit():
            try:
                return cls(int(key))
            except ValueError:
                raise InvalidEncoding(f"unknown graph encoding {text!r}") from None
        try:
            return cls[key.upper().replace("-", "")]
        except KeyError:
            known = ", ".join(e.name.lower() for e in cls)
            raise InvalidEncoding(f"unknown graph encoding {text!r} (known: {known})") from None


class ExecutionTarget(IntEnum):
    """witx `execution_target`; AUTO is WasmEdge's, for preloaded models."""

    CPU = 0
    GPU = 1
    TPU = 2
    AUTO = 3

    @classmethod
    def parse(cls, text: str) -> ExecutionTarget:
        key = text.strip()
        if key.isdigit():
            try:
                return cls(int(key))
            except ValueError:
                pass
        else:
            try:
                return cls[key.upper()]
            except KeyError:
                pass
        raise InvalidArgument(f"unknown execution target {text!r} (known: cpu, gpu, tpu, auto)")


class TensorType(IntEnum):
    """witx `tensor_type` in the current numbering (wasmtime, spec)."""

    F16 = 0
    F32 = 1
    F64 = 2
    U8 = 3
    I32 = 4
    I64 = 5

    @property
    def dtype(self) -> np.dtype:
        return _NUMPY[self]

    @classmethod
    def from_dtype(cls, dtype: np.dtype) -> TensorType:
        for tensor_type, candidate in _NUMPY.items():
            if candidate == dtype:
                return tensor_type
        raise InvalidArgument(f"no wasi-nn tensor type for dtype {dtype}")


_NUMPY = {
    TensorType.F16: np.dtype(np.float16),
    TensorType.F32: np.dtype(np.float32),
    TensorType.F64: np.dtype(np.float64),
    TensorType.U8: np.dtype(np.uint8),
    TensorType.I32: np.dtype(np.int32),
    TensorType.I64: np.dtype(np.int64),
}

# The older witx numbering (no f64), still in many guest binaries built with older crates.
_LEGACY = {0: TensorType.F16, 1: TensorType.F32, 2: TensorType.U8, 3: TensorType.I32, 4: TensorType.I64}


def tensor_type_candidates(code: int) -> tuple[TensorType, ...]:
    """The types a guest may mean by `code`: the current numbering first, then the older one."""
    found: list[TensorType] = []
    if 0 <= code <= 5:
        found.append(TensorType(code))
    legacy = _LEGACY.get(code)
    if legacy is not None and legacy not in found:
        found.append(legacy)
    return tuple(found)


@functools.lru_cache(maxsize=1024)  # a guest sets the same kind of tensor again and again
def resolve_tensor_type(code: int, dims: tuple[int, ...], data_len: int,
                        expected: np.dtype | None = None) -> TensorType:
    """Tell the two numberings apart by the dtype the graph expects and the byte length.

    Preference: a candidate matching both the graph's dtype and dims x size == data_len; then one
    matching the graph's dtype; then one whose size fits data_len; then the current numbering.
    """
    candidates = tensor_type_candidates(code)
    if not candidates:
        raise InvalidArgument(f"unknown tensor type {code}")
    count = math.prod(dims)

    def fits(t: TensorType) -> bool:
        return count * t.dtype.itemsize == data_len

    def wanted(t: TensorType) -> bool:
        return expected is not None and t.dtype == expected

    for test in (lambda t: wanted(t) and fits(t), wanted, fits):
        for t in candidates:
            if test(t):
                return t
    return candidates[0]


@dataclass(frozen=True, slots=True)
class Tensor:
    """A tensor crossing between the ABI glue and a backend: dims, type and a numpy array of data."""

    dims: tuple[int, ...]
    type: TensorType
    data: np.ndarray

    @classmethod
    def from_array(cls, array: np.ndarray) -> Tensor:
        return cls(tuple(array.shape), TensorType.from_dtype(array.dtype), array)
