"""OpenVINO backend (encoding 0).

Builders, as wasmtime's openvino backend takes them: the IR pair [model.xml, model.bin]; or one
builder holding a model OpenVINO's frontends read from memory (ONNX, or an IR without weights).

OpenVINO's plugins compute i64 tensors as i32 (its documented precision support): an i64 input
value outside the int32 range would come back wrong without a word, so it is refused instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import openvino as ov
import openvino.properties as props
import openvino.properties.hint as hints

from ..errors import BackendError, InvalidArgument, UnsupportedOperation
from ..tensor import ExecutionTarget, GraphEncoding, Tensor
from . import NotStreaming

#: OpenVINO element types with a numpy twin (Type.to_dtype maps bf16 to float16 and u4 to
#: uint8, which would mislabel the bytes)
_DTYPES = {
    ov.Type.f16: np.float16,
    ov.Type.f32: np.float32,
    ov.Type.f64: np.float64,
    ov.Type.u8: np.uint8,
    ov.Type.i8: np.int8,
    ov.Type.i16: np.int16,
    ov.Type.u16: np.uint16,
    ov.Type.i32: np.int32,
    ov.Type.u32: np.uint32,
    ov.Type.i64: np.int64,
    ov.Type.u64: np.uint64,
    ov.Type.boolean: np.bool_,
}

_CPU = "CPU"
_GPU = "GPU"


class OpenvinoBackend:
    encoding = GraphEncoding.OPENVINO
    graph_files = ("model.xml", "model.bin")

    def __init__(self, threads: int | None = None) -> None:
        self._threads = threads
        self._core = ov.Core()

    def device(self, target: ExecutionTarget) -> str:
        if target == ExecutionTarget.CPU:
            return _CPU
        if target not in (ExecutionTarget.GPU, ExecutionTarget.AUTO):
            raise UnsupportedOperation(f"the openvino backend has no {target.name.lower()} target")
        # "GPU", or "GPU.0", "GPU.1", ... when there are several; "GPU" is the first
        available = self._core.available_devices
        if any(name.split(".")[0] == _GPU for name in available):
            return _GPU
        if target == ExecutionTarget.AUTO:
            return _CPU
        raise UnsupportedOperation(
            "target gpu needs an OpenVINO GPU device (an Intel GPU with its OpenCL driver): "
            f"this OpenVINO {ov.get_version().split('-')[0]} sees only {', '.join(available)}")

    def load(self, builders: Sequence[bytes | memoryview],
             target: ExecutionTarget) -> OpenvinoGraph:
        device = self.device(target)
        model = self._read(builders)
        # f32 everywhere: the CPU plugin's default on AVX512_BF16 machines is bf16 (the real
        # classifier's logits moved by 0.54 from onnxruntime's, 1.5e-5 in f32), the GPU's f16
        config: dict[str, Any] = {hints.inference_precision: ov.Type.f32}
        if device == _CPU and self._threads:
            config[props.inference_num_threads] = self._threads
        try:
            compiled = self._core.compile_model(model, device, config)
        except Exception as e:  # OpenVINO raises RuntimeError and friends
            raise BackendError(f"OpenVINO could not compile the model for {device}: "
                               f"{_reason(e)}") from e
        return OpenvinoGraph(compiled)

    def _read(self, builders: Sequence[bytes | memoryview]) -> ov.Model:
        if len(builders) not in (1, 2):
            raise InvalidArgument(
                "openvino takes two builders (the IR's model.xml and model.bin) or one (a model "
                f"OpenVINO reads from memory, e.g. ONNX), got {len(builders)}")
        head = bytes(builders[0][:64]).removeprefix(b"\xef\xbb\xbf").lstrip()  # a BOM, blanks
        if len(builders) == 2 and not head.startswith(b"<"):
            raise InvalidArgument("openvino: builder 0 of two must be the IR's model.xml "
                                  "(XML text), builder 1 its model.bin")
        try:
            return self._core.read_model(*(bytes(b) for b in builders))
        except Exception as e:
            raise BackendError(f"OpenVINO could not read the model: {_reason(e)}") from e


def _reason(error: Exception) -> str:
    """OpenVINO's messages lead with source-file locations; keep the line that says why."""
    lines = [line for line in str(error).splitlines()
             if line.strip() and not line.startswith("Exception from src/")]
    return lines[-1].strip() if lines else str(error)


class OpenvinoGraph:
    def __init__(self, compiled: ov.CompiledModel) -> None:
        self.compiled = compiled
        self.inputs = list(compiled.inputs)
        self.input_names = [_port_name(p, f"input {i}") for i, p in enumerate(self.inputs)]
        self.input_types = [p.get_element_type() for p in self.inputs]
        self.input_dtypes = [_numpy_dtype(t) for t in self.input_types]
        self.input_shapes = [p.get_partial_shape() for p in self.inputs]
        self.output_count = len(compiled.outputs)

    def input_dtype(self, index: int) -> np.dtype | None:
        if 0 <= index < len(self.input_dtypes):
            return self.input_dtypes[index]
        return None

    def init_execution_context(self, config: Mapping[str, Any] | None = None) -> OpenvinoContext:
        return OpenvinoContext(self)  # OpenVINO takes no per-request settings

    def close(self) -> None:
        self.compiled = None  # type: ignore[assignment]


def _numpy_dtype(element_type: ov.Type) -> np.dtype | None:
    dtype = _DTYPES.get(element_type)
    return None if dtype is None else np.dtype(dtype)


def _port_name(port: ov.ConstOutput, fallback: str) -> str:
    names = port.get_names()
    return min(names) if names else fallback


_INT32 = np.iinfo(np.int32)


def _check_int32_range(index: int, name: str, data: np.ndarray) -> None:
    low, high = int(data.min()), int(data.max())
    if low < _INT32.min or high > _INT32.max:
        bad = low if low < _INT32.min else high
        raise InvalidArgument(f"input {index} ({name}): OpenVINO computes {data.dtype} as int32, "
                              f"and {bad} does not fit")


class OpenvinoContext(NotStreaming):
    """One InferRequest: its own input and output tensors, so contexts run independently."""

    def __init__(self, graph: OpenvinoGraph) -> None:
        self._graph = graph
        self._request = graph.compiled.create_infer_request()
        self._inputs: dict[int, np.ndarray] = {}
        self._computed = False

    def set_input(self, index: int, tensor: Tensor) -> None:
        graph = self._graph
        if not 0 <= index < len(graph.inputs):
            raise InvalidArgument(f"input index {index} out of range: the model has "
                                  f"{len(graph.inputs)} input(s)")
        name = graph.input_names[index]
        expected = graph.input_dtypes[index]
        if expected is None:
            element_type = graph.input_types[index].get_type_name()
            raise InvalidArgument(f"input {index} ({name}) is of element type {element_type}, "
                                  "which no wasi-nn tensor type carries")
        if tensor.data.dtype != expected:
            raise InvalidArgument(f"input {index} ({name}) expects {expected}, "
                                  f"got {tensor.data.dtype}")
        shape = graph.input_shapes[index]
        if not shape.compatible(ov.PartialShape(list(tensor.dims))):
            raise InvalidArgument(f"input {index} ({name}) expects dims {shape}, "
                                  f"got {list(tensor.dims)}")
        if expected.itemsize == 8 and expected.kind in "iu" and tensor.data.size:
            _check_int32_range(index, name, tensor.data)
        try:
            data = np.ascontiguousarray(tensor.data.reshape(tensor.dims))
        except ValueError as e:
            raise InvalidArgument(f"input {index}: dims {list(tensor.dims)}: {e}") from None
        if not data.flags.writeable:  # ov.Tensor shares only writeable arrays
            data = data.copy()
        # the glue hands over a fresh copy of the guest's bytes: share it, no second copy; the
        # ov.Tensor does not keep the array alive, so the context does
        self._request.set_input_tensor(index, ov.Tensor(data, shared_memory=True))
        self._inputs[index] = data

    def compute(self) -> None:
        graph = self._graph
        if len(self._inputs) != len(graph.inputs):
            missing = [n for i, n in enumerate(graph.input_names) if i not in self._inputs]
            raise InvalidArgument("compute before every input is set "
                                  f"(missing: {', '.join(missing)})")
        try:
            self._request.infer()
        except Exception as e:
            raise BackendError(f"OpenVINO failed: {_reason(e)}") from e
        self._computed = True

    def get_output(self, index: int) -> np.ndarray:
        if not self._computed:
            raise InvalidArgument("get_output before compute")
        count = self._graph.output_count
        if not 0 <= index < count:
            raise InvalidArgument(f"output index {index} out of range: the model has "
                                  f"{count} output(s)")
        # a copy: the request's own buffer is overwritten by the next compute
        return np.array(self._request.get_output_tensor(index).data, copy=True, order="C")

    def close(self) -> None:
        self._request = None  # type: ignore[assignment]
        self._inputs.clear()
        self._computed = False
