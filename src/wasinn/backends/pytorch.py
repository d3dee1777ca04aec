"""PyTorch backend (encoding 3) on TorchScript: the model is one `torch.jit.save` archive.

Inputs are forward's arguments and outputs its returned tensors, both by index: a tuple or
list result is flattened depth-first. A saved TorchScript module keeps no input dtypes or
shapes (a traced model's example shapes are dropped on save), so the guest's tensor type is
taken as given and torch checks the rest; its errors come back as BackendError.
On CUDA a traced model computes convolutions as it was traced: the trace records cuDNN's TF32
switch in each call (examples/classify/prepare.py traces with TF32 off).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import BackendError, InvalidArgument, UnsupportedOperation
from ..tensor import ExecutionTarget, GraphEncoding, Tensor
from . import NotStreaming
from ._autodetect import torch_zip_kind


class PytorchBackend:
    """`threads` is not applied: torch's only intra-op setting, torch.set_num_threads, is
    process-wide (no per-module or per-call scope), so one Host's value would change every
    other torch user in the process. torch keeps its own default (one thread per physical
    core); set OMP_NUM_THREADS or call torch.set_num_threads in the embedding program."""

    encoding = GraphEncoding.PYTORCH
    graph_files = ("model.pt",)

    def __init__(self, threads: int | None = None) -> None:
        del threads  # see the class docstring

    def device(self, target: ExecutionTarget) -> torch.device:
        if target == ExecutionTarget.CPU:
            return torch.device("cpu")
        if target in (ExecutionTarget.GPU, ExecutionTarget.AUTO):
            if torch.cuda.is_available():
                return torch.device("cuda")
            if target == ExecutionTarget.AUTO:
                return torch.device("cpu")
            if torch.version.cuda is None:
                raise UnsupportedOperation(
                    f"target gpu needs torch with CUDA: this torch {torch.__version__} is a "
                    "CPU-only build (install a CUDA build of torch)")
            raise UnsupportedOperation(
                f"target gpu: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no "
                "CUDA device")
        raise UnsupportedOperation(f"the pytorch backend has no {target.name.lower()} target")

    def load(self, builders: Sequence[bytes | memoryview], target: ExecutionTarget) -> PytorchGraph:
        if len(builders) != 1:
            raise InvalidArgument(f"pytorch takes one builder (the TorchScript archive), "
                                  f"got {len(builders)}")
        device = self.device(target)
        archive = io.BytesIO(builders[0])
        try:
            with warnings.catch_warnings():
                # torch 2.13 deprecates TorchScript, the format wasi-nn's pytorch encoding reads
                warnings.filterwarnings("ignore", "`torch.jit", DeprecationWarning)
                module = torch.jit.load(archive, map_location=device)
        except Exception as e:  # torch raises RuntimeError, ValueError, pickle errors...
            if torch_zip_kind(archive) == "checkpoint":
                raise BackendError("this is a torch.save checkpoint, not TorchScript: save the "
                                   "model with torch.jit.save(torch.jit.trace(model, example))"
                                   ) from e
            raise BackendError(f"torch could not load the TorchScript model: "
                               f"{_message(e)}") from e
        return PytorchGraph(module.eval(), device)


def _message(error: BaseException) -> str:
    """torch's message; the TorchScript interpreter puts two tracebacks (of the exporter's
    code) before it, and the error itself is the last line."""
    text = str(error).strip()
    if "Traceback of TorchScript" in text:
        text = text.splitlines()[-1]
    return text


def _is_tensor_type(argument_type: Any) -> bool:
    kind = argument_type.kind()
    if kind == "OptionalType":
        kind = argument_type.getElementType().kind()
    return kind == "TensorType"


class PytorchGraph:
    def __init__(self, module: torch.jit.ScriptModule, device: torch.device) -> None:
        self.module = module
        self.device = device
        arguments = module.forward.schema.arguments[1:]  # [0] is self
        self.input_names = [a.name for a in arguments]
        self.input_types = [str(a.type) for a in arguments]
        self.input_is_tensor = [_is_tensor_type(a.type) for a in arguments]
        self.required = {i for i, a in enumerate(arguments) if not a.has_default_value()}

    def input_dtype(self, index: int) -> np.dtype | None:
        """TorchScript does not record it: float32, the common case, is only the ABI glue's
        hint to tell the two witx numberings apart (by byte length when the guest's type is
        not f32). set_input takes every witx type and torch decides."""
        if 0 <= index < len(self.input_names):
            return np.dtype(np.float32)
        return None

    def init_execution_context(self, config: Mapping[str, Any] | None = None) -> PytorchContext:
        return PytorchContext(self)  # TorchScript takes no per-context settings

    def close(self) -> None:
        self.module = None  # type: ignore[assignment]


class PytorchContext(NotStreaming):
    def __init__(self, graph: PytorchGraph) -> None:
        self._graph = graph
        self._inputs: dict[int, torch.Tensor] = {}
        self._outputs: list[np.ndarray] | None = None

    def set_input(self, index: int, tensor: Tensor) -> None:
        graph = self._graph
        if not 0 <= index < len(graph.input_names):
            raise InvalidArgument(f"input index {index} out of range: forward takes "
                                  f"{len(graph.input_names)} input(s)")
        if not graph.input_is_tensor[index]:
            raise InvalidArgument(f"input {index} ({graph.input_names[index]}) is a "
                                  f"{graph.input_types[index]}, not a tensor")
        try:
            array = tensor.data.reshape(tensor.dims)
        except ValueError as e:
            raise InvalidArgument(f"input {index}: dims {list(tensor.dims)}: {e}") from None
        # from_numpy shares memory and needs it writable; the glue's copies are
        self._inputs[index] = torch.from_numpy(array if array.flags.writeable else array.copy())

    def compute(self) -> None:
        graph = self._graph
        missing = [graph.input_names[i] for i in sorted(graph.required) if i not in self._inputs]
        if missing:
            raise InvalidArgument(f"compute before every input is set (missing: {', '.join(missing)})")
        # by name, so an optional argument left unset before a set one keeps its default
        arguments = {graph.input_names[i]: t.to(graph.device) for i, t in self._inputs.items()}
        try:
            with torch.inference_mode():
                result = graph.module(**arguments)
        except Exception as e:
            raise BackendError(f"torch failed: {_message(e)}") from e
        self._outputs = [_to_numpy(i, t) for i, t in enumerate(_flatten(result))]

    def get_output(self, index: int) -> np.ndarray:
        outputs = self._outputs
        if outputs is None:
            raise InvalidArgument("get_output before compute")
        if not 0 <= index < len(outputs):
            raise InvalidArgument(f"output index {index} out of range: the model returned "
                                  f"{len(outputs)} tensor(s)")
        return outputs[index]

    def close(self) -> None:
        self._inputs.clear()
        self._outputs = None


def _flatten(result: Any) -> list[torch.Tensor]:
    """forward's result as tensors, depth-first through tuples and lists."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in _flatten(item)]
    raise BackendError(f"the model returned a {type(result).__name__}: outputs must be "
                       "tensors, or tuples and lists of them")


def _to_numpy(index: int, tensor: torch.Tensor) -> np.ndarray:
    try:
        return np.ascontiguousarray(tensor.detach().cpu().numpy())
    except TypeError:  # bfloat16, float8, quantized...: no numpy dtype, no witx type
        raise BackendError(f"output {index} is {tensor.dtype}, which has no wasi-nn tensor "
                           "type") from None
