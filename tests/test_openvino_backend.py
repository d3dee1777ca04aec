"""The OpenVINO backend (encoding 0): directly, through the exerciser guest, and the real
classifier through the classify guest, against onnxruntime."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ov = pytest.importorskip("openvino",
                         reason="openvino is not installed: pip install 'wasinn[openvino]'")

from exerciser import BUILDER, CURRENT, LEGACY, TARGET_CPU, Exerciser, check_add  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402
from onnx_models import OPSET, identity_model  # noqa: E402
from test_real_model import check_classifier  # noqa: E402
from wasinn import Host  # noqa: E402
from wasinn.backends import Backends  # noqa: E402
from wasinn.backends.openvino import OpenvinoBackend  # noqa: E402
from wasinn.errors import (BackendError, Errno, InvalidArgument,  # noqa: E402
                           InvalidEncoding, UnsupportedOperation)
from wasinn.tensor import ExecutionTarget, GraphEncoding, Tensor, TensorType  # noqa: E402

ENCODING_OPENVINO = 0
CPU = ExecutionTarget.CPU
HAS_GPU = any(name.split(".")[0] == "GPU" for name in ov.Core().available_devices)

#: exact values per witx type; i64 stays inside int32 (OpenVINO computes i64 as i32)
VALUES = {
    "f16": np.array([[1.5, -2.0], [65504.0, 6.1035e-05]], dtype=np.float16),
    "f32": np.array([[1.5, -2.0], [3.4e38, -1.17549435e-38]], dtype=np.float32),
    "f64": np.array([[1.5, -2.0], [1.7976931348623157e308, 5e-324]], dtype=np.float64),
    "u8": np.array([[0, 255], [128, 7]], dtype=np.uint8),
    "i32": np.array([[0, -1], [2**31 - 1, -(2**31)]], dtype=np.int32),
    "i64": np.array([[0, -1], [2**31 - 1, -(2**31)]], dtype=np.int64),
}


def to_ir(onnx_path: Path, directory: Path) -> Path:
    """OpenVINO's own converter: an ONNX file -> directory/model.xml + model.bin (f32 weights)."""
    directory.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.convert_model(str(onnx_path)), str(directory / "model.xml"),
                  compress_to_fp16=False)
    return directory


def ir_builders(directory: Path) -> list[bytes]:
    return [(directory / "model.xml").read_bytes(), (directory / "model.bin").read_bytes()]


@pytest.fixture(scope="module")
def ir_models(onnx_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Path]:
    """`add` and `two_outputs` as IR directories named after the model."""
    root = tmp_path_factory.mktemp("ir")
    return {name: to_ir(onnx_models[name], root / name) for name in ("add", "two_outputs")}


def run_two_outputs(graph) -> tuple[list[float], list[int]]:
    ctx = graph.init_execution_context()
    ctx.set_input(1, Tensor.from_array(np.array([1, -2, 3], np.int64)))
    ctx.set_input(0, Tensor.from_array(np.array([0.5, 1, 2, -4], np.float32)))
    ctx.compute()
    return ctx.get_output(0).tolist(), ctx.get_output(1).tolist()


# --- the backend directly ----------------------------------------------------------------------

def test_onnx_builder_inputs_and_outputs_by_index(onnx_models: dict[str, Path]) -> None:
    graph = OpenvinoBackend().load([onnx_models["two_outputs"].read_bytes()], CPU)
    assert graph.input_dtype(0) == np.float32 and graph.input_dtype(1) == np.int64
    assert graph.input_dtype(2) is None
    assert run_two_outputs(graph) == ([1.0, 2.0, 4.0, -8.0], [-1, 2, -3])


def test_ir_builders(ir_models: dict[str, Path]) -> None:
    graph = OpenvinoBackend().load(ir_builders(ir_models["two_outputs"]), CPU)
    assert graph.input_names == ["a", "b"]
    assert run_two_outputs(graph) == ([1.0, 2.0, 4.0, -8.0], [-1, 2, -3])
    # a registry hands over bytearrays, the guest glue bytes
    graph = OpenvinoBackend().load([bytearray(b) for b in ir_builders(ir_models["add"])], CPU)
    ctx = graph.init_execution_context()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    ctx.set_input(0, Tensor.from_array(x))
    read_only = np.frombuffer((x * 10).tobytes(), np.float32).reshape(2, 3)
    ctx.set_input(1, Tensor.from_array(read_only))
    ctx.compute()
    assert ctx.get_output(0).tolist() == (x * 11).tolist()


def test_input_checks(onnx_models: dict[str, Path], tmp_path: Path) -> None:
    ctx = OpenvinoBackend().load([onnx_models["two_outputs"].read_bytes()],
                                 CPU).init_execution_context()
    with pytest.raises(InvalidArgument, match="expects float32, got float64"):
        ctx.set_input(0, Tensor.from_array(np.zeros(4, np.float64)))
    with pytest.raises(InvalidArgument, match=r"expects dims \[4\], got \[5\]"):
        ctx.set_input(0, Tensor.from_array(np.zeros(5, np.float32)))
    with pytest.raises(InvalidArgument, match="out of range: the model has 2 input"):
        ctx.set_input(2, Tensor.from_array(np.zeros(4, np.float32)))
    with pytest.raises(InvalidArgument, match="int32, and 2147483648 does not fit"):
        ctx.set_input(1, Tensor.from_array(np.array([1, 2**31, 3], np.int64)))
    ctx.set_input(0, Tensor.from_array(np.zeros(4, np.float32)))
    with pytest.raises(InvalidArgument, match=r"missing: b\)"):
        ctx.compute()
    with pytest.raises(InvalidArgument, match="before compute"):
        ctx.get_output(0)
    ctx.set_input(1, Tensor.from_array(np.array([1, -(2**31), 3], np.int64)))
    ctx.compute()
    assert ctx.get_output(1).tolist() == [-1, -(2**31), -3]  # -(-2**31) wraps in int32
    with pytest.raises(InvalidArgument, match="out of range: the model has 2 output"):
        ctx.get_output(2)
    # a dynamic dim takes any size, the static one is still checked
    dynamic = identity_model(tmp_path / "dynamic.onnx", "f32", ["batch", 2])
    ctx = OpenvinoBackend().load([dynamic.read_bytes()], CPU).init_execution_context()
    for rows in (1, 3):
        x = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
        ctx.set_input(0, Tensor.from_array(x))
        ctx.compute()
        assert ctx.get_output(0).tolist() == x.tolist()
    with pytest.raises(InvalidArgument, match=r"expects dims \[\?,2\], got \[3, 3\]"):
        ctx.set_input(0, Tensor.from_array(np.zeros((3, 3), np.float32)))
    # an element type no witx tensor type carries: the glue hands such an input raw bytes
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2])
    bf16 = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])],
                                               "bf16", [x], [y]), opset_imports=OPSET)
    graph = OpenvinoBackend().load([bf16.SerializeToString()], CPU)
    assert graph.input_dtype(0) is None
    with pytest.raises(InvalidArgument, match="bf16, which no wasi-nn tensor type carries"):
        graph.init_execution_context().set_input(
            0, Tensor((2,), TensorType.U8, np.zeros(4, np.uint8)))


def test_contexts_are_independent(onnx_models: dict[str, Path]) -> None:
    graph = OpenvinoBackend().load([onnx_models["identity_f32"].read_bytes()], CPU)
    first, second = graph.init_execution_context(), graph.init_execution_context()
    ones, twos = np.ones((2, 2), np.float32), np.full((2, 2), 2, np.float32)
    first.set_input(0, Tensor.from_array(ones))
    second.set_input(0, Tensor.from_array(twos))
    first.compute()
    second.compute()
    out = first.get_output(0)
    first.set_input(0, Tensor.from_array(twos))
    first.compute()
    assert out.tolist() == ones.tolist()  # an output handed out is the caller's own copy
    assert second.get_output(0).tolist() == twos.tolist()


def test_every_witx_type(onnx_models: dict[str, Path]) -> None:
    backend = OpenvinoBackend()
    for tensor_type in TensorType:
        type_name = tensor_type.name.lower()
        graph = backend.load([onnx_models[f"identity_{type_name}"].read_bytes()], CPU)
        assert graph.input_dtype(0) == tensor_type.dtype
        ctx = graph.init_execution_context()
        data = VALUES[type_name]
        ctx.set_input(0, Tensor((2, 2), tensor_type, data.ravel()))
        ctx.compute()
        assert ctx.get_output(0).tobytes() == data.tobytes()


def test_compiled_for_f32_and_threads(onnx_models: dict[str, Path]) -> None:
    graph = Backends(threads=1).get(GraphEncoding.OPENVINO).load(
        [onnx_models["add"].read_bytes()], CPU)
    assert graph.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert graph.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert graph.compiled.get_property("EXECUTION_DEVICES") == ["CPU"]


def test_bad_builders(onnx_models: dict[str, Path], ir_models: dict[str, Path]) -> None:
    backend = OpenvinoBackend()
    xml, weights = ir_builders(ir_models["add"])
    with pytest.raises(InvalidArgument, match="got 3") as error:
        backend.load([xml, weights, weights], CPU)
    assert error.value.errno == Errno.INVALID_ARGUMENT
    with pytest.raises(InvalidArgument, match="got 0"):
        backend.load([], CPU)
    with pytest.raises(InvalidArgument, match="builder 0 of two must be the IR's model.xml"):
        backend.load([weights, xml], CPU)
    with pytest.raises(BackendError, match="could not read the model: Unable to read") as error:
        backend.load([b"definitely not a model"], CPU)
    assert error.value.errno == Errno.RUNTIME_ERROR
    xml, weights = ir_builders(ir_models["two_outputs"])  # `add` has no weights
    with pytest.raises(BackendError, match="could not read the model: .*weights"):
        backend.load([xml, weights[:len(weights) // 2]], CPU)  # model.bin cut short
    with pytest.raises(UnsupportedOperation, match="tpu") as error:
        backend.load([onnx_models["add"].read_bytes()], ExecutionTarget.TPU)
    assert error.value.errno == Errno.UNSUPPORTED_OPERATION


@pytest.mark.skipif(HAS_GPU, reason="OpenVINO sees a GPU here")
def test_gpu_target_without_a_gpu_names_what_is_missing(onnx_models: dict[str, Path]) -> None:
    model = [onnx_models["add"].read_bytes()]
    with pytest.raises(UnsupportedOperation, match="needs an OpenVINO GPU device .* sees only"):
        OpenvinoBackend().load(model, ExecutionTarget.GPU)
    graph = OpenvinoBackend().load(model, ExecutionTarget.AUTO)  # auto falls back to the CPU
    assert graph.compiled.get_property("EXECUTION_DEVICES") == ["CPU"]


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU OpenVINO can use (an Intel GPU)")
def test_gpu_target_uses_the_gpu(onnx_models: dict[str, Path]) -> None:
    graph = OpenvinoBackend().load([onnx_models["two_outputs"].read_bytes()], ExecutionTarget.GPU)
    assert graph.compiled.get_property("EXECUTION_DEVICES")[0].startswith("GPU")
    assert run_two_outputs(graph) == ([1.0, 2.0, 4.0, -8.0], [-1, 2, -3])


def test_backends_by_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    backends = Backends()
    assert isinstance(backends.get(0), OpenvinoBackend)
    assert backends.get(GraphEncoding.OPENVINO) is backends.get(0)
    # without the framework: invalid_encoding naming the extra to install
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now fails
    monkeypatch.delitem(sys.modules, "wasinn.backends.openvino")
    with pytest.raises(InvalidEncoding, match=r"needs openvino: pip install 'wasinn\[openvino\]'"):
        Backends().get(GraphEncoding.OPENVINO)


def test_streaming_calls_are_unsupported(onnx_models: dict[str, Path]) -> None:
    ctx = OpenvinoBackend().load([onnx_models["add"].read_bytes()], CPU).init_execution_context()
    for call in (ctx.compute_single, ctx.fini_single, lambda: ctx.get_output_single(0)):
        with pytest.raises(UnsupportedOperation):
            call()


# --- through a guest: guests/abi_exerciser.wasm --------------------------------------------------

@pytest.fixture(scope="module")
def host(onnx_models: dict[str, Path], ir_models: dict[str, Path]):
    """`add` by WasmEdge's syntax as ONNX and as IR, `two_outputs` as a wasmtime graph dir."""
    add_ir = ir_models["add"]
    h = Host(models=[f"add:openvino:cpu:{onnx_models['add']}",
                     f"add_ir:OPENVINO:CPU:{add_ir / 'model.xml'}:{add_ir / 'model.bin'}"],
             module_cache=False)
    h.add_graph_dir(f"openvino::{ir_models['two_outputs']}")
    yield h
    h.close()


@pytest.fixture
def ex(host: Host, guests: dict[str, Path]) -> Exerciser:
    return Exerciser(host, host.compile(guests["abi_exerciser"]))


def load_builders(ex: Exerciser, builders: list[bytes], target: int = TARGET_CPU
                  ) -> tuple[int, int | None]:
    table = b"".join(BUILDER.pack(ex.put(b), len(b)) for b in builders)
    out = ex.out_slot()
    errno = ex.raw("load", ex.put(table), len(builders), ENCODING_OPENVINO, target, out)
    return errno, (ex.read_u32(out) if errno == 0 else None)


def test_guest_loads_by_bytes(ex: Exerciser, onnx_models: dict[str, Path],
                              ir_models: dict[str, Path]) -> None:
    errno, graph = ex.load(onnx_models["add"].read_bytes(), ENCODING_OPENVINO)
    assert errno == Errno.SUCCESS, ex.last_error
    check_add(ex, graph)
    errno, graph = load_builders(ex, ir_builders(ir_models["add"]))
    assert errno == Errno.SUCCESS, ex.last_error
    check_add(ex, graph)


def test_guest_loads_by_name(ex: Exerciser) -> None:
    for name in ("add", "add_ir"):
        errno, graph = ex.load_by_name(name)
        assert errno == Errno.SUCCESS, ex.last_error
        check_add(ex, graph)
    errno, graph = ex.load_by_name("two_outputs")  # the graph dir's name
    assert errno == Errno.SUCCESS, ex.last_error
    a = np.array([1.5, -2.0, 0.0, 1e30], dtype=np.float32)
    b = np.array([7, -(2**31) + 1, 2**31 - 1], dtype=np.int64)
    for i64 in (CURRENT["i64"], LEGACY["i64"]):  # both numberings, told apart by the graph
        doubled, negated = ex.infer(graph, [(CURRENT["f32"], a), (i64, b)], [16, 24])
        assert doubled == (a * 2).tobytes() and negated == (-b).tobytes()


def test_guest_errors(ex: Exerciser, onnx_models: dict[str, Path],
                      ir_models: dict[str, Path]) -> None:
    xml, weights = ir_builders(ir_models["add"])
    cases = [
        ([xml, weights, weights], TARGET_CPU, Errno.INVALID_ARGUMENT, "got 3"),
        ([weights, xml], TARGET_CPU, Errno.INVALID_ARGUMENT, "must be the IR's model.xml"),
        ([b"not a model"], TARGET_CPU, Errno.RUNTIME_ERROR, "could not read the model"),
        ([onnx_models["add"].read_bytes()], 2, Errno.UNSUPPORTED_OPERATION, "no tpu target"),
    ]
    for builders, target, expected, text in cases:
        errno, _ = load_builders(ex, builders, target)
        assert errno == expected, ex.last_error
        assert ex.last_error.startswith("load: ") and text in ex.last_error
    errno, graph = ex.load_by_name("add")
    assert errno == Errno.SUCCESS
    errno, ctx = ex.init(graph)
    wrong = np.zeros((3, 2), np.float32)
    assert ex.set_input(ctx, 0, CURRENT["f32"], wrong) == Errno.INVALID_ARGUMENT
    assert "expects dims [2,3], got [3, 2]" in ex.last_error
    assert ex.raw("compute", ctx) == Errno.INVALID_ARGUMENT
    assert "compute before every input is set" in ex.last_error
    check_add(ex, graph)  # the guest goes on


# --- the real classifier through guests/classify.wasm ---------------------------------------------

@pytest.fixture(scope="module")
def classifier_ir(example_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EfficientNet-Lite0's IR, made from the exported ONNX by OpenVINO's converter."""
    return to_ir(example_assets / "efficientnet-lite0" / "model.onnx",
                 tmp_path_factory.mktemp("classifier") / "efficientnet-lite0")


@pytest.mark.parametrize("form", ["onnx", "ir", "ir-graph-dir"])
def test_classifier_matches_onnxruntime(form: str, guests: dict[str, Path], example_assets: Path,
                                        classifier_ir: Path, reference, tmp_path: Path) -> None:
    onnx_model = example_assets / "efficientnet-lite0" / "model.onnx"
    host = Host(module_cache=tmp_path)
    if form == "onnx":
        host.add_model(f"efficientnet-lite0:openvino:cpu:{onnx_model}")
    elif form == "ir":
        host.add_model(f"efficientnet-lite0:openvino:cpu:{classifier_ir / 'model.xml'}:"
                       f"{classifier_ir / 'model.bin'}")
    else:
        host.add_graph_dir(f"openvino::{classifier_ir}")
    try:
        # measured: logits within 1.5e-5 of onnxruntime's, probabilities within 1e-6
        check_classifier(host, guests, example_assets, reference)
        assert host.registry.get("efficientnet-lite0").compiled.get_property(
            "EXECUTION_DEVICES") == ["CPU"]
    finally:
        host.close()
