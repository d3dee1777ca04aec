"""One conformance suite for every backend: the same guests against the same models in each
backend's own format.

* the ABI exerciser (guests/abi_exerciser.c) on `add` (z = x + y, float32 [2, 3]) as ONNX, as
  OpenVINO IR, as TorchScript and as TFLite: loaded by name and by bytes from the guest (and
  through autodetect), an exact answer, and the same errnos for the same mistakes;
* the classifier guest (guests/classify.c) on EfficientNet-Lite0 in each format (the ONNX
  export, its IR, its TorchScript trace, its TFLite conversion): the top-5 of onnxruntime
  called directly, labels and probabilities.

A backend whose framework is not installed is skipped with the reason; CI installs them all.
The per-backend files (test_*_backend.py) test what is particular to each.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from exerciser import BUILDER, CURRENT, TARGET_CPU, Exerciser, add_inputs, check_add
from test_real_model import check_classifier
from wasinn import Host
from wasinn.errors import Errno

# torch 2.13 calls TorchScript deprecated; it is the format wasmtime's pytorch backend reads
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


@dataclass(frozen=True)
class Form:
    """A backend and the format it reads."""

    id: str
    encoding: str  # as --nn-preload names it
    number: int  # witx graph_encoding
    framework: str  # the module it needs


FORMS = [
    Form("onnx", "onnx", 1, "onnxruntime"),
    Form("openvino-onnx", "openvino", 0, "openvino"),
    Form("openvino-ir", "openvino", 0, "openvino"),
    Form("pytorch", "pytorch", 3, "torch"),
    Form("tensorflowlite", "tensorflowlite", 4, "ai_edge_litert"),
    Form("autodetect-onnx", "autodetect", 5, "onnxruntime"),
    Form("autodetect-pytorch", "autodetect", 5, "torch"),
    Form("autodetect-tflite", "autodetect", 5, "ai_edge_litert"),
]


def params() -> list:
    out = []
    for form in FORMS:
        missing = importlib.util.find_spec(form.framework) is None
        out.append(pytest.param(form, id=form.id, marks=pytest.mark.skipif(
            missing, reason=f"{form.framework} is not installed")))
    return out


def to_ir(onnx_path: Path, directory: Path) -> list[Path]:
    import openvino as ov

    directory.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.convert_model(str(onnx_path)), str(directory / "model.xml"),
                  compress_to_fp16=False)
    return [directory / "model.xml", directory / "model.bin"]


def add_files(form: Form, onnx_models: dict[str, Path], directory: Path) -> list[Path]:
    """The `add` model in `form`'s format, as files."""
    kind = form.id.removeprefix("autodetect-")
    if kind in ("onnx", "openvino-onnx"):
        return [onnx_models["add"]]
    if kind == "openvino-ir":
        return to_ir(onnx_models["add"], directory / "add-ir")
    path = directory / f"add-{kind}"
    if kind == "pytorch":
        from torch_models import MODULES, torchscript_bytes

        path.write_bytes(torchscript_bytes(MODULES["add"]))
    else:
        from tflite_models import add

        path.write_bytes(add())
    return [path]


def classifier_files(form: Form, assets: Path, directory: Path) -> list[Path]:
    """EfficientNet-Lite0 in `form`'s format (examples/classify makes each)."""
    kind = form.id.removeprefix("autodetect-")
    model = assets / "efficientnet-lite0"
    if kind in ("onnx", "openvino-onnx"):
        return [model / "model.onnx"]
    if kind == "openvino-ir":
        return to_ir(model / "model.onnx", directory / "classifier-ir")
    if kind == "pytorch":
        return [model / "model.pt"]  # prepare.py traces it with the ONNX export
    from tflite_models import to_tflite

    assert to_tflite().main([str(assets)]) == 0
    return [model / "model.tflite"]


def preload(name: str, form: Form, files: list[Path]) -> str:
    return f"{name}:{form.encoding}:cpu:" + ":".join(str(f) for f in files)


# --- the ABI exerciser ---------------------------------------------------------------------


@pytest.fixture
def exercised(request: pytest.FixtureRequest, onnx_models: dict[str, Path],
              guests: dict[str, Path], tmp_path: Path) -> Iterator[tuple[Form, Exerciser, list[Path]]]:
    form: Form = request.param
    files = add_files(form, onnx_models, tmp_path)
    host = Host(models=[preload("add", form, files)], module_cache=False)
    try:
        yield form, Exerciser(host, host.compile(guests["abi_exerciser"])), files
    finally:
        host.close()


@pytest.mark.parametrize("exercised", params(), indirect=True)
def test_the_exerciser_gets_the_same_answers_from_every_backend(
        exercised: tuple[Form, Exerciser, list[Path]]) -> None:
    form, ex, files = exercised
    # by name: an exact answer, twice from one graph
    errno, graph = ex.load_by_name("add")
    assert errno == 0, ex.last_error
    check_add(ex, graph)
    check_add(ex, graph)
    # by bytes, from the guest, with the form's own encoding
    builders = b"".join(BUILDER.pack(ex.put(f.read_bytes()), f.stat().st_size) for f in files)
    out = ex.out_slot()
    assert ex.raw("load", ex.put(builders), len(files), form.number, TARGET_CPU, out) == 0, \
        ex.last_error
    check_add(ex, ex.read_u32(out))

    # the same mistakes, the same errnos; the guest and the graph live on
    x, y, z = add_inputs()
    errno, ctx = ex.init(graph)
    assert errno == 0
    assert ex.set_input(ctx, 2, CURRENT["f32"], x) == Errno.INVALID_ARGUMENT  # no input 2
    assert ex.set_input(ctx + 1000, 0, CURRENT["f32"], x) == Errno.INVALID_ARGUMENT  # no ctx
    assert ex.set_input(ctx, 0, CURRENT["f32"], x) == 0
    assert ex.set_input(ctx, 1, CURRENT["f32"], y) == 0
    assert ex.raw("compute", ctx) == 0, ex.last_error
    errno, data, written = ex.get_output(ctx, 0, 4)  # too small: the size it needs
    assert (errno, data, written) == (Errno.TOO_LARGE, None, z.nbytes)
    errno, data, written = ex.get_output(ctx, 0, z.nbytes)
    assert (errno, data) == (0, z.tobytes())
    assert ex.get_output(ctx, 1, 64)[0] == Errno.INVALID_ARGUMENT  # no output 1
    assert ex.raw("finalize_execution_context", ctx) == 0
    assert ex.load_by_name("nope")[0] == Errno.NOT_FOUND
    assert ex.raw("compute_single", ctx) == Errno.INVALID_ARGUMENT  # finalized
    check_add(ex, graph)


# --- the classifier guest ------------------------------------------------------------------


@pytest.mark.parametrize("form", params())
def test_the_classifier_gives_onnxruntimes_top5_on_every_backend(
        form: Form, guests: dict[str, Path], example_assets: Path, reference,
        tmp_path: Path) -> None:
    files = classifier_files(form, example_assets, tmp_path)
    host = Host(models=[preload("efficientnet-lite0", form, files)], module_cache=tmp_path)
    try:
        check_classifier(host, guests, example_assets, reference)
    finally:
        host.close()


