"""wasinn: a wasi-nn host for wasmtime-py."""

from .errors import Errno, WasiNnError
from .host import GuestTimeout, Host, Preopen
from .registry import ModelSpec
from .tensor import ExecutionTarget, GraphEncoding, Tensor, TensorType

__version__ = "0.1.0"

__all__ = ["Errno", "ExecutionTarget", "GraphEncoding", "GuestTimeout", "Host", "ModelSpec",
           "Preopen", "Tensor", "TensorType", "WasiNnError", "__version__"]
