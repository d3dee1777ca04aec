"""LiteRT (TensorFlow Lite) backend (encoding 4), on the `ai-edge-litert` Interpreter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

from ..errors import BackendError, InvalidArgument, UnsupportedOperation
from ..tensor import ExecutionTarget, GraphEncoding, Tensor
from . import NotStreaming, output_at

_WITX_DTYPES = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64, np.uint8,
                                                np.int32, np.int64))
#: model dtypes without a witx tensor type of their own but one byte wide (int8-quantized
#: models, boolean masks): the guest sends their raw bytes as u8
_RIDES_ON_U8 = frozenset(np.dtype(t) for t in (np.int8, np.bool_))


def _carrier(dtype: np.dtype) -> np.dtype | None:
    """The dtype a guest's tensor arrives in for a model input of `dtype`; None: raw bytes."""
    if dtype in _WITX_DTYPES:
        return dtype
    if dtype in _RIDES_ON_U8:
        return np.dtype(np.uint8)
    return None


def _check_signature(model: bytes) -> None:
    """Refuse a main subgraph whose inputs or outputs name no tensor, before LiteRT sees it:
    ai-edge-litert 2.3.0 builds an interpreter from such a model and then corrupts its heap
    freeing it (found by mutating small models), which would abort the host process."""
    try:
        graph = schema.Model.GetRootAs(model, 0).Subgraphs(0)
        count = graph.TensorsLength()
        indices = [*(graph.Inputs(i) for i in range(graph.InputsLength())),
                   *(graph.Outputs(i) for i in range(graph.OutputsLength()))]
    except Exception as e:  # the flatbuffer is not verified yet: anything may fail
        raise BackendError(f"LiteRT could not load the model: not a TFLite flatbuffer ({e})") from e
    if any(not 0 <= i < count for i in indices):
        raise BackendError("LiteRT could not load the model: its inputs or outputs name "
                           f"tensors outside its {count} tensors")


class LiteRtBackend:
    encoding = GraphEncoding.TENSORFLOWLITE
    graph_files = ("model.tflite",)

    def __init__(self, threads: int | None = None) -> None:
        """`threads`: LiteRT's `num_threads` for every interpreter (None: its default, one)."""
        self._threads = threads

    def load(self, builders: Sequence[bytes | memoryview], target: ExecutionTarget) -> LiteRtGraph:
        if len(builders) != 1:
            raise InvalidArgument(f"tensorflowlite takes one builder (the .tflite flatbuffer), "
                                  f"got {len(builders)}")
        if target == ExecutionTarget.GPU:
            raise UnsupportedOperation("target gpu: LiteRT's GPU delegate is not wired into "
                                       "this backend; use target cpu")
        if target not in (ExecutionTarget.CPU, ExecutionTarget.AUTO):
            raise UnsupportedOperation(
                f"the tensorflowlite backend has no {target.name.lower()} target")
        model = bytes(builders[0])
        if not model:
            raise InvalidArgument("the .tflite builder is empty")
        return LiteRtGraph(model, self._threads)


class LiteRtGraph:
    """The model bytes and what its signature says; each context builds its own Interpreter
    from the same bytes, since an Interpreter must not be used from two threads at once."""

    def __init__(self, model: bytes, threads: int | None) -> None:
        self.model = model
        self.threads = threads
        _check_signature(model)
        probe = self.interpreter()
        try:  # the operators' checks run here: a broken model fails at load, not at compute
            probe.allocate_tensors()
            self.inputs = probe.get_input_details()
            self.outputs = probe.get_output_details()
        except Exception as e:  # ValueError, RuntimeError, UnicodeDecodeError (a tensor name)
            raise BackendError(f"LiteRT could not prepare the model: {e}") from e
        self.input_dtypes = [np.dtype(d["dtype"]) for d in self.inputs]
        # -1 where the model leaves a dim to be set at run time
        self.input_shapes = [[int(n) for n in d["shape_signature"]] for d in self.inputs]

    def interpreter(self) -> Interpreter:
        try:
            return Interpreter(model_content=self.model, num_threads=self.threads)
        except (ValueError, RuntimeError) as e:
            raise BackendError(f"LiteRT could not load the model: {e}") from e

    def input_dtype(self, index: int) -> np.dtype | None:
        if 0 <= index < len(self.input_dtypes):
            return _carrier(self.input_dtypes[index])
        return None

    def init_execution_context(self, config: Mapping[str, Any] | None = None) -> LiteRtContext:
        return LiteRtContext(self)  # LiteRT takes no per-context settings

    def close(self) -> None:
        self.model = b""


class LiteRtContext(NotStreaming):
    def __init__(self, graph: LiteRtGraph) -> None:
        self._graph = graph
        self._interpreter = graph.interpreter()
        # the input shapes the interpreter's tensors are allocated for
        self._allocated: list[tuple[int, ...]] | None = None
        self._inputs: dict[int, np.ndarray] = {}
        self._outputs: list[np.ndarray] | None = None

    def set_input(self, index: int, tensor: Tensor) -> None:
        graph = self._graph
        if not 0 <= index < len(graph.inputs):
            raise InvalidArgument(f"input index {index} out of range: the model has "
                                  f"{len(graph.inputs)} input(s)")
        name = graph.inputs[index]["name"]
        expected = graph.input_dtypes[index]
        data = tensor.data
        if data.dtype != expected:
            # int8 comes as u8; a dtype with no witx type at all as its raw bytes (u8)
            sent_as = _carrier(expected) or np.dtype(np.uint8)
            if sent_as == expected or data.dtype != sent_as:
                carried = "" if sent_as == expected else f" (sent as {sent_as})"
                raise InvalidArgument(f"input {index} ({name}) expects {expected}{carried}, "
                                      f"got {data.dtype}")
            if data.nbytes % expected.itemsize:
                raise InvalidArgument(f"input {index} ({name}) expects {expected}: "
                                      f"{data.nbytes} bytes is not a whole number of them")
            data = data.view(expected)
        shape = graph.input_shapes[index]
        if len(shape) != len(tensor.dims) or any(
                want != -1 and want != got for want, got in zip(shape, tensor.dims)):
            wanted = ["?" if d == -1 else d for d in shape]
            raise InvalidArgument(f"input {index} ({name}) expects dims {wanted}, "
                                  f"got {list(tensor.dims)}")
        try:
            self._inputs[index] = data.reshape(tensor.dims)
        except ValueError as e:
            raise InvalidArgument(f"input {index}: dims {list(tensor.dims)}: {e}") from None

    def compute(self) -> None:
        graph = self._graph
        if len(self._inputs) != len(graph.inputs):
            missing = [d["name"] for i, d in enumerate(graph.inputs) if i not in self._inputs]
            raise InvalidArgument(f"compute before every input is set (missing: {', '.join(missing)})")
        interpreter = self._interpreter
        shapes = [self._inputs[i].shape for i in range(len(graph.inputs))]
        try:
            if shapes != self._allocated:
                # a dynamic dim changed (or the first run): resize, then re-plan the tensors
                for details, shape in zip(graph.inputs, shapes):
                    interpreter.resize_tensor_input(details["index"], shape, strict=True)
                interpreter.allocate_tensors()
                self._allocated = shapes
            for i, details in enumerate(graph.inputs):
                interpreter.set_tensor(details["index"], self._inputs[i])
            interpreter.invoke()
            # get_tensor copies: the outputs stay valid until the next compute
            self._outputs = [interpreter.get_tensor(d["index"]) for d in graph.outputs]
        except (ValueError, RuntimeError) as e:
            self._allocated = None
            raise BackendError(f"LiteRT failed: {e}") from e

    def get_output(self, index: int) -> np.ndarray:
        return output_at(self._outputs, index)

    def close(self) -> None:
        self._inputs.clear()
        self._outputs = None
        self._interpreter = None  # type: ignore[assignment]
