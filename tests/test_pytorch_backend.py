"""The PyTorch (TorchScript) backend: the protocol levels, every witx type, errors, targets,
a real guest through the ABI, and the real classifier against onnxruntime."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the pytorch backend needs torch: "
                                            "pip install 'wasinn[pytorch]'")

from exerciser import CURRENT, LEGACY, Exerciser  # noqa: E402
from test_real_model import check_classifier  # noqa: E402
from torch_models import checkpoint_bytes, make_all  # noqa: E402
from contexts import outputs_of  # noqa: E402
from wasinn import Host  # noqa: E402
from wasinn.backends import Backends  # noqa: E402
from wasinn.backends.pytorch import PytorchBackend, PytorchGraph  # noqa: E402
from wasinn.errors import (BackendError, Errno, InvalidArgument,  # noqa: E402
                           UnsupportedOperation)
from wasinn.tensor import ExecutionTarget, GraphEncoding, Tensor, TensorType  # noqa: E402

# torch 2.13 marks TorchScript deprecated; it is still wasmtime's pytorch format
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

HAS_CUDA = torch.cuda.is_available()
ENCODING_PYTORCH = 3


@pytest.fixture(scope="module")
def models() -> dict[str, bytes]:
    return make_all()


def load(model: bytes, target: ExecutionTarget = ExecutionTarget.CPU) -> PytorchGraph:
    return PytorchBackend().load([model], target)


def run(graph: PytorchGraph, *inputs: np.ndarray) -> list[np.ndarray]:
    ctx = graph.init_execution_context()
    for index, array in enumerate(inputs):
        ctx.set_input(index, Tensor(array.shape, TensorType.from_dtype(array.dtype),
                                    array.reshape(-1)))
    ctx.compute()
    return outputs_of(ctx)


def test_inputs_and_outputs_by_index(models: dict[str, bytes]) -> None:
    x = np.array([[1.0, -2.0], [0.5, 4.0]], np.float32)
    y = np.array([[3.0, 1.0], [-0.5, 2.0]], np.float32)
    doubled, negated, summed = run(load(models["nested"]), x, y)  # (2x, [-y, x + y]) flattened
    assert doubled.tolist() == (x * 2).tolist()
    assert negated.tolist() == (-y).tolist()
    assert summed.tolist() == (x + y).tolist()
    assert summed.flags.c_contiguous and summed.dtype == np.float32


def test_every_witx_type(models: dict[str, bytes]) -> None:
    graph = load(models["identity"])
    for tensor_type in TensorType:
        data = np.arange(6).astype(tensor_type.dtype)
        ctx = graph.init_execution_context()
        ctx.set_input(0, Tensor((2, 3), tensor_type, data))
        ctx.compute()
        out = ctx.get_output(0)
        assert out.dtype == tensor_type.dtype and out.shape == (2, 3)
        assert out.tobytes() == data.tobytes()


def test_optional_input_keeps_its_default(models: dict[str, bytes]) -> None:
    graph = load(models["scaled"])
    x = np.array([1.0, 2.0, 3.0], np.float32)
    assert run(graph, x)[0].tolist() == [1.0, 2.0, 3.0]
    assert run(graph, x, np.array([2.0], np.float32))[0].tolist() == [2.0, 4.0, 6.0]


def test_input_errors_are_clear(models: dict[str, bytes]) -> None:
    graph = load(models["add"])
    ctx = graph.init_execution_context()
    with pytest.raises(InvalidArgument, match="get_output before compute"):
        ctx.get_output(0)
    with pytest.raises(InvalidArgument, match="input index 2 out of range: forward takes 2"):
        ctx.set_input(2, Tensor.from_array(np.zeros(2, np.float32)))
    with pytest.raises(InvalidArgument, match=r"dims \[3\]"):
        ctx.set_input(0, Tensor((3,), TensorType.F32, np.zeros(2, np.float32)))
    ctx.set_input(0, Tensor.from_array(np.zeros(2, np.float32)))
    with pytest.raises(InvalidArgument, match=r"missing: y"):
        ctx.compute()
    # a shape torch rejects: its own message comes back as a runtime error
    ctx.set_input(1, Tensor.from_array(np.zeros(3, np.float32)))
    with pytest.raises(BackendError, match="size of tensor a .2. must match the size of tensor "
                                           "b .3.") as error:
        ctx.compute()
    assert error.value.errno == Errno.RUNTIME_ERROR
    assert "Traceback" not in str(error.value)
    # the context is still usable
    ctx.set_input(1, Tensor.from_array(np.array([1.0, 2.0], np.float32)))
    ctx.compute()
    assert ctx.get_output(0).tolist() == [1.0, 2.0]
    with pytest.raises(InvalidArgument, match="output index 1 out of range"):
        ctx.get_output(1)


def test_arguments_and_results_that_are_no_tensors(models: dict[str, bytes]) -> None:
    ctx = load(models["repeat"]).init_execution_context()
    with pytest.raises(InvalidArgument, match=r"input 1 \(times\) is a int, not a tensor"):
        ctx.set_input(1, Tensor.from_array(np.array([2], np.int64)))
    for name, message in (("bfloat16", "output 0 is torch.bfloat16, which has no wasi-nn"),
                          ("named", "the model returned a dict")):
        ctx = load(models[name]).init_execution_context()
        ctx.set_input(0, Tensor.from_array(np.ones(2, np.float32)))
        with pytest.raises(BackendError, match=message):
            ctx.compute()


def test_bad_models_and_builders(models: dict[str, bytes]) -> None:
    backend = PytorchBackend()
    with pytest.raises(BackendError, match="could not load the TorchScript model"):
        backend.load([b"definitely not torchscript"], ExecutionTarget.CPU)
    with pytest.raises(BackendError, match="torch.save checkpoint, not TorchScript"):
        backend.load([checkpoint_bytes()], ExecutionTarget.CPU)
    with pytest.raises(BackendError, match="could not load"):  # cut short
        backend.load([models["add"][:len(models["add"]) // 2]], ExecutionTarget.CPU)
    with pytest.raises(InvalidArgument, match="one builder"):
        backend.load([models["add"], models["add"]], ExecutionTarget.CPU)
    with pytest.raises(UnsupportedOperation, match="no tpu target"):
        backend.load([models["add"]], ExecutionTarget.TPU)


@pytest.mark.skipif(HAS_CUDA, reason="torch with CUDA and a device is here")
def test_gpu_target_without_cuda_names_what_is_missing(models: dict[str, bytes]) -> None:
    missing = "CPU-only build" if torch.version.cuda is None else "sees no CUDA device"
    with pytest.raises(UnsupportedOperation, match=missing) as error:
        load(models["add"], ExecutionTarget.GPU)
    assert error.value.errno == Errno.UNSUPPORTED_OPERATION
    assert load(models["add"], ExecutionTarget.AUTO).device.type == "cpu"  # auto: the CPU


@pytest.mark.skipif(not HAS_CUDA, reason="needs torch with CUDA and a CUDA device")
def test_gpu_target_uses_cuda(models: dict[str, bytes]) -> None:
    graph = load(models["nested"], ExecutionTarget.GPU)
    assert graph.device.type == "cuda"
    x = np.array([1.0, 2.0], np.float32)
    assert [o.tolist() for o in run(graph, x, x)] == [[2.0, 4.0], [-1.0, -2.0], [2.0, 4.0]]


def test_streaming_calls_are_unsupported(models: dict[str, bytes]) -> None:
    ctx = load(models["add"]).init_execution_context()
    for call in (ctx.compute_single, ctx.fini_single, lambda: ctx.get_output_single(0)):
        with pytest.raises(UnsupportedOperation):
            call()


def test_backends_by_encoding_leave_torch_threads_alone() -> None:
    before = torch.get_num_threads()
    backends = Backends(threads=1)
    assert isinstance(backends.get(GraphEncoding.PYTORCH), PytorchBackend)
    assert backends.get(ENCODING_PYTORCH) is backends.get(GraphEncoding.PYTORCH)
    assert torch.get_num_threads() == before  # process-wide: not the Host's to change


def test_a_guest_loads_torchscript_bytes(models: dict[str, bytes], guests: dict[str, Path]) -> None:
    """Through the real ABI: load (encoding 3) from guest memory, both witx numberings."""
    host = Host(module_cache=False)
    ex = Exerciser(host, host.compile(guests["abi_exerciser"]))
    errno, graph = ex.load(models["nested"], ENCODING_PYTORCH)
    assert errno == Errno.SUCCESS, ex.last_error
    x = np.array([[1.5, -2.0, 3.25]], np.float32)
    y = np.array([[0.5, 4.0, -1.25]], np.float32)
    doubled, negated, summed = ex.infer(graph, [(CURRENT["f32"], x), (CURRENT["f32"], y)],
                                        [x.nbytes] * 3)
    assert doubled == (x * 2).tobytes() and negated == (-y).tobytes()
    assert summed == (x + y).tobytes()
    errno, identity = ex.load(models["identity"], ENCODING_PYTORCH)
    assert errno == Errno.SUCCESS, ex.last_error
    for name in ("u8", "i32", "i64"):  # TorchScript keeps no dtypes: the code and length tell
        for numbering in (CURRENT, LEGACY):
            data = np.array([0, 7, 255], np.dtype(TensorType[name.upper()].dtype))
            (out,) = ex.infer(identity, [(numbering[name], data)], [data.nbytes])
            assert out == data.tobytes()
    errno, _ = ex.load(b"no TorchScript", ENCODING_PYTORCH)
    assert errno == Errno.RUNTIME_ERROR and "could not load" in ex.last_error
    host.close()


@pytest.mark.parametrize("target", [
    "cpu", pytest.param("gpu", marks=pytest.mark.skipif(
        not HAS_CUDA, reason="needs torch with CUDA and a CUDA device"))])
def test_classifier_matches_onnxruntime(target: str, guests: dict[str, Path],
                                        example_assets: Path, reference, tmp_path: Path) -> None:
    """The real EfficientNet-Lite0, traced to TorchScript by examples/classify/prepare.py: the
    guest's top-5 through the pytorch backend is onnxruntime's on the ONNX export."""
    model = example_assets / "efficientnet-lite0"
    image = example_assets / "chelsea.ppm"
    host = Host(models=[f"efficientnet-lite0-pt:pytorch:{target}:{model / 'model.pt'}"],
                module_cache=tmp_path)
    check_classifier(host, guests, example_assets, reference, "efficientnet-lite0-pt", 1e-4)
    # all 1000 probabilities at full precision, the same graph the guest used
    graph = host.registry.get("efficientnet-lite0-pt")
    assert graph.device.type == ("cuda" if target == "gpu" else "cpu")
    ctx = graph.init_execution_context()
    ctx.set_input(0, Tensor.from_array(reference.preprocess(image)))
    ctx.compute()
    import onnxruntime as ort

    session = ort.InferenceSession(str(model / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": reference.preprocess(image)})
    probs_torch = reference.softmax(ctx.get_output(0).reshape(-1))
    probs_ort = reference.softmax(logits.reshape(-1))
    assert np.abs(probs_torch - probs_ort).max() < 1e-5
    host.close()


def test_classifier_trace_keeps_full_f32_on_cuda(example_assets: Path) -> None:
    """A trace records cuDNN's TF32 switch as the last argument of every convolution; prepare.py
    traces with it off, or on CUDA the top probability moves by 7e-3 (seen on an H100)."""
    with zipfile.ZipFile(example_assets / "efficientnet-lite0" / "model.pt") as archive:
        code = "".join(archive.read(n).decode() for n in archive.namelist() if n.endswith(".py"))
    convolutions = re.findall(r"torch\._convolution\((.*)\)$", code, re.M)
    assert len(convolutions) >= 30  # the stem, 16 blocks, the head
    assert all(c.endswith(", True, False") for c in convolutions)  # cudnn on, allow_tf32 off
