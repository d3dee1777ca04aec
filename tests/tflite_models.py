"""Small TFLite models for the tensorflowlite backend's tests, written op by op with the
classify example's TfliteWriter (the flatbuffer schema ai-edge-litert ships; no TensorFlow)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from wasinn.tensor import TensorType

_SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "classify" / "to_tflite.py"


def to_tflite():
    """examples/classify/to_tflite.py as a module (loaded once)."""
    name = "wasinn_to_tflite"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, _SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


def _writer_class():
    return to_tflite().TfliteWriter


def add() -> bytes:
    """z = x + y, float32 [2, 3] each (tests/exerciser.py's check_add)."""
    w = _writer_class()()
    x, y = w.tensor("x", [2, 3], np.float32), w.tensor("y", [2, 3], np.float32)
    z = w.tensor("z", [2, 3], np.float32)
    w.op("ADD", [x, y], [z], "AddOptions")
    return w.finish([x, y], [z])


def mismatched_add() -> bytes:
    """A well-formed flatbuffer whose ADD cannot broadcast [2] with [3]: fails to prepare."""
    w = _writer_class()()
    x, y = w.tensor("x", [2], np.float32), w.tensor("y", [3], np.float32)
    z = w.tensor("z", [3], np.float32)
    w.op("ADD", [x, y], [z], "AddOptions")
    return w.finish([x, y], [z])


def output_out_of_range() -> bytes:
    """The int8 DEQUANTIZE model, its subgraph's output naming a tensor it does not have."""
    w = _writer_class()()
    q = w.tensor("q", [4], np.int8, scale=0.5, zero_point=-1)
    w.op("DEQUANTIZE", [q], [w.tensor("real", [4], np.float32)])
    return w.finish([q], [7])


def two_outputs() -> bytes:
    """Inputs x float32 [4], y int32 [3]; outputs x * 2 and -y."""
    w = _writer_class()()
    x, y = w.tensor("x", [4], np.float32), w.tensor("y", [3], np.int32)
    doubled, negated = w.tensor("doubled", [4], np.float32), w.tensor("negated", [3], np.int32)
    w.op("MUL", [x, w.constant("two", np.array([2], np.float32))], [doubled], "MulOptions")
    w.op("NEG", [y], [negated])
    return w.finish([x, y], [doubled, negated])


def identity(dtype: np.dtype | type) -> bytes:
    """[2, 2] in, the same values out as [4] (a RESHAPE, which takes any dtype)."""
    w = _writer_class()()
    x, y = w.tensor("x", [2, 2], dtype), w.tensor("y", [4], dtype)
    shape = np.array([4], np.int32)
    w.op("RESHAPE", [x, w.constant("shape", shape)], [y], "ReshapeOptions",
         newShape=shape.tolist())
    return w.finish([x], [y])


def dynamic_rows() -> bytes:
    """x float32 [-1, 3] (rows set at run time) + [10, 20, 30]."""
    w = _writer_class()()
    x = w.tensor("x", [1, 3], np.float32, signature=[-1, 3])
    y = w.tensor("y", [1, 3], np.float32, signature=[-1, 3])
    w.op("ADD", [x, w.constant("offsets", np.array([10, 20, 30], np.float32))], [y], "AddOptions")
    return w.finish([x], [y])


def dequantize(dtype: np.dtype | type, scale: float, zero_point: int) -> bytes:
    """A quantized [4] input (int8 or uint8) -> float32 (q - zero_point) * scale."""
    w = _writer_class()()
    q = w.tensor("q", [4], dtype, scale=scale, zero_point=zero_point)
    real = w.tensor("real", [4], np.float32)
    w.op("DEQUANTIZE", [q], [real])
    return w.finish([q], [real])


def make_all(directory: Path) -> dict[str, Path]:
    """Every model above as DIRECTORY/NAME.tflite."""
    models = {"add": add(), "mismatched_add": mismatched_add(),
              "output_out_of_range": output_out_of_range(), "two_outputs": two_outputs(), "dynamic_rows": dynamic_rows(),
              "int8_dequantize": dequantize(np.int8, 0.5, -1),
              "uint8_dequantize": dequantize(np.uint8, 0.25, 128),
              "identity_int16": identity(np.int16)}
    for tensor_type in TensorType:
        models[f"identity_{tensor_type.name.lower()}"] = identity(tensor_type.dtype)
    paths = {}
    for name, data in models.items():
        paths[name] = directory / f"{name}.tflite"
        paths[name].write_bytes(data)
    return paths
