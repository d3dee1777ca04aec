"""ONNX Runtime backend (encoding 1)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import BackendError, InvalidArgument, UnsupportedOperation
from ..tensor import ExecutionTarget, GraphEncoding, Tensor
from . import NotStreaming, output_at

_ORT_DTYPES = {
    "tensor(float16)": np.float16,
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16,
    "tensor(int32)": np.int32,
    "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}

_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"
#: full f32 on CUDA: ORT's default TF32 convolutions moved the real classifier's top
#: probability by 2e-3 from the CPU's on an H100; a guest should get the same answer anywhere
_CUDA_OPTIONS = {"use_tf32": "0"}
#: IOBindings a graph keeps from closed contexts, for the next ones (a route's requests)
_SPARE_BINDINGS = 8


class OnnxBackend:
    encoding = GraphEncoding.ONNX
    graph_files = ("model.onnx",)

    def __init__(self, threads: int | None = None, spin_after_run: bool = True) -> None:
        """`spin_after_run=False`: the worker threads stop spinning when a run returns, so
        they leave the cores to what the host does next (the server's cache search after an
        embedding: 7.4 -> 5.9 ms a lookup at 100k entries); back-to-back runs (a guest's
        inference loop) are a little faster with the default."""
        self._threads = threads
        self._spin_after_run = spin_after_run

    def providers(self, target: ExecutionTarget) -> list[str | tuple[str, dict[str, str]]]:
        available = ort.get_available_providers()
        if target == ExecutionTarget.CPU:
            return [_CPU]
        if target == ExecutionTarget.GPU:
            if _CUDA not in available:
                raise UnsupportedOperation(
                    "target gpu needs ONNX Runtime with CUDA: onnxruntime-gpu is not installed "
                    f"(this onnxruntime {ort.__version__} offers {', '.join(available)}); "
                    "pip install 'wasinn[onnx-gpu]'")
            return [(_CUDA, _CUDA_OPTIONS), _CPU]
        if target == ExecutionTarget.AUTO:
            return [(_CUDA, _CUDA_OPTIONS), _CPU] if _CUDA in available else [_CPU]
        raise UnsupportedOperation(f"the onnx backend has no {target.name.lower()} target")

    def load(self, builders: Sequence[bytes | memoryview], target: ExecutionTarget) -> OnnxGraph:
        if len(builders) != 1:
            raise InvalidArgument(f"onnx takes one builder (the model bytes), got {len(builders)}")
        providers = self.providers(target)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if not self._spin_after_run:
            options.add_session_config_entry("session.force_spinning_stop", "1")
        if self._threads:
            options.intra_op_num_threads = self._threads
            options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(bytes(builders[0]), sess_options=options,
                                           providers=providers)
        except Exception as e:  # onnxruntime raises several unrelated types
            raise BackendError(f"onnxruntime could not load the model: {e}") from e
        if target == ExecutionTarget.GPU and _CUDA not in session.get_providers():
            raise UnsupportedOperation("onnxruntime-gpu is installed but CUDA could not start "
                                       "(no GPU, or CUDA/cuDNN libraries missing)")
        return OnnxGraph(session)


class OnnxGraph:
    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.inputs = session.get_inputs()
        self.input_names = [i.name for i in self.inputs]
        self.input_dtypes = [np.dtype(_ORT_DTYPES.get(i.type, np.float32)) for i in self.inputs]
        # fixed dims per input; None where the model leaves a dim symbolic
        self.input_shapes = [[d if isinstance(d, int) else None for d in i.shape]
                             for i in self.inputs]
        outputs = session.get_outputs()
        self.output_names = [o.name for o in outputs]
        self.output_ranks = [len(o.shape) for o in outputs]
        # every output of a fixed shape and a plain dtype, on the CPU: a context can run with
        # an IOBinding, onnxruntime reading its inputs and writing its outputs in place
        self.output_layouts: list[tuple[np.dtype, tuple[int, ...]]] | None = None
        if session.get_providers()[0] == _CPU and all(
                o.type in _ORT_DTYPES and all(isinstance(d, int) and d > 0 for d in o.shape)
                for o in outputs):
            self.output_layouts = [(np.dtype(_ORT_DTYPES[o.type]), tuple(o.shape))
                                   for o in outputs]
        self._spare_bindings: list[_Binding] = []

    def input_dtype(self, index: int) -> np.dtype | None:
        if 0 <= index < len(self.input_dtypes):
            return self.input_dtypes[index]
        return None

    def init_execution_context(self, config: Mapping[str, Any] | None = None) -> OnnxContext:
        return OnnxContext(self)  # ONNX Runtime takes no per-context settings

    def take_binding(self) -> _Binding:
        """A spare IOBinding of a closed context, or a new one."""
        try:
            return self._spare_bindings.pop()  # list.pop and append are atomic
        except IndexError:
            return _Binding(self)

    def give_binding(self, binding: _Binding) -> None:
        if len(self._spare_bindings) < _SPARE_BINDINGS:
            self._spare_bindings.append(binding)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
        self._spare_bindings.clear()


def _same_memory(bound: np.ndarray | None, array: np.ndarray) -> bool:
    """`array` is the bytes a binding already reads (`bound`, which it keeps alive): the same
    array, or (a new context given the same pooled buffer, viewed anew) the same address,
    shape and dtype, both C-contiguous. Rebinding cost ~60 us on an edge route's request."""
    if bound is array:
        return True
    return (bound is not None and bound.shape == array.shape and bound.dtype == array.dtype
            and bound.flags.c_contiguous and array.flags.c_contiguous
            and bound.__array_interface__["data"][0] == array.__array_interface__["data"][0])


class _Binding:
    """An IOBinding with its output arrays: onnxruntime reads the bound inputs and writes
    the outputs in place. Made once per concurrent context of a graph and reused: a new one
    (binding, arrays, the run's partial) cost ~0.12 ms, per request on an edge route."""

    def __init__(self, graph: OnnxGraph) -> None:
        session = graph.session
        assert graph.output_layouts is not None
        self.io = session.io_binding()
        self.outputs = [np.empty(shape, dtype) for dtype, shape in graph.output_layouts]
        for name, array in zip(graph.output_names, self.outputs):
            self.io.bind_output(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
        #: the arrays the binding reads, by input name (kept alive while it may read them)
        self.inputs: dict[str, np.ndarray] = {}
        # the C++ call under InferenceSession.run_with_iobinding, whose Python part only
        # serves WebGPU graph capture (not used here): after a 4 ms run, with cold caches,
        # that part alone costs about 10 us
        native = getattr(session, "_sess", None)
        self.run: Callable[[], object]
        if native is not None and hasattr(self.io, "_iobinding") and \
                hasattr(native, "run_with_iobinding"):
            self.run = functools.partial(native.run_with_iobinding, self.io._iobinding, None)
        else:
            self.run = functools.partial(session.run_with_iobinding, self.io)


class OnnxContext(NotStreaming):
    #: the ABI may hand set_input the same host array again for the same index: a feed is
    #: replaced by each set_input, and onnxruntime's outputs never alias its inputs
    reuses_input_buffers = True

    def __init__(self, graph: OnnxGraph) -> None:
        self._graph = graph
        self._feeds: dict[str, np.ndarray] = {}
        self._outputs: list[np.ndarray] | None = None
        self._binding: _Binding | None = None
        #: every compute writes the same output arrays (what the ABI may rely on)
        self.outputs_in_place = graph.output_layouts is not None

    def set_input(self, index: int, tensor: Tensor) -> None:
        graph = self._graph
        if not 0 <= index < len(graph.input_names):
            raise InvalidArgument(f"input index {index} out of range: the model has "
                                  f"{len(graph.input_names)} input(s)")
        expected = graph.input_dtypes[index]
        if tensor.data.dtype != expected:
            raise InvalidArgument(f"input {index} ({graph.input_names[index]}) expects "
                                  f"{expected}, got {tensor.data.dtype}")
        shape = graph.input_shapes[index]
        if len(shape) != len(tensor.dims) or any(
                want is not None and want != got for want, got in zip(shape, tensor.dims)):
            wanted = ["?" if d is None else d for d in shape]
            raise InvalidArgument(f"input {index} ({graph.input_names[index]}) expects dims "
                                  f"{wanted}, got {list(tensor.dims)}")
        try:
            self._feeds[graph.input_names[index]] = tensor.data.reshape(tensor.dims)
        except ValueError as e:
            raise InvalidArgument(f"input {index}: dims {list(tensor.dims)}: {e}") from None

    def compute(self) -> None:
        graph = self._graph
        feeds = self._feeds
        if len(feeds) != len(graph.input_names):
            missing = [n for n in graph.input_names if n not in feeds]
            raise InvalidArgument(f"compute before every input is set (missing: {', '.join(missing)})")
        try:
            if not self.outputs_in_place:
                self._outputs = graph.session.run(None, feeds)  # None: all, in order
                return
            # no per-run allocation: a guest's loop sets the same input arrays (wasinn reuses
            # them) and reads the same output arrays, rewritten in place
            binding = self._binding or self._take_binding()
            bound = binding.inputs
            for name, array in feeds.items():
                if not _same_memory(bound.get(name), array):
                    binding.io.bind_cpu_input(name, array)
                    bound[name] = array
            binding.run()
            self._outputs = binding.outputs
        except Exception as e:
            raise BackendError(f"onnxruntime failed: {e}") from e

    def output_arrays(self) -> list[np.ndarray]:
        """The arrays every compute writes (with `outputs_in_place`), before the first:
        what they hold until then is not this context's."""
        return (self._binding or self._take_binding()).outputs

    def _take_binding(self) -> _Binding:
        self._binding = self._graph.take_binding()
        return self._binding

    def get_output(self, index: int) -> np.ndarray:
        return output_at(self._outputs, index)

    def recycle(self) -> None:
        """Kept for another guest (wasinn's ReadyContext): what it computed is forgotten; its
        inputs stay bound to the same arrays, which the next guest's set_input rewrites in
        place before the ABI lets it compute, and its outputs are rewritten by that compute."""
        self._outputs = None

    def close(self) -> None:
        """The outputs handed out may be rewritten from now on (another context computes
        into them): read them before closing."""
        self._feeds.clear()
        self._outputs = None
        binding, self._binding = self._binding, None
        if binding is not None:
            self._graph.give_binding(binding)
