"""Autodetect (encoding 5): each format told from its bytes, a clear error when none fits, and
the model handed to the right backend (through the host's Backends, extras named)."""

from __future__ import annotations

import importlib.util
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exerciser import Exerciser, check_add
from wasinn import Host
from wasinn.backends import Backends
from wasinn.backends._autodetect import (AutodetectBackend, detect_encoding,
                                         detect_encoding_of_files)
from wasinn.backends.onnx import OnnxGraph
from wasinn.errors import Errno, InvalidArgument, InvalidEncoding, WasiNnError
from wasinn.tensor import ExecutionTarget, GraphEncoding, Tensor

ENCODING_AUTODETECT = 5

# torch 2.13 marks TorchScript deprecated; it is still wasmtime's pytorch format
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def needs_torch():
    return pytest.importorskip("torch", reason="TorchScript needs torch: "
                                               "pip install 'wasinn[pytorch]'")


#: an OpenVINO IR v11 as its converter writes one (Parameter -> Result), weights empty
OPENVINO_IR = b"""<?xml version="1.0"?>
<net name="identity" version="11">
\t<layers>
\t\t<layer id="0" name="x" type="Parameter" version="opset1">
\t\t\t<data shape="2,3" element_type="f32" />
\t\t\t<output>
\t\t\t\t<port id="0" precision="FP32" names="x"><dim>2</dim><dim>3</dim></port>
\t\t\t</output>
\t\t</layer>
\t\t<layer id="1" name="y" type="Result" version="opset1">
\t\t\t<input><port id="0" precision="FP32"><dim>2</dim><dim>3</dim></port></input>
\t\t</layer>
\t</layers>
\t<edges><edge from-layer="0" from-port="0" to-layer="1" to-port="0" /></edges>
</net>
"""

#: a FlatBuffer's first 8 bytes as every TFLite file has them: root table offset, "TFL3"
TFLITE_HEAD = b"\x18\x00\x00\x00TFL3\x00\x00\x0e\x00\x18\x00\x14\x00\x10\x00\x0c\x00"


def test_detects_each_format(onnx_models: dict[str, Path], tiny: Path) -> None:
    onnx_bytes = onnx_models["add"].read_bytes()
    assert detect_encoding([onnx_bytes]) == GraphEncoding.ONNX
    assert detect_encoding([bytearray(onnx_bytes)]) == GraphEncoding.ONNX
    assert detect_encoding([memoryview(onnx_bytes)]) == GraphEncoding.ONNX
    assert detect_encoding([tiny.read_bytes()]) == GraphEncoding.GGML
    assert detect_encoding([tiny.read_bytes(), b'{"n-predict": 4}']) == GraphEncoding.GGML
    assert detect_encoding([TFLITE_HEAD + bytes(64)]) == GraphEncoding.TENSORFLOWLITE
    assert detect_encoding([OPENVINO_IR, b""]) == GraphEncoding.OPENVINO
    assert detect_encoding([b"\xef\xbb\xbf<!-- IR -->\n" + OPENVINO_IR[22:], b""]) == \
        GraphEncoding.OPENVINO
    for name in ("two_outputs", "identity_f16", "identity_i64"):
        assert detect_encoding_of_files([onnx_models[name]]) == GraphEncoding.ONNX
    assert detect_encoding_of_files([tiny]) == GraphEncoding.GGML


def test_detects_torchscript() -> None:
    needs_torch()
    from torch_models import torchscript_bytes, Add

    model = torchscript_bytes(Add)
    assert detect_encoding([model]) == GraphEncoding.PYTORCH


def test_detects_real_models(example_assets: Path) -> None:
    """The real classifier as ONNX and as TorchScript, from files and from bytes."""
    model = example_assets / "efficientnet-lite0"
    assert detect_encoding_of_files([model / "model.onnx"]) == GraphEncoding.ONNX
    assert detect_encoding_of_files([model / "model.pt"]) == GraphEncoding.PYTORCH
    assert detect_encoding([(model / "model.pt").read_bytes()]) == GraphEncoding.PYTORCH


def test_detects_a_shipped_tflite_model() -> None:
    spec = importlib.util.find_spec("mediapipe")  # finds it without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("no mediapipe wheel here (it ships real .tflite models)")
    models = sorted(Path(spec.submodule_search_locations[0]).rglob("*.tflite"))
    assert models, "mediapipe ships .tflite models"
    assert detect_encoding_of_files(models[:1]) == GraphEncoding.TENSORFLOWLITE


def test_detects_an_openvino_ir_its_converter_wrote(onnx_models: dict[str, Path],
                                                    tmp_path: Path) -> None:
    openvino = pytest.importorskip("openvino", reason="no openvino here to write an IR")
    xml = tmp_path / "model.xml"
    openvino.save_model(openvino.convert_model(str(onnx_models["add"])), str(xml))
    paths = [xml, xml.with_suffix(".bin")]
    assert detect_encoding_of_files(paths) == GraphEncoding.OPENVINO
    assert detect_encoding([p.read_bytes() for p in paths]) == GraphEncoding.OPENVINO


def test_none_fits_is_a_clear_error(onnx_models: dict[str, Path]) -> None:
    onnx_bytes = onnx_models["add"].read_bytes()
    other_zip = io.BytesIO()
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("weights/data.txt", "not torch")
    import onnx

    graph_only = onnx.load(str(onnx_models["add"])).graph.SerializeToString()
    for data in (b"definitely no model", b"", b"GGU", other_zip.getvalue(),
                 onnx_bytes[:len(onnx_bytes) - 7],  # cut short
                 graph_only,  # a GraphProto is a protobuf, but no ModelProto
                 b"<net", b"<?xml version='1.0'?><model/>"):
        with pytest.raises(InvalidEncoding, match="none of GGUF, TFLite, TorchScript, "
                                                  "OpenVINO IR or ONNX") as error:
            detect_encoding([data])
        assert error.value.errno == Errno.INVALID_ENCODING
    with pytest.raises(InvalidArgument, match="OpenVINO IR takes two builders"):
        detect_encoding([OPENVINO_IR])
    with pytest.raises(InvalidArgument, match="at least one builder"):
        detect_encoding([])


def test_a_torch_checkpoint_is_named() -> None:
    needs_torch()
    from torch_models import checkpoint_bytes

    with pytest.raises(InvalidEncoding, match="torch.save checkpoint, not TorchScript"):
        detect_encoding([checkpoint_bytes()])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256) | st.builds(lambda rest: b"\x08\x08:" + rest,
                                            st.binary(max_size=256)))
def test_any_bytes_get_an_answer_or_a_clear_error(data: bytes) -> None:
    """Random bytes (and bytes that begin like an ONNX model): an encoding or a wasi-nn error,
    never a crash."""
    try:
        assert isinstance(detect_encoding([data]), GraphEncoding)
    except WasiNnError as e:
        assert e.errno in (Errno.INVALID_ENCODING, Errno.INVALID_ARGUMENT)


def test_loads_through_the_detected_backend(onnx_models: dict[str, Path]) -> None:
    backends = Backends()
    autodetect = backends.get(GraphEncoding.AUTODETECT)
    assert isinstance(autodetect, AutodetectBackend)
    graph = autodetect.load([bytearray(onnx_models["add"].read_bytes())], ExecutionTarget.CPU)
    assert isinstance(graph, OnnxGraph)
    assert backends.get(GraphEncoding.ONNX) is backends.get(GraphEncoding.ONNX)  # the same one
    ctx = graph.init_execution_context()
    ctx.set_input(0, Tensor.from_array(np.ones((2, 3), np.float32)))
    ctx.set_input(1, Tensor.from_array(np.full((2, 3), 2, np.float32)))
    ctx.compute()
    assert ctx.get_output(0).tolist() == [[3.0] * 3] * 2


def test_a_missing_framework_names_its_extra(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As if llama-cpp-python were not installed: autodetect still says what to install."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` fails
    monkeypatch.delitem(sys.modules, "wasinn.backends.ggml", raising=False)
    with pytest.raises(InvalidEncoding, match=r"needs llama_cpp: pip install 'wasinn\[llm\]'"):
        Backends().get(GraphEncoding.AUTODETECT).load([tiny.read_bytes()], ExecutionTarget.CPU)


def test_a_guest_loads_with_autodetect(guests: dict[str, Path], onnx_models: dict[str, Path],
                                       tiny: Path) -> None:
    """Through the real ABI: load with encoding 5 from guest memory."""
    host = Host(module_cache=False)
    ex = Exerciser(host, host.compile(guests["abi_exerciser"]))
    errno, graph = ex.load(onnx_models["add"].read_bytes(), ENCODING_AUTODETECT)
    assert errno == Errno.SUCCESS, ex.last_error
    check_add(ex, graph)
    errno, _ = ex.load(b"no model at all", ENCODING_AUTODETECT)
    assert errno == Errno.INVALID_ENCODING
    assert "load: autodetect: the model is none of" in ex.last_error
    host.close()


def test_preloaded_by_name(example_assets: Path, tiny: Path, tmp_path: Path) -> None:
    """WasmEdge's --nn-preload NAME:autodetect:...: each file to its backend (a GGUF opened by
    llama.cpp itself), and a graph directory, which has no fixed names, refused clearly."""
    needs_torch()
    from wasinn.backends.ggml import GgmlGraph
    from wasinn.backends.pytorch import PytorchGraph

    model = example_assets / "efficientnet-lite0"
    (tmp_path / "graph").mkdir()
    host = Host(models=[f"pt:autodetect:cpu:{model / 'model.pt'}",
                        f"onnx:autodetect:cpu:{model / 'model.onnx'}",
                        f"tiny:AUTODETECT:auto:{tiny}"], module_cache=False)
    host.add_graph_dir(f"autodetect::{tmp_path / 'graph'}")
    assert isinstance(host.registry.get("pt"), PytorchGraph)
    assert isinstance(host.registry.get("onnx"), OnnxGraph)
    assert isinstance(host.registry.get("tiny"), GgmlGraph)
    with pytest.raises(InvalidArgument, match="a graph directory has no fixed names"):
        host.registry.get("graph")
    host.close()


@pytest.mark.parametrize("file", ["model.pt", "model.onnx"])
def test_classifier_through_autodetect(file: str, guests: dict[str, Path], example_assets: Path,
                                       reference, tmp_path: Path) -> None:
    """The real classifier, preloaded as autodetect: the guest's top-5 is onnxruntime's."""
    if file.endswith(".pt"):
        needs_torch()
    from test_real_model import check_classifier

    model = example_assets / "efficientnet-lite0"
    host = Host(models=[f"classifier:autodetect:cpu:{model / file}"], module_cache=tmp_path)
    try:
        check_classifier(host, guests, example_assets, reference, "classifier", 1e-4)
    finally:
        host.close()
