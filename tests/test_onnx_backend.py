"""The ONNX Runtime backend on its own: targets, errors, the protocol levels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from wasinn.backends import Backends
from wasinn.backends.onnx import OnnxBackend
from wasinn.errors import (BackendError, Errno, InvalidArgument, InvalidEncoding,
                           UnsupportedOperation)
from wasinn.tensor import ExecutionTarget, GraphEncoding, Tensor, TensorType

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_inputs_and_outputs_by_index(onnx_models: dict[str, Path]) -> None:
    graph = OnnxBackend().load([onnx_models["two_outputs"].read_bytes()], ExecutionTarget.CPU)
    assert graph.input_dtype(0) == np.float32 and graph.input_dtype(1) == np.int64
    assert graph.input_dtype(2) is None
    ctx = graph.init_execution_context()
    ctx.set_input(1, Tensor.from_array(np.array([1, -2, 3], np.int64)))
    ctx.set_input(0, Tensor.from_array(np.array([0.5, 1, 2, -4], np.float32)))
    ctx.compute()
    assert ctx.get_output(0).tolist() == [1.0, 2.0, 4.0, -8.0]
    assert ctx.get_output(1).tolist() == [-1, 2, -3]
    with pytest.raises(InvalidArgument):
        ctx.get_output(2)
    with pytest.raises(InvalidArgument, match="expects float32"):
        ctx.set_input(0, Tensor.from_array(np.zeros(4, np.float64)))


def test_closed_contexts_bindings_serve_the_next(onnx_models: dict[str, Path]) -> None:
    """A fixed-shape graph's outputs are written in place, through an IOBinding that a
    closed context leaves to the next (a route makes a context per request); contexts
    alive together have their own, and every one computes its own inputs."""
    graph = OnnxBackend().load([onnx_models["add"].read_bytes()], ExecutionTarget.CPU)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)

    def run(ctx: object, y: float) -> np.ndarray:
        ctx.set_input(0, Tensor.from_array(x))  # type: ignore[attr-defined]
        ctx.set_input(1, Tensor.from_array(np.full((2, 3), y, np.float32)))  # type: ignore
        ctx.compute()  # type: ignore[attr-defined]
        return ctx.get_output(0)  # type: ignore[attr-defined,no-any-return]

    first = graph.init_execution_context()
    out_first = run(first, 1.0)
    assert out_first.tolist() == (x + 1).tolist()
    first.close()
    second = graph.init_execution_context()
    out_second = run(second, 10.0)
    assert out_second is out_first  # the same array, rewritten: the binding was reused
    assert out_second.tolist() == (x + 10).tolist()
    third = graph.init_execution_context()  # while the second is open: a binding of its own
    out_third = run(third, 100.0)
    assert out_third is not out_second
    assert out_third.tolist() == (x + 100).tolist()
    assert out_second.tolist() == (x + 10).tolist()
    assert run(second, -1.0).tolist() == (x - 1).tolist()
    second.close()
    third.close()
    # a closed context's input memory, viewed anew by the next context (the ABI's pooled
    # buffers): still bound, and what is written into it in place is what the run reads
    buffer = np.empty(6, np.float32)
    fourth = graph.init_execution_context()
    buffer[:] = np.arange(6)
    fourth.set_input(0, Tensor.from_array(buffer.reshape(2, 3)))
    fourth.set_input(1, Tensor.from_array(np.zeros((2, 3), np.float32)))
    fourth.compute()
    assert fourth.get_output(0).ravel().tolist() == list(range(6))
    fourth.close()
    fifth = graph.init_execution_context()
    buffer[:] = 7
    fifth.set_input(0, Tensor(dims=(2, 3), type=TensorType.F32, data=buffer))
    fifth.set_input(1, Tensor.from_array(np.ones((2, 3), np.float32)))
    fifth.compute()
    assert fifth.get_output(0).ravel().tolist() == [8.0] * 6
    fifth.close()


@pytest.mark.skipif(HAS_CUDA, reason="onnxruntime-gpu with CUDA is installed")
def test_gpu_target_without_cuda_names_what_is_missing(onnx_models: dict[str, Path]) -> None:
    with pytest.raises(UnsupportedOperation, match="onnxruntime-gpu is not installed") as error:
        OnnxBackend().load([onnx_models["add"].read_bytes()], ExecutionTarget.GPU)
    assert error.value.errno == Errno.UNSUPPORTED_OPERATION
    # auto falls back to the CPU
    graph = OnnxBackend().load([onnx_models["add"].read_bytes()], ExecutionTarget.AUTO)
    assert graph.session.get_providers() == ["CPUExecutionProvider"]


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device")
def test_gpu_target_uses_cuda(onnx_models: dict[str, Path]) -> None:
    graph = OnnxBackend().load([onnx_models["add"].read_bytes()], ExecutionTarget.GPU)
    assert graph.session.get_providers()[0] == "CUDAExecutionProvider"


def test_bad_models_and_targets(onnx_models: dict[str, Path]) -> None:
    backend = OnnxBackend()
    with pytest.raises(BackendError, match="could not load"):
        backend.load([b"definitely not onnx"], ExecutionTarget.CPU)
    with pytest.raises(InvalidArgument, match="one builder"):
        backend.load([b"a", b"b"], ExecutionTarget.CPU)
    with pytest.raises(UnsupportedOperation, match="tpu"):
        backend.load([onnx_models["add"].read_bytes()], ExecutionTarget.TPU)


def test_streaming_calls_are_unsupported(onnx_models: dict[str, Path]) -> None:
    ctx = OnnxBackend().load([onnx_models["add"].read_bytes()],
                             ExecutionTarget.CPU).init_execution_context()
    for call in (ctx.compute_single, ctx.fini_single, lambda: ctx.get_output_single(0)):
        with pytest.raises(UnsupportedOperation):
            call()


def test_backends_by_encoding() -> None:
    backends = Backends(threads=2)
    assert isinstance(backends.get(GraphEncoding.ONNX), OnnxBackend)
    assert backends.get(1) is backends.get(GraphEncoding.ONNX)
    with pytest.raises(InvalidEncoding, match="no backend for encoding tensorflow"):
        backends.get(GraphEncoding.TENSORFLOW)
    with pytest.raises(InvalidEncoding):
        backends.get(99)


def test_every_witx_type(onnx_models: dict[str, Path]) -> None:
    for tensor_type in TensorType:
        name = f"identity_{tensor_type.name.lower()}"
        graph = OnnxBackend().load([onnx_models[name].read_bytes()], ExecutionTarget.CPU)
        assert graph.input_dtype(0) == tensor_type.dtype
        ctx = graph.init_execution_context()
        data = np.arange(4).astype(tensor_type.dtype)
        ctx.set_input(0, Tensor((2, 2), tensor_type, data))
        ctx.compute()
        assert ctx.get_output(0).tobytes() == data.tobytes()


def test_backend_options_reach_the_session(onnx_models: dict[str, Path]) -> None:
    model = [onnx_models["add"].read_bytes()]
    key = "session.force_spinning_stop"
    quiet = Backends(options={GraphEncoding.ONNX: {"spin_after_run": False}}).get(
        GraphEncoding.ONNX).load(model, ExecutionTarget.CPU)
    assert quiet.session.get_session_options().get_session_config_entry(key) == "1"
    default = Backends().get(GraphEncoding.ONNX).load(model, ExecutionTarget.CPU)
    with pytest.raises(RuntimeError, match="does not have configuration"):  # not set at all
        default.session.get_session_options().get_session_config_entry(key)
