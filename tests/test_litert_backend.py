"""The LiteRT (TensorFlow Lite) backend: small models written op by op, MediaPipe's real face
detector (from the `mediapipe` wheel) and the classify example's EfficientNet-Lite0 converted
to TFLite, each checked against ai-edge-litert's Interpreter called directly."""

from __future__ import annotations

import importlib.metadata
import math
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert", reason="the tensorflowlite backend needs ai-edge-litert: "
                                              "pip install 'wasinn[litert]'")

from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from exerciser import CURRENT, LEGACY, Exerciser, check_add  # noqa: E402
from test_real_model import check_classifier  # noqa: E402
from tflite_models import make_all, to_tflite  # noqa: E402
from contexts import outputs_of  # noqa: E402
from wasinn import Host  # noqa: E402
from wasinn.backends import Backends  # noqa: E402
from wasinn.backends.litert import LiteRtBackend  # noqa: E402
from wasinn.errors import (BackendError, Errno, InvalidArgument, InvalidEncoding,  # noqa: E402
                           UnsupportedOperation, WasiNnError)
from wasinn.tensor import ExecutionTarget, GraphEncoding, Tensor, TensorType  # noqa: E402

ENCODING_TFLITE = int(GraphEncoding.TENSORFLOWLITE)
CPU = ExecutionTarget.CPU
#: the last mediapipe release that ships its models' .tflite files; installed with --no-deps
#: (its declared dependencies want numpy<2, jax and OpenCV; the files need none of them)
MEDIAPIPE = "mediapipe==0.10.21"


@pytest.fixture(scope="module")
def tflite_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_all(tmp_path_factory.mktemp("tflite"))


def load(path: Path, target: ExecutionTarget = CPU, threads: int | None = None):
    return LiteRtBackend(threads=threads).load([path.read_bytes()], target)


def run(graph, *arrays: np.ndarray) -> list[np.ndarray]:
    ctx = graph.init_execution_context()
    for index, array in enumerate(arrays):
        ctx.set_input(index, Tensor.from_array(array))
    ctx.compute()
    return outputs_of(ctx)


def direct(model: bytes, *arrays: np.ndarray) -> list[np.ndarray]:
    """ai-edge-litert's Interpreter on its own, with its defaults."""
    interpreter = Interpreter(model_content=model)
    interpreter.allocate_tensors()
    for details, array in zip(interpreter.get_input_details(), arrays):
        interpreter.set_tensor(details["index"], array)
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]


# --- the protocol on small models -----------------------------------------------------------

def test_inputs_and_outputs_by_index(tflite_models: dict[str, Path]) -> None:
    graph = load(tflite_models["two_outputs"])
    assert graph.input_dtype(0) == np.float32 and graph.input_dtype(1) == np.int32
    assert graph.input_dtype(2) is None
    ctx = graph.init_execution_context()
    ctx.set_input(1, Tensor.from_array(np.array([1, -2, 3], np.int32)))
    ctx.set_input(0, Tensor.from_array(np.array([0.5, 1, 2, -4], np.float32)))
    ctx.compute()
    assert ctx.get_output(0).tolist() == [1.0, 2.0, 4.0, -8.0]
    assert ctx.get_output(1).tolist() == [-1, 2, -3]
    with pytest.raises(InvalidArgument, match="out of range"):
        ctx.get_output(2)
    with pytest.raises(InvalidArgument, match="expects float32, got float64"):
        ctx.set_input(0, Tensor.from_array(np.zeros(4, np.float64)))
    with pytest.raises(InvalidArgument, match=r"expects dims \[4\], got \[2, 2\]"):
        ctx.set_input(0, Tensor.from_array(np.zeros((2, 2), np.float32)))
    with pytest.raises(InvalidArgument, match="out of range"):
        ctx.set_input(2, Tensor.from_array(np.zeros(4, np.float32)))
    # a failed set_input keeps the earlier one: the context still computes the same
    ctx.compute()
    assert ctx.get_output(0).tolist() == [1.0, 2.0, 4.0, -8.0]


def test_compute_and_outputs_need_their_inputs(tflite_models: dict[str, Path]) -> None:
    ctx = load(tflite_models["two_outputs"]).init_execution_context()
    with pytest.raises(InvalidArgument, match="get_output before compute"):
        ctx.get_output(0)
    ctx.set_input(0, Tensor.from_array(np.ones(4, np.float32)))
    with pytest.raises(InvalidArgument, match=r"missing: y"):
        ctx.compute()


def test_every_witx_type(tflite_models: dict[str, Path]) -> None:
    for tensor_type in TensorType:
        graph = load(tflite_models[f"identity_{tensor_type.name.lower()}"])
        assert graph.input_dtype(0) == tensor_type.dtype
        data = np.array([1, -2, 3, 100]).astype(tensor_type.dtype)
        (out,) = run(graph, data.reshape(2, 2))
        assert out.dtype == tensor_type.dtype and out.tobytes() == data.tobytes()


def test_quantized_models_take_their_raw_integers(tflite_models: dict[str, Path]) -> None:
    """int8 has no witx type: its bytes come as u8 and are read as int8, unscaled."""
    graph = load(tflite_models["int8_dequantize"])
    assert graph.input_dtype(0) == np.uint8
    raw = np.array([-128, -1, 0, 127], np.int8)
    (real,) = run(graph, raw.view(np.uint8))
    assert real.tolist() == [(q + 1) * 0.5 for q in raw.tolist()]  # scale 0.5, zero point -1
    with pytest.raises(InvalidArgument, match=r"expects int8 \(sent as uint8\), got float32"):
        run(graph, raw.astype(np.float32))

    graph = load(tflite_models["uint8_dequantize"])
    assert graph.input_dtype(0) == np.uint8
    (real,) = run(graph, np.array([0, 128, 129, 255], np.uint8))
    assert real.tolist() == [-32.0, 0.0, 0.25, 31.75]  # scale 0.25, zero point 128


def test_a_dtype_without_witx_type_takes_raw_bytes(tflite_models: dict[str, Path]) -> None:
    graph = load(tflite_models["identity_int16"])
    assert graph.input_dtype(0) is None  # the ABI glue hands the bytes over as they are
    values = np.array([-300, 2, 30000, -1], np.int16)
    ctx = graph.init_execution_context()
    ctx.set_input(0, Tensor((2, 2), TensorType.U8, values.view(np.uint8)))
    ctx.compute()
    assert ctx.get_output(0).tolist() == values.tolist()
    with pytest.raises(InvalidArgument, match="dims"):
        ctx.set_input(0, Tensor((2, 2), TensorType.U8, values[:2].view(np.uint8)))


def test_dynamic_dim_resizes_fixed_dims_are_exact(tflite_models: dict[str, Path]) -> None:
    graph = load(tflite_models["dynamic_rows"])
    ctx = graph.init_execution_context()
    for rows in (1, 3, 2, 3):
        x = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
        ctx.set_input(0, Tensor.from_array(x))
        ctx.compute()
        assert ctx.get_output(0).tolist() == (x + [10, 20, 30]).tolist()
    with pytest.raises(InvalidArgument, match=r"expects dims \['\?', 3\], got \[2, 4\]"):
        ctx.set_input(0, Tensor.from_array(np.zeros((2, 4), np.float32)))
    with pytest.raises(InvalidArgument, match=r"expects dims \['\?', 3\], got \[6\]"):
        ctx.set_input(0, Tensor.from_array(np.zeros(6, np.float32)))


def test_targets_and_bad_models(tflite_models: dict[str, Path]) -> None:
    backend = LiteRtBackend()
    model = [tflite_models["add"].read_bytes()]
    with pytest.raises(UnsupportedOperation, match="GPU delegate is not wired") as error:
        backend.load(model, ExecutionTarget.GPU)
    assert error.value.errno == Errno.UNSUPPORTED_OPERATION
    with pytest.raises(UnsupportedOperation, match="no tpu target"):
        backend.load(model, ExecutionTarget.TPU)
    backend.load(model, ExecutionTarget.AUTO)  # auto is the CPU
    with pytest.raises(BackendError, match="LiteRT could not load"):
        backend.load([b"definitely not a flatbuffer"], CPU)
    with pytest.raises(InvalidArgument, match="empty"):
        backend.load([b""], CPU)
    with pytest.raises(InvalidArgument, match="one builder"):
        backend.load(model * 2, CPU)
    with pytest.raises(BackendError, match="could not prepare"):
        backend.load([tflite_models["mismatched_add"].read_bytes()], CPU)
    with pytest.raises(BackendError, match="outside its 2 tensors"):
        backend.load([tflite_models["output_out_of_range"].read_bytes()], CPU)


def test_mutated_models_fail_cleanly(tflite_models: dict[str, Path]) -> None:
    """Byte-flipped small models: each loads and runs, or fails with a wasi-nn error; none
    escapes as another exception or takes the process down (LiteRT once did, freeing an
    interpreter whose subgraph output named no tensor)."""
    rng = np.random.default_rng(6)
    originals = [tflite_models[name].read_bytes()
                 for name in ("add", "two_outputs", "dynamic_rows", "int8_dequantize")]
    outcomes = {"ran": 0, "refused": 0}
    for _ in range(400):
        model = bytearray(originals[rng.integers(len(originals))])
        for position in rng.integers(len(model), size=rng.integers(1, 5)):
            model[position] = rng.integers(256)
        try:
            graph = LiteRtBackend().load([bytes(model)], CPU)
            ctx = graph.init_execution_context()
            for index, (shape, dtype) in enumerate(zip(graph.input_shapes, graph.input_dtypes)):
                dims = tuple(min(max(d, 1), 8) for d in shape)
                carrier = graph.input_dtype(index) or np.dtype(np.uint8)  # as the ABI glue
                zeros = np.zeros(math.prod(dims) * dtype.itemsize // carrier.itemsize, carrier)
                ctx.set_input(index, Tensor(dims, TensorType.from_dtype(carrier), zeros))
            ctx.compute()
            outcomes["ran"] += 1
        except WasiNnError:
            outcomes["refused"] += 1
    assert outcomes["ran"] > 0 and outcomes["refused"] > 300


def test_streaming_calls_are_unsupported(tflite_models: dict[str, Path]) -> None:
    ctx = load(tflite_models["add"]).init_execution_context()
    for call in (ctx.compute_single, ctx.fini_single, lambda: ctx.get_output_single(0)):
        with pytest.raises(UnsupportedOperation):
            call()


def test_contexts_run_at_once_on_threads(tflite_models: dict[str, Path]) -> None:
    """One graph, a context (an Interpreter) per thread, each gets its own answers."""
    graph = load(tflite_models["dynamic_rows"], threads=2)
    failures: list[str] = []

    def worker(seed: int) -> None:
        ctx = graph.init_execution_context()
        for step in range(50):
            x = np.full((1 + (seed + step) % 3, 3), seed * 1000 + step, np.float32)
            ctx.set_input(0, Tensor.from_array(x))
            ctx.compute()
            if ctx.get_output(0).tolist() != (x + [10, 20, 30]).tolist():
                failures.append(f"thread {seed} step {step}")
        ctx.close()

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_backends_by_encoding(tflite_models: dict[str, Path]) -> None:
    backends = Backends(threads=3)
    backend = backends.get(ENCODING_TFLITE)
    assert isinstance(backend, LiteRtBackend) and backend.graph_files == ("model.tflite",)
    assert backends.get(GraphEncoding.parse("TensorFlowLite")) is backend
    assert backend.load([tflite_models["add"].read_bytes()], CPU).threads == 3  # num_threads


def test_missing_framework_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "wasinn.backends.litert", raising=False)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # import fails
    with pytest.raises(InvalidEncoding, match=r"needs ai_edge_litert.*wasinn\[litert\]"):
        Backends().get(ENCODING_TFLITE)


# --- through a guest ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exerciser_module(guests):
    return guests["abi_exerciser"]


def test_guest_loads_bytes_and_names(tflite_models: dict[str, Path], exerciser_module: Path,
                                     tmp_path: Path) -> None:
    graph_dir = tmp_path / "adder"
    graph_dir.mkdir()
    shutil.copy(tflite_models["add"], graph_dir / "model.tflite")
    host = Host(models=[f"add:TENSORFLOWLITE:CPU:{tflite_models['add']}",
                        f"int8:tensorflowlite:auto:{tflite_models['int8_dequantize']}"],
                module_cache=False)
    host.add_graph_dir(f"tensorflowlite::{graph_dir}")
    ex = Exerciser(host, host.compile(exerciser_module))
    errno, graph = ex.load(tflite_models["add"].read_bytes(), ENCODING_TFLITE)
    assert errno == 0, ex.last_error
    check_add(ex, graph)
    for name in ("add", "adder"):
        errno, graph = ex.load_by_name(name)
        assert errno == 0, ex.last_error
        check_add(ex, graph)

    # an int8 model from a guest: u8 in either numbering, and the wrong type is refused
    errno, graph = ex.load_by_name("int8")
    assert errno == 0, ex.last_error
    raw = np.array([-128, -1, 0, 127], np.int8).view(np.uint8)
    for code in (CURRENT["u8"], LEGACY["u8"]):
        (out,) = ex.infer(graph, [(code, raw)], [16])
        assert np.frombuffer(out, np.float32).tolist() == [-63.5, 0.0, 0.5, 64.0]
    errno, ctx = ex.init(graph)
    assert ex.set_input(ctx, 0, CURRENT["f32"], raw.astype(np.float32)) == Errno.INVALID_ARGUMENT
    assert "expects int8 (sent as uint8)" in ex.last_error

    # gpu answers unsupported_operation, garbage runtime_error; the guest goes on
    errno, _ = ex.load(tflite_models["add"].read_bytes(), ENCODING_TFLITE, 1)
    assert errno == Errno.UNSUPPORTED_OPERATION and "GPU delegate" in ex.last_error
    errno, _ = ex.load(b"TFL3 but not really", ENCODING_TFLITE)
    assert errno == Errno.RUNTIME_ERROR
    errno, graph = ex.load_by_name("add")
    check_add(ex, graph)
    host.close()


# --- a real model: MediaPipe's short-range face detector ------------------------------------

def _mediapipe_model(name: str) -> Path:
    try:
        files = importlib.metadata.files("mediapipe") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"MediaPipe's models need `pip install --no-deps '{MEDIAPIPE}'`")
    found = [Path(f.locate()) for f in files if f.name == name]
    if not found:
        pytest.skip(f"this mediapipe wheel ships no {name}; `pip install --no-deps '{MEDIAPIPE}'`")
    return found[0]


@pytest.fixture(scope="module")
def face_detector() -> bytes:
    """face_detection_short_range.tflite: float32 [1, 128, 128, 3] RGB in [-1, 1]; outputs
    regressors [1, 896, 16] (box and 6 keypoints per anchor, in input pixels) and
    classificators [1, 896, 1] (a logit per anchor)."""
    return _mediapipe_model("face_detection_short_range.tflite").read_bytes()


def _photo(name: str) -> tuple[np.ndarray, tuple[int, int]]:
    """A scikit-image photo as the detector's input, and its (width, height)."""
    import skimage.data
    from PIL import Image

    pixels = getattr(skimage.data, name)()
    image = Image.fromarray(pixels).convert("RGB")
    small = np.asarray(image.resize((128, 128), Image.BILINEAR), np.float32)
    return (small / np.float32(127.5) - np.float32(1.0))[np.newaxis], image.size


def _anchors() -> np.ndarray:
    """The detector's 896 SSD anchor centres (0..1): 16x16 cells x 2, then 8x8 cells x 6."""
    centres = []
    for cells, per_cell in ((16, 2), (8, 6)):
        for y in range(cells):
            for x in range(cells):
                centres += [((x + 0.5) / cells, (y + 0.5) / cells)] * per_cell
    return np.array(centres, np.float32)


def _best_face(regressors: np.ndarray, logits: np.ndarray, size: tuple[int, int]):
    """The top anchor's score and its keypoints in photo pixels: right eye, left eye, nose,
    mouth (the subject's right and left)."""
    best = int(logits[0, :, 0].argmax())
    score = 1 / (1 + np.exp(-float(logits[0, best, 0])))
    points = _anchors()[best] + regressors[0, best, 4:12].reshape(4, 2) / 128
    return score, points * size


def test_face_detector_matches_litert_and_finds_the_face(face_detector: bytes) -> None:
    graph = LiteRtBackend().load([face_detector], CPU)
    assert graph.input_dtype(0) == np.float32
    astronaut, size = _photo("astronaut")
    outputs = run(graph, astronaut)
    expected = direct(face_detector, astronaut)
    assert [o.shape for o in outputs] == [(1, 896, 16), (1, 896, 1)]
    for got, want in zip(outputs, expected):
        assert np.array_equal(got, want)  # the same interpreter, the same CPU kernels

    # Eileen Collins' face in skimage's astronaut photo (512x512) is around x 180-270, y 80-180
    score, (right_eye, left_eye, nose, mouth) = _best_face(*outputs, size)
    assert score > 0.9
    for x, y in (right_eye, left_eye, nose, mouth):
        assert 180 < x < 270 and 80 < y < 180
    assert right_eye[0] < left_eye[0]  # her right eye is on the photo's left
    assert max(right_eye[1], left_eye[1]) < nose[1] < mouth[1]

    coffee, size = _photo("coffee")  # no face: no anchor is confident
    score, _ = _best_face(*run(graph, coffee), size)
    assert score < 0.5


def test_face_detector_through_a_guest(face_detector: bytes, exerciser_module: Path,
                                       tmp_path: Path) -> None:
    """The guest's output bytes equal the Interpreter's, by bytes and by name."""
    model = tmp_path / "face.tflite"
    model.write_bytes(face_detector)
    host = Host(models=[f"face:TENSORFLOWLITE:CPU:{model}"], module_cache=False)
    ex = Exerciser(host, host.compile(exerciser_module))
    astronaut, _ = _photo("astronaut")
    expected = [a.tobytes() for a in direct(face_detector, astronaut)]
    for errno, graph in (ex.load(face_detector, ENCODING_TFLITE), ex.load_by_name("face")):
        assert errno == 0, ex.last_error
        got = ex.infer(graph, [(CURRENT["f32"], astronaut)], [len(b) for b in expected])
        assert got == expected
    host.close()


# --- the classify example's EfficientNet-Lite0 as TFLite ------------------------------------

@pytest.fixture(scope="session")
def tflite_classifier(example_assets: Path) -> Path:
    """examples/classify/to_tflite.py: the exported ONNX converted op by op (made once)."""
    assert to_tflite().main([str(example_assets)]) == 0
    return example_assets / "efficientnet-lite0" / "model.tflite"


def test_classifier_guest_on_litert_matches_onnxruntime(guests: dict[str, Path],
                                                         example_assets: Path, reference,
                                                         tflite_classifier: Path,
                                                         tmp_path: Path) -> None:
    host = Host(models=[f"efficientnet-lite0:tensorflowlite:cpu:{tflite_classifier}"],
                module_cache=tmp_path)
    try:
        check_classifier(host, guests, example_assets, reference)
    finally:
        host.close()
