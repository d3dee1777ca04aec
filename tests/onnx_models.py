"""Small ONNX graphs made with onnx.helper, with outputs known exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = [helper.make_opsetid("", 17)]

#: witx tensor types and the ONNX element types that carry them
ELEMENT_TYPES = {
    "f16": (TensorProto.FLOAT16, np.float16),
    "f32": (TensorProto.FLOAT, np.float32),
    "f64": (TensorProto.DOUBLE, np.float64),
    "u8": (TensorProto.UINT8, np.uint8),
    "i32": (TensorProto.INT32, np.int32),
    "i64": (TensorProto.INT64, np.int64),
}


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def add_model(path: Path) -> Path:
    """z = x + y over float32 [2, 3]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])
    return _save(helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "add", [x, y], [z]),
                 path)


def identity_model(path: Path, type_name: str, shape: list[int]) -> Path:
    """y = x for one element type: the bytes come back unchanged."""
    elem, _ = ELEMENT_TYPES[type_name]
    x = helper.make_tensor_value_info("x", elem, shape)
    y = helper.make_tensor_value_info("y", elem, shape)
    return _save(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])],
                                   f"identity_{type_name}", [x], [y]), path)


def two_outputs_model(path: Path) -> Path:
    """Inputs a (f32 [4]) and b (i64 [3]); outputs doubled = a * 2, negated = -b, in that order."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [4])
    b = helper.make_tensor_value_info("b", TensorProto.INT64, [3])
    doubled = helper.make_tensor_value_info("doubled", TensorProto.FLOAT, [4])
    negated = helper.make_tensor_value_info("negated", TensorProto.INT64, [3])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [helper.make_node("Mul", ["a", "two"], ["doubled"]),
             helper.make_node("Neg", ["b"], ["negated"])]
    return _save(helper.make_graph(nodes, "two_outputs", [a, b], [doubled, negated],
                                   initializer=[two]), path)


def make_all(directory: Path) -> dict[str, Path]:
    models = {
        "add": add_model(directory / "add.onnx"),
        "two_outputs": two_outputs_model(directory / "two_outputs.onnx"),
    }
    for type_name in ELEMENT_TYPES:
        models[f"identity_{type_name}"] = identity_model(
            directory / f"identity_{type_name}.onnx", type_name, [2, 2])
    return models
