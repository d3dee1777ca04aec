"""The classify demo's model as a TFLite flatbuffer, made without TensorFlow.

    python to_tflite.py OUTDIR

Writes ``OUTDIR/efficientnet-lite0/model.tflite`` (skipped if it exists) from the
``model.onnx`` that ``prepare.py`` exports (made first if missing): the same
network and weights, the same input (``input`` float32 [1, 3, 224, 224], NCHW,
normalized as prepare.py says) and output (``logits`` float32 [1, 1000]), so the
classify guest runs it unchanged through the tensorflowlite backend.

How: onnxruntime's basic graph optimizations fold the exported graph's padding
arithmetic and leave a handful of operators (Conv, Sigmoid, Mul, Add,
GlobalAveragePool, Reshape, Gemm); each becomes its TFLite builtin, written with
the flatbuffer schema that ``ai-edge-litert`` ships (``TfliteWriter``, also used by
the tests for small models). TFLite convolutions are NHWC, so the model starts with
one TRANSPOSE from NCHW and keeps NHWC inside. The result is checked against
onnxruntime on the cat photo (max |logit difference| <= TOLERANCE).

(LiteRT's own PyTorch converter, ``litert-torch``, would pull a 300 MB MLIR
converter, jax, and older pydantic and typing-extensions than the server extra
uses; this needs only what the project already installs.)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

HERE = Path(__file__).resolve().parent
MODEL_NAME = "efficientnet-lite0"
TOLERANCE = 1e-4  # max |LiteRT - onnxruntime| accepted on the logits

_TENSOR_TYPES = {np.dtype(np.float32): schema.TensorType.FLOAT32,
                 np.dtype(np.float16): schema.TensorType.FLOAT16,
                 np.dtype(np.float64): schema.TensorType.FLOAT64,
                 np.dtype(np.uint8): schema.TensorType.UINT8,
                 np.dtype(np.int8): schema.TensorType.INT8,
                 np.dtype(np.int16): schema.TensorType.INT16,
                 np.dtype(np.int32): schema.TensorType.INT32,
                 np.dtype(np.int64): schema.TensorType.INT64,
                 np.dtype(np.bool_): schema.TensorType.BOOL}


class TfliteWriter:
    """One-subgraph TFLite models, op by op: tensors, constants, builtin operators."""

    def __init__(self) -> None:
        self._tensors: list[schema.TensorT] = []
        self._buffers = [schema.BufferT()]  # buffer 0: the empty one activations point at
        self._opcodes: dict[int, int] = {}
        self._operators: list[schema.OperatorT] = []

    def tensor(self, name: str, shape: tuple[int, ...] | list[int], dtype: np.dtype | type,
               *, data: np.ndarray | None = None, signature: list[int] | None = None,
               scale: float | None = None, zero_point: int = 0) -> int:
        """A tensor's index; `data` makes it a constant, `signature` marks dynamic dims (-1),
        `scale` and `zero_point` quantize it (per tensor)."""
        t = schema.TensorT()
        t.name = name
        t.shape = [int(d) for d in shape]
        t.type = _TENSOR_TYPES[np.dtype(dtype)]
        if signature is not None:
            t.shapeSignature = list(signature)
        if scale is not None:
            q = schema.QuantizationParametersT()
            q.scale, q.zeroPoint = [float(scale)], [int(zero_point)]
            t.quantization = q
        if data is not None:
            buffer = schema.BufferT()
            buffer.data = np.frombuffer(np.ascontiguousarray(data, dtype).tobytes(), np.uint8)
            self._buffers.append(buffer)
            t.buffer = len(self._buffers) - 1
        self._tensors.append(t)
        return len(self._tensors) - 1

    def constant(self, name: str, data: np.ndarray) -> int:
        return self.tensor(name, data.shape, data.dtype, data=data)

    def op(self, builtin: str, inputs: list[int], outputs: list[int],
           options: str | None = None, **fields: object) -> None:
        """Append a builtin operator (`"CONV_2D"`), with its `options` table
        (`"Conv2DOptions"`) filled from `fields` (`padding=..., strideW=...`)."""
        code = getattr(schema.BuiltinOperator, builtin)
        if code not in self._opcodes:
            self._opcodes[code] = len(self._opcodes)
        o = schema.OperatorT()
        o.opcodeIndex = self._opcodes[code]
        o.inputs, o.outputs = list(inputs), list(outputs)
        if options is not None:
            table = getattr(schema, options + "T")()
            for key, value in fields.items():
                setattr(table, key, value)
            o.builtinOptionsType = getattr(schema.BuiltinOptions, options)
            o.builtinOptions = table
        self._operators.append(o)

    def finish(self, inputs: list[int], outputs: list[int]) -> bytes:
        codes = []
        for code in sorted(self._opcodes, key=self._opcodes.get):
            c = schema.OperatorCodeT()
            c.builtinCode = code
            c.deprecatedBuiltinCode = min(code, 127)  # readers before 2.3 look only here
            c.version = 1
            codes.append(c)
        graph = schema.SubGraphT()
        graph.tensors, graph.operators = self._tensors, self._operators
        graph.inputs, graph.outputs = list(inputs), list(outputs)
        model = schema.ModelT()
        model.version = 3
        model.operatorCodes, model.subgraphs, model.buffers = codes, [graph], self._buffers
        model.description = "written by wasinn's to_tflite.py"
        builder = flatbuffers.Builder(1 << 20)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


# --- ONNX -> TFLite, for the operators EfficientNet-Lite0 leaves after ORT's folding -------


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TFLite's SAME: the total padding, the extra pixel at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _simplified(onnx_path: Path) -> "onnx.ModelProto":  # noqa: F821
    """The graph after onnxruntime's basic optimizations (constant folding), reloaded."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(tmp) / "basic.onnx")
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def onnx_to_tflite(onnx_path: Path) -> bytes:
    """Convert a single-input NCHW float32 image classifier made of the operators below."""
    import onnx
    from onnx import numpy_helper

    model = _simplified(onnx_path)
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    shapes = {}  # ONNX name -> NHWC shape of the TFLite tensor
    ids: dict[str, int] = {}
    w = TfliteWriter()

    (graph_input,) = [i for i in model.graph.input if i.name not in consts]
    nchw = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    source = w.tensor(graph_input.name, nchw, np.float32)
    nhwc = [nchw[0], nchw[2], nchw[3], nchw[1]]
    ids[graph_input.name] = w.tensor(graph_input.name + "/nhwc", nhwc, np.float32)
    shapes[graph_input.name] = nhwc
    w.op("TRANSPOSE", [source, w.constant("nchw_to_nhwc", np.array([0, 2, 3, 1], np.int32))],
         [ids[graph_input.name]])

    def out(name: str, shape: list[int]) -> int:
        shapes[name] = shape
        ids[name] = w.tensor(name, shape, np.float32)
        return ids[name]

    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        x = node.input[0]
        if node.op_type == "Conv":
            weight = consts[node.input[1]]
            bias = consts[node.input[2]] if len(node.input) > 2 else np.zeros(weight.shape[0],
                                                                               np.float32)
            n, h, wd, c = shapes[x]
            kh, kw = attrs["kernel_shape"]
            sh, sw = attrs.get("strides", [1, 1])
            if attrs.get("dilations", [1, 1]) != [1, 1] or attrs.get("auto_pad", b"NOTSET") != b"NOTSET":
                raise ValueError(f"{node.name}: dilated or auto_pad convolutions are not handled")
            top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
            source_id = ids[x]
            if (top, bottom) == _same_padding(h, kh, sh) and (left, right) == _same_padding(wd, kw, sw):
                padding = schema.Padding.SAME
            else:  # explicit padding, then a VALID convolution
                padding = schema.Padding.VALID
                h, wd = h + top + bottom, wd + left + right
                padded = w.tensor(node.name + "/padded", [n, h, wd, c], np.float32)
                pads = np.array([[0, 0], [top, bottom], [left, right], [0, 0]], np.int32)
                w.op("PAD", [source_id, w.constant(node.name + "/pads", pads)], [padded])
                source_id = padded
                top = left = bottom = right = 0
            oh = (h + top + bottom - kh) // sh + 1 if padding == schema.Padding.VALID else -(-h // sh)
            ow = (wd + left + right - kw) // sw + 1 if padding == schema.Padding.VALID else -(-wd // sw)
            group = attrs.get("group", 1)
            o = weight.shape[0]
            bias_id = w.constant(node.input[2] if len(node.input) > 2 else node.name + "/bias",
                                 bias.astype(np.float32))
            if group == 1:  # [O, I, kh, kw] -> [O, kh, kw, I]
                weight_id = w.constant(node.input[1], weight.transpose(0, 2, 3, 1))
                w.op("CONV_2D", [source_id, weight_id, bias_id], [out(node.output[0], [n, oh, ow, o])],
                     "Conv2DOptions", padding=padding, strideH=sh, strideW=sw)
            elif group == c == o:  # depthwise: [C, 1, kh, kw] -> [1, kh, kw, C]
                weight_id = w.constant(node.input[1], weight.transpose(1, 2, 3, 0))
                w.op("DEPTHWISE_CONV_2D", [source_id, weight_id, bias_id],
                     [out(node.output[0], [n, oh, ow, o])], "DepthwiseConv2DOptions",
                     padding=padding, strideH=sh, strideW=sw, depthMultiplier=1)
            else:
                raise ValueError(f"{node.name}: grouped convolution with {group} groups")
        elif node.op_type == "Sigmoid":
            w.op("LOGISTIC", [ids[x]], [out(node.output[0], shapes[x])])
        elif node.op_type in ("Mul", "Add"):
            a, b = node.input
            if shapes[a] != shapes[b]:
                raise ValueError(f"{node.name}: broadcasting is not handled")
            options = "MulOptions" if node.op_type == "Mul" else "AddOptions"
            w.op(node.op_type.upper(), [ids[a], ids[b]], [out(node.output[0], shapes[a])], options)
        elif node.op_type == "GlobalAveragePool":
            n, _, _, c = shapes[x]
            w.op("MEAN", [ids[x], w.constant(node.name + "/axes", np.array([1, 2], np.int32))],
                 [out(node.output[0], [n, 1, 1, c])], "ReducerOptions", keepDims=True)
        elif node.op_type in ("Reshape", "Flatten"):
            n, h, wd, c = shapes[x]
            if (h, wd) != (1, 1):  # NHWC and NCHW orders agree only without spatial extent
                raise ValueError(f"{node.name}: flattening a spatial tensor is not handled")
            target = np.array([n, c], np.int32)
            w.op("RESHAPE", [ids[x], w.constant(node.name + "/shape", target)],
                 [out(node.output[0], [n, c])], "ReshapeOptions", newShape=target.tolist())
        elif node.op_type == "Gemm":
            if attrs.get("transA", 0) or not attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0 \
                    or attrs.get("beta", 1.0) != 1.0:
                raise ValueError(f"{node.name}: only x @ W.T + b is handled")
            weight, bias = consts[node.input[1]], consts[node.input[2]]  # [out, in], as TFLite's
            w.op("FULLY_CONNECTED", [ids[x], w.constant(node.input[1], weight),
                                     w.constant(node.input[2], bias)],
                 [out(node.output[0], [shapes[x][0], weight.shape[0]])], "FullyConnectedOptions")
        else:
            raise ValueError(f"operator {node.op_type} ({node.name}) is not handled")
    (graph_output,) = model.graph.output
    return w.finish([source], [ids[graph_output.name]])


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def check(tflite: bytes, onnx_path: Path, image: np.ndarray) -> float:
    """Max |LiteRT - onnxruntime| over the logits for one NCHW image batch."""
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: image})[0]
    interpreter = Interpreter(model_content=tflite)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    return float(np.abs(got - expected).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    args = parser.parse_args(argv)
    target = args.outdir / MODEL_NAME / "model.tflite"
    if target.exists():
        return 0
    spec = importlib.util.spec_from_file_location("wasinn_prepare", HERE / "prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    if prepare.main([str(args.outdir)]) != 0:
        return 1
    onnx_path = args.outdir / MODEL_NAME / "model.onnx"
    tflite = onnx_to_tflite(onnx_path)
    spec = importlib.util.spec_from_file_location("wasinn_reference", HERE / "reference.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    image = reference.preprocess(args.outdir / "chelsea.ppm")
    error = check(tflite, onnx_path, image)
    if error > TOLERANCE:
        print(f"{target}: LiteRT differs from onnxruntime by {error:.2e} "
              f"(> {TOLERANCE}); not written", file=sys.stderr)
        return 1
    _atomic_write(target, tflite)
    print(f"wrote {target} ({len(tflite) / 1e6:.1f} MB; max |logit - onnxruntime| {error:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
