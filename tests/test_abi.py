"""Byte-exact conformance of `wasi_ephemeral_nn` (witx) through a real guest.

Every call goes guest -> import -> host function: guests/abi_exerciser.wasm forwards raw u32
values and hands back the errno. After every test the same instance must still run a known-good
inference (the `ex` fixture checks it on teardown), so no error may leave the guest or the host
in a broken state, and a Python exception escaping a host function would surface as a trap here.
"""

from __future__ import annotations

import gc
import shutil
import struct

import numpy as np
import pytest
import wasmtime

from exerciser import (BUILDER, CURRENT, ENCODING_ONNX, LEGACY, TARGET_CPU, TENSOR, U32_MAX,
                       Exerciser, add_inputs, check_add)
from wasinn.errors import Errno, InvalidArgument
from wasinn.host import Host
from wasinn.tensor import TensorType, resolve_tensor_type

SUCCESS = Errno.SUCCESS
INVALID_ARGUMENT = Errno.INVALID_ARGUMENT
INVALID_ENCODING = Errno.INVALID_ENCODING
RUNTIME_ERROR = Errno.RUNTIME_ERROR
UNSUPPORTED = Errno.UNSUPPORTED_OPERATION
TOO_LARGE = Errno.TOO_LARGE
NOT_FOUND = Errno.NOT_FOUND

F32 = CURRENT["f32"]

#: one exact value set per witx tensor type (bytes must come back unchanged)
VALUES = {
    "f16": np.array([[1.5, -2.0], [65504.0, 6.1035e-05]], dtype=np.float16),
    "f32": np.array([[1.5, -2.0], [3.4e38, -1.17549435e-38]], dtype=np.float32),
    "f64": np.array([[1.5, -2.0], [1.7976931348623157e308, 5e-324]], dtype=np.float64),
    "u8": np.array([[0, 255], [128, 7]], dtype=np.uint8),
    "i32": np.array([[0, -1], [2**31 - 1, -(2**31)]], dtype=np.int32),
    "i64": np.array([[0, -1], [2**63 - 1, -(2**63)]], dtype=np.int64),
}


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def host(onnx_models, tmp_path_factory):
    """Every small model offered by name (WasmEdge syntax), plus `adder` as a wasmtime dir."""
    graph_dir = tmp_path_factory.mktemp("graphs") / "adder"
    graph_dir.mkdir()
    shutil.copy(onnx_models["add"], graph_dir / "model.onnx")
    h = Host(models=[f"{name}:onnx:cpu:{path}" for name, path in onnx_models.items()],
             module_cache=False)
    h.add_graph_dir(f"onnx::{graph_dir}")
    yield h
    h.close()


@pytest.fixture(scope="module")
def module(host, guests):
    return host.compile(guests["abi_exerciser"])


@pytest.fixture
def ex(host, module):
    """A fresh exerciser instance; on teardown the same instance must still infer exactly."""
    e = Exerciser(host, module)
    yield e
    errno, graph = e.load_by_name("add")
    assert errno == SUCCESS, e.last_error
    check_add(e, graph)


@pytest.fixture
def add_graph(ex):
    errno, graph = ex.load_by_name("add")
    assert errno == SUCCESS, ex.last_error
    return graph


@pytest.fixture
def add_ctx(ex, add_graph):
    errno, ctx = ex.init(add_graph)
    assert errno == SUCCESS, ex.last_error
    return ctx


@pytest.fixture
def computed_ctx(ex, add_ctx):
    """An `add` context with both inputs set and computed."""
    x, y, _ = add_inputs()
    assert ex.set_input(add_ctx, 0, F32, x) == SUCCESS
    assert ex.set_input(add_ctx, 1, F32, y) == SUCCESS
    assert ex.raw("compute", add_ctx) == SUCCESS
    return add_ctx


def assert_error(ex: Exerciser, errno: int, expected: Errno, function: str) -> None:
    """The errno is the expected one and the host recorded why, naming the function."""
    assert errno == expected, ex.last_error
    assert ex.last_error is not None
    assert ex.last_error.startswith(f"{function}: ")
    assert f"(errno {int(expected)} " in ex.last_error


# --- load ------------------------------------------------------------------------------------

def test_load_bytes_onnx(ex, onnx_models):
    model = onnx_models["add"].read_bytes()
    errno, graph = ex.load(model, ENCODING_ONNX, TARGET_CPU)
    assert errno == SUCCESS, ex.last_error
    assert graph == 0  # handles count from 0, as in wasmtime and WasmEdge
    check_add(ex, graph)
    errno, second = ex.load(model)
    assert (errno, second) == (SUCCESS, 1)  # each load by bytes is a new graph
    check_add(ex, second)


def test_load_target_auto(ex, onnx_models):
    """WasmEdge's execution_target 3 (auto) picks what the host has."""
    errno, graph = ex.load(onnx_models["add"].read_bytes(), ENCODING_ONNX, 3)
    assert errno == SUCCESS, ex.last_error
    check_add(ex, graph)


def test_load_by_name(ex):
    errno, graph = ex.load_by_name("add")
    assert (errno, graph) == (SUCCESS, 0)
    check_add(ex, graph)


def test_load_by_name_graph_dir(ex):
    """wasmtime's `ENCODING::DIR`: the name is the directory's last component."""
    errno, graph = ex.load_by_name("adder")
    assert errno == SUCCESS, ex.last_error
    check_add(ex, graph)


@pytest.mark.parametrize("name", [b"nope", b"", b"ADD", b"add\0", b"add.onnx"])
def test_load_by_name_unknown(ex, name):
    errno, _ = ex.load_by_name(name)
    assert_error(ex, errno, NOT_FOUND, "load_by_name")


def test_load_by_name_never_opens_a_path(ex, onnx_models):
    """Only names the host registered resolve: a guest cannot choose a host file."""
    errno, _ = ex.load_by_name(str(onnx_models["add"]))
    assert_error(ex, errno, NOT_FOUND, "load_by_name")
    errno, _ = ex.load_by_name(f"x:onnx:cpu:{onnx_models['add']}")
    assert_error(ex, errno, NOT_FOUND, "load_by_name")


def test_load_by_name_not_utf8(ex):
    errno, _ = ex.load_by_name(b"\xff\xfe")
    assert_error(ex, errno, INVALID_ARGUMENT, "load_by_name")


def test_load_by_name_twice_same_handle(ex):
    first = ex.load_by_name("add")
    assert ex.load_by_name("two_outputs") == (SUCCESS, 1)
    assert ex.load_by_name("add") == first == (SUCCESS, 0)
    check_add(ex, first[1])


def test_load_by_name_separate_stores(host, module):
    """Handles belong to one Store: each store counts from 0 and sees only its own."""
    a, b = Exerciser(host, module), Exerciser(host, module)
    assert a.load_by_name("two_outputs") == (SUCCESS, 0)
    assert a.load_by_name("add") == (SUCCESS, 1)
    assert b.load_by_name("add") == (SUCCESS, 0)
    errno, ctx = a.init(1)
    assert (errno, ctx) == (SUCCESS, 0)
    assert b.raw("compute", ctx) == INVALID_ARGUMENT  # b has no context 0
    assert b.raw("unload", 1) == INVALID_ARGUMENT
    check_add(a, 1)
    check_add(b, 0)


@pytest.mark.parametrize("config", [b"{}", b"", b"  {}  ", b"{}\0", b'{"n-predict": 8, "x": [1]}'])
def test_load_by_name_with_config(ex, config):
    errno, graph = ex.load_by_name_with_config("add", config)
    assert errno == SUCCESS, ex.last_error
    assert ex.load_by_name("add") == (SUCCESS, graph)  # one graph per name
    check_add(ex, graph)


@pytest.mark.parametrize("config", [b"{", b"not json", b"[1, 2]", b"42", b'"s"', b"\xff{}"])
def test_load_by_name_with_config_invalid(ex, config):
    errno, _ = ex.load_by_name_with_config("add", config)
    assert_error(ex, errno, INVALID_ARGUMENT, "load_by_name_with_config")


def test_load_by_name_with_config_unknown(ex):
    errno, _ = ex.load_by_name_with_config("nope", b"{}")
    assert_error(ex, errno, NOT_FOUND, "load_by_name_with_config")


def test_load_by_name_with_config_bad_pointer(ex):
    name = ex.put(b"add")
    out = ex.out_slot()
    errno = ex.raw("load_by_name_with_config", name, 3, 0xFFFFFFF0, 2, out)
    assert_error(ex, errno, INVALID_ARGUMENT, "load_by_name_with_config")
    assert ex.read_u32(out) == 0xDEADBEEF  # nothing written on failure


@pytest.mark.parametrize("encoding", [99, 15, U32_MAX, 0x101])
def test_load_unknown_encoding(ex, onnx_models, encoding):
    errno, _ = ex.load(onnx_models["add"].read_bytes(), encoding, TARGET_CPU)
    assert_error(ex, errno, INVALID_ENCODING, "load")


@pytest.mark.parametrize("encoding", [2, 7])
def test_load_encoding_without_backend(ex, onnx_models, encoding):
    """tensorflow, neuralspeed: known encodings this host has no backend for."""
    errno, _ = ex.load(onnx_models["add"].read_bytes(), encoding, TARGET_CPU)
    assert_error(ex, errno, INVALID_ENCODING, "load")


def test_load_onnx_bytes_as_ggml(ex, onnx_models):
    """The ggml backend exists, and refuses bytes that are no GGUF."""
    errno, _ = ex.load(onnx_models["add"].read_bytes(), 6, TARGET_CPU)
    assert_error(ex, errno, RUNTIME_ERROR, "load")


@pytest.mark.parametrize("target", [4, 99, U32_MAX])
def test_load_unknown_target(ex, onnx_models, target):
    errno, _ = ex.load(onnx_models["add"].read_bytes(), ENCODING_ONNX, target)
    assert_error(ex, errno, INVALID_ARGUMENT, "load")


def test_load_bad_builders(ex, onnx_models):
    model = onnx_models["add"].read_bytes()
    model_ptr = ex.put(model)
    good = ex.put(BUILDER.pack(model_ptr, len(model)))
    out = ex.out_slot()
    bad = ex.alloc(3 * BUILDER.size)
    size = ex.mem_size  # after the last allocation: memory does not grow below
    ex.write(bad, BUILDER.pack(0xFFFFFFF0, 16)       # model bytes out of memory
             + BUILDER.pack(model_ptr, size)         # model length past the end
             + BUILDER.pack(U32_MAX, 2))             # ptr + len wraps around u32
    cases = [
        (0xFFFFFFF0, 1),            # builders array out of memory
        (size - 4, 1),              # 8-byte builder straddles the end
        (U32_MAX - 3, 1),           # builders ptr + 8 wraps around u32
        (good, 0),                  # no builders
        (good, 2),                  # onnx takes exactly one builder
        (good, U32_MAX),            # absurd count
        (bad, 1), (bad + 8, 1), (bad + 16, 1),
    ]
    for builders, count in cases:
        errno = ex.raw("load", builders, count, ENCODING_ONNX, TARGET_CPU, out)
        assert_error(ex, errno, INVALID_ARGUMENT, "load")
        assert ex.read_u32(out) == 0xDEADBEEF
    # graph_out out of memory
    for graph_out in (0xFFFFFFF0, size - 2, U32_MAX):
        errno = ex.raw("load", good, 1, ENCODING_ONNX, TARGET_CPU, graph_out)
        assert_error(ex, errno, INVALID_ARGUMENT, "load")
    assert ex.raw("load", good, 1, ENCODING_ONNX, TARGET_CPU, out) == SUCCESS
    check_add(ex, ex.read_u32(out))


def test_load_garbage_model(ex):
    """Bytes that are not ONNX: the framework's failure is runtime_error."""
    errno, _ = ex.load(b"this is not an onnx model")
    assert_error(ex, errno, RUNTIME_ERROR, "load")


def test_load_empty_model(ex):
    errno, _ = ex.load(b"")
    assert errno in (INVALID_ARGUMENT, RUNTIME_ERROR), ex.last_error


# --- inference -------------------------------------------------------------------------------

def test_add_exact(ex, add_graph):
    x, y, z = add_inputs()
    errno, ctx = ex.init(add_graph)
    assert (errno, ctx) == (SUCCESS, 0)
    assert ex.set_input(ctx, 0, F32, x) == SUCCESS
    assert ex.set_input(ctx, 1, F32, y) == SUCCESS
    assert ex.raw("compute", ctx) == SUCCESS
    errno, data, written = ex.get_output(ctx, 0, z.nbytes)
    assert (errno, written) == (SUCCESS, 24)
    assert np.frombuffer(data, np.float32).tolist() == z.ravel().tolist()
    assert data == z.tobytes()
    # compute again with a new input on the same context
    assert ex.set_input(ctx, 1, F32, -y) == SUCCESS
    assert ex.raw("compute", ctx) == SUCCESS
    assert ex.get_output(ctx, 0, 24) == (SUCCESS, (x - y).tobytes(), 24)


def test_two_outputs_by_index(ex):
    errno, graph = ex.load_by_name("two_outputs")
    assert errno == SUCCESS
    a = np.array([1.5, -2.0, 0.0, 1e30], dtype=np.float32)
    b = np.array([7, -(2**63) + 1, 2**62], dtype=np.int64)
    doubled, negated = ex.infer(graph, [(F32, a), (CURRENT["i64"], b)], [16, 24])
    assert doubled == (a * 2).tobytes()
    assert negated == (-b).tobytes()
    assert np.frombuffer(negated, np.int64).tolist() == [-7, 2**63 - 1, -(2**62)]


def test_two_outputs_legacy_i64(ex):
    """The older numbering's i64 (4) for input b; the f32 code is the same in both."""
    errno, graph = ex.load_by_name("two_outputs")
    assert errno == SUCCESS
    a = np.arange(4, dtype=np.float32)
    b = np.array([1, 2, 3], dtype=np.int64)
    doubled, negated = ex.infer(graph, [(LEGACY["f32"], a), (LEGACY["i64"], b)], [16, 24])
    assert doubled == (a * 2).tobytes() and negated == (-b).tobytes()


ROUNDTRIPS = ([pytest.param(t, c, id=f"current-{t}-{c}") for t, c in CURRENT.items()]
              + [pytest.param(t, c, id=f"legacy-{t}-{c}") for t, c in LEGACY.items()])


@pytest.mark.parametrize("type_name, code", ROUNDTRIPS)
def test_tensor_type_roundtrip(ex, type_name, code):
    """identity_<type>: the bytes come back exactly, in either tensor_type numbering."""
    errno, graph = ex.load_by_name(f"identity_{type_name}")
    assert errno == SUCCESS
    array = VALUES[type_name]
    (out,) = ex.infer(graph, [(code, array)], [array.nbytes])
    assert out == array.tobytes()


@pytest.mark.parametrize("type_name, code", ROUNDTRIPS)
def test_tensor_type_only_byte_at_8(ex, type_name, code):
    """The type is one byte at +8: garbage in the 3 padding bytes (or a u32 type) is ignored."""
    errno, graph = ex.load_by_name(f"identity_{type_name}")
    assert errno == SUCCESS
    errno, ctx = ex.init(graph)
    assert errno == SUCCESS
    array = VALUES[type_name]
    assert ex.set_input(ctx, 0, code, array, padding=b"\xa5\x5a\xff") == SUCCESS, ex.last_error
    assert ex.raw("compute", ctx) == SUCCESS
    assert ex.get_output(ctx, 0, array.nbytes) == (SUCCESS, array.tobytes(), array.nbytes)


@pytest.mark.parametrize("type_name, wrong_code", [
    ("f64", 3),   # u8 (current) / i32 (legacy): neither is f64
    ("u8", 1),    # f32
    ("i32", 5),   # i64
    ("f32", 0),   # f16
    ("i64", 2),   # f64 / u8
])
def test_tensor_type_wrong_for_graph(ex, type_name, wrong_code):
    """A type the graph does not take, with a data_len that fits that type, is invalid."""
    errno, graph = ex.load_by_name(f"identity_{type_name}")
    assert errno == SUCCESS
    errno, ctx = ex.init(graph)
    assert errno == SUCCESS
    array = VALUES[type_name]
    itemsize = {0: 2, 1: 4, 2: 8, 3: 1, 5: 8}[wrong_code]
    data = bytes(range(4 * itemsize))
    errno = ex.raw("set_input", ctx, 0, ex.put_tensor([2, 2], wrong_code, data))
    assert_error(ex, errno, INVALID_ARGUMENT, "set_input")
    assert ex.set_input(ctx, 0, CURRENT[type_name], array) == SUCCESS


@pytest.mark.parametrize("code", [6, 7, 100, 255])
def test_tensor_type_unknown(ex, add_ctx, code):
    x, _, _ = add_inputs()
    errno = ex.set_input(add_ctx, 0, code, x)
    assert_error(ex, errno, INVALID_ARGUMENT, "set_input")


@pytest.mark.parametrize("dims, data_len", [
    ([2, 3], 20), ([2, 3], 28), ([2, 3], 0), ([2, 2], 24), ([6, 1, 1], 20), ([], 24),
    ([2, 3, 0], 24), ([U32_MAX, U32_MAX], 24),
])
def test_set_input_dims_data_len_mismatch(ex, add_ctx, dims, data_len):
    x, _, _ = add_inputs()
    tensor = ex.put_tensor(dims, F32, x.tobytes() + b"\0" * 8, data_len=data_len)
    errno = ex.raw("set_input", add_ctx, 0, tensor)
    assert_error(ex, errno, INVALID_ARGUMENT, "set_input")


def test_set_input_bad_struct(ex, add_ctx):
    x, _, _ = add_inputs()
    data = ex.put(x.tobytes())
    dims = ex.put(struct.pack("<2I", 2, 3))
    slots = ex.alloc(TENSOR.size * 16)
    size = ex.mem_size  # after the last allocation: memory does not grow below

    def tensor(*fields: int) -> int:
        nonlocal slots
        ex.write(slots, TENSOR.pack(*fields))
        slots += TENSOR.size
        return slots - TENSOR.size

    cases = {
        "tensor ptr far out": 0xFFFFFFF0,
        "tensor straddles end": size - 10,
        "tensor ptr wraps u32": U32_MAX - 3,
        "dims out": tensor(0xFFFFFFF0, 2, F32, data, 24),
        "dims straddle end": tensor(size - 4, 2, F32, data, 24),
        "too many dims": tensor(dims, 33, F32, data, 24),
        "dims_len huge": tensor(dims, U32_MAX, F32, data, 24),
        "data out": tensor(dims, 2, F32, 0xFFFFFFF0, 24),
        "data straddles end": tensor(dims, 2, F32, size - 8, 24),
        "data wraps u32": tensor(dims, 2, F32, U32_MAX - 7, 24),
    }
    for what, tensor_ptr in cases.items():
        errno = ex.raw("set_input", add_ctx, 0, tensor_ptr)
        assert errno == INVALID_ARGUMENT, (what, ex.last_error)
    assert ex.mem_size == size
    assert ex.raw("set_input", add_ctx, 0, tensor(dims, 2, F32, data, 24)) == SUCCESS


@pytest.mark.parametrize("index", [2, 3, 1000, U32_MAX])
def test_set_input_bad_index(ex, add_ctx, index):
    x, _, _ = add_inputs()
    errno = ex.set_input(add_ctx, index, F32, x)
    assert_error(ex, errno, INVALID_ARGUMENT, "set_input")


def test_compute_before_all_inputs(ex, add_ctx):
    assert_error(ex, ex.raw("compute", add_ctx), INVALID_ARGUMENT, "compute")
    x, y, z = add_inputs()
    assert ex.set_input(add_ctx, 0, F32, x) == SUCCESS
    assert_error(ex, ex.raw("compute", add_ctx), INVALID_ARGUMENT, "compute")
    assert ex.set_input(add_ctx, 1, F32, y) == SUCCESS
    assert ex.raw("compute", add_ctx) == SUCCESS
    assert ex.get_output(add_ctx, 0, 24) == (SUCCESS, z.tobytes(), 24)


def test_set_input_with_wrong_shape(ex, add_ctx):
    """dims x size == data_len, but not the graph's shape: refused at set_input."""
    x, y, z = add_inputs()
    assert_error(ex, ex.set_input(add_ctx, 0, F32, x.reshape(3, 2)), INVALID_ARGUMENT, "set_input")
    assert_error(ex, ex.set_input(add_ctx, 1, F32, y.reshape(6)), INVALID_ARGUMENT, "set_input")
    assert "expects dims [2, 3]" in ex.last_error
    assert ex.set_input(add_ctx, 0, F32, x) == SUCCESS
    assert ex.set_input(add_ctx, 1, F32, y) == SUCCESS
    assert ex.raw("compute", add_ctx) == SUCCESS
    assert ex.get_output(add_ctx, 0, 24) == (SUCCESS, z.tobytes(), 24)


def test_failed_set_input_keeps_earlier_input(ex, add_ctx):
    x, y, z = add_inputs()
    assert ex.set_input(add_ctx, 0, F32, x) == SUCCESS
    assert ex.set_input(add_ctx, 0, F32, y, data_len=20) == INVALID_ARGUMENT
    assert ex.set_input(add_ctx, 0, CURRENT["i64"], y.astype(np.int64)[:, :2]) == INVALID_ARGUMENT
    assert ex.set_input(add_ctx, 1, F32, y) == SUCCESS
    assert ex.raw("compute", add_ctx) == SUCCESS
    assert ex.get_output(add_ctx, 0, 24) == (SUCCESS, z.tobytes(), 24)


def test_set_input_absurd_zero_size_dims(ex, add_ctx):
    errno = ex.raw("set_input", add_ctx, 0, ex.put_tensor([U32_MAX, 0, U32_MAX, U32_MAX], F32, b""))
    assert errno == INVALID_ARGUMENT, ex.last_error


def test_set_input_zero_size_tensor(ex, add_ctx):
    """An empty tensor of a shape the graph does not take is refused at set_input."""
    x, y, z = add_inputs()
    errno = ex.raw("set_input", add_ctx, 0, ex.put_tensor([0, 3], F32, b""))
    assert_error(ex, errno, INVALID_ARGUMENT, "set_input")
    assert ex.set_input(add_ctx, 1, F32, y) == SUCCESS
    assert ex.set_input(add_ctx, 0, F32, x) == SUCCESS
    assert ex.raw("compute", add_ctx) == SUCCESS
    assert ex.get_output(add_ctx, 0, 24) == (SUCCESS, z.tobytes(), 24)


def test_set_input_copies_guest_memory(ex, add_ctx):
    """set_input takes the bytes when called: the guest may reuse its buffer right after."""
    x, y, z = add_inputs()
    tx = ex.put_tensor([2, 3], F32, x.tobytes())
    ty = ex.put_tensor([2, 3], F32, y.tobytes())
    assert ex.raw("set_input", add_ctx, 0, tx) == SUCCESS
    assert ex.raw("set_input", add_ctx, 1, ty) == SUCCESS
    for tensor in (tx, ty):  # scribble over the data the structs point at
        data_ptr = TENSOR.unpack(ex.read(tensor, TENSOR.size))[3]
        ex.write(data_ptr, b"\xff" * 24)
    assert ex.raw("compute", add_ctx) == SUCCESS
    assert ex.get_output(add_ctx, 0, 24) == (SUCCESS, z.tobytes(), 24)


def test_unaligned_structs(ex, add_ctx):
    """Nothing in the ABI needs alignment from the host's side: odd addresses work."""
    x, y, z = add_inputs()
    base = ex.alloc(256) | 1  # odd
    dims, data, tensor = base, base + 9, base + 9 + 24 + 3
    ex.write(dims, struct.pack("<2I", 2, 3))
    ex.write(data, x.tobytes())
    ex.write(tensor, TENSOR.pack(dims, 2, F32, data, 24))
    assert ex.raw("set_input", add_ctx, 0, tensor) == SUCCESS, ex.last_error
    assert ex.set_input(add_ctx, 1, F32, y) == SUCCESS
    assert ex.raw("compute", add_ctx) == SUCCESS
    out, written = base + 101, base + 131
    assert ex.raw("get_output", add_ctx, 0, out, 24, written) == SUCCESS
    assert ex.read(out, 24) == z.tobytes() and ex.read_u32(written) == 24


def test_contexts_are_independent(ex, add_graph):
    x, y, z = add_inputs()
    (e1, c1), (e2, c2) = ex.init(add_graph), ex.init(add_graph)
    assert (e1, e2) == (SUCCESS, SUCCESS) and (c1, c2) == (0, 1)
    for ctx, (a, b) in ((c1, (x, y)), (c2, (y, y))):
        assert ex.set_input(ctx, 0, F32, a) == SUCCESS
        assert ex.set_input(ctx, 1, F32, b) == SUCCESS
    assert ex.raw("compute", c2) == SUCCESS
    assert_error(ex, ex.get_output(c1, 0, 24)[0], INVALID_ARGUMENT, "get_output")
    assert ex.raw("compute", c1) == SUCCESS
    assert ex.get_output(c1, 0, 24) == (SUCCESS, z.tobytes(), 24)
    assert ex.get_output(c2, 0, 24) == (SUCCESS, (y + y).tobytes(), 24)
    assert ex.raw("finalize_execution_context", c1) == SUCCESS
    assert ex.get_output(c2, 0, 24) == (SUCCESS, (y + y).tobytes(), 24)


def test_failed_calls_consume_no_handle(ex, onnx_models):
    """A failed load or init leaves nothing behind: the next success gets the next handle."""
    model = onnx_models["add"].read_bytes()
    builders = ex.put(BUILDER.pack(ex.put(model), len(model)))
    name = ex.put(b"add")
    assert ex.raw("load", builders, 1, ENCODING_ONNX, TARGET_CPU, 0xFFFFFFF0) == INVALID_ARGUMENT
    assert ex.raw("load_by_name", name, 3, 0xFFFFFFF0) == INVALID_ARGUMENT
    assert ex.load(model, ENCODING_ONNX, 99) == (INVALID_ARGUMENT, None)
    assert ex.load_by_name("add") == (SUCCESS, 0)
    assert ex.raw("init_execution_context", 0, 0xFFFFFFF0) == INVALID_ARGUMENT
    assert ex.init(0) == (SUCCESS, 0)


def test_load_by_name_bad_name_args(ex):
    out = ex.out_slot()
    long_name = ex.put(b"a" * 5000)
    for name_ptr, name_len in ((0xFFFFFFF0, 3), (U32_MAX, 2), (long_name, 5000),
                               (long_name, U32_MAX)):
        errno = ex.raw("load_by_name", name_ptr, name_len, out)
        assert_error(ex, errno, INVALID_ARGUMENT, "load_by_name")
    assert ex.read_u32(out) == 0xDEADBEEF


def test_context_limit(ex, add_graph):
    """The host caps live contexts per store (4096) with too_large; finalizing frees a slot."""
    out = ex.out_slot()
    for i in range(4096):
        assert ex.raw("init_execution_context", add_graph, out) == SUCCESS
    assert ex.read_u32(out) == 4095
    assert_error(ex, ex.raw("init_execution_context", add_graph, out), TOO_LARGE,
                 "init_execution_context")
    for ctx in range(4096):
        assert ex.raw("finalize_execution_context", ctx) == SUCCESS


# --- get_output ------------------------------------------------------------------------------

@pytest.mark.parametrize("out_max", [0, 1, 4, 23])
def test_get_output_too_small(ex, computed_ctx, out_max):
    out = ex.alloc(32)
    ex.write(out, b"\x77" * 32)
    written = ex.out_slot()
    errno = ex.raw("get_output", computed_ctx, 0, out, out_max, written)
    assert_error(ex, errno, TOO_LARGE, "get_output")
    assert ex.read_u32(written) == 24  # the needed size, as WasmEdge does
    assert ex.read(out, 32) == b"\x77" * 32  # and nothing of the output


def test_get_output_exact_and_larger(ex, computed_ctx):
    _, _, z = add_inputs()
    assert ex.get_output(computed_ctx, 0, 24) == (SUCCESS, z.tobytes(), 24)
    out = ex.alloc(64)
    ex.write(out, b"\x77" * 64)
    written = ex.out_slot()
    assert ex.raw("get_output", computed_ctx, 0, out, 64, written) == SUCCESS
    assert ex.read_u32(written) == 24
    assert ex.read(out, 64) == z.tobytes() + b"\x77" * 40  # nothing written past the output


def test_get_output_before_compute(ex, add_ctx):
    errno, _, _ = ex.get_output(add_ctx, 0, 24)
    assert_error(ex, errno, INVALID_ARGUMENT, "get_output")


@pytest.mark.parametrize("index", [1, 2, U32_MAX])
def test_get_output_bad_index(ex, computed_ctx, index):
    errno, _, _ = ex.get_output(computed_ctx, index, 24)
    assert_error(ex, errno, INVALID_ARGUMENT, "get_output")


def test_get_output_bad_pointers(ex, computed_ctx):
    _, _, z = add_inputs()
    out = ex.alloc(24)
    written = ex.out_slot()
    size = ex.mem_size
    for out_ptr, written_ptr in [(0xFFFFFFF0, written), (size - 2, written), (size - 23, written),
                                 (U32_MAX, written), (out, 0xFFFFFFF0), (out, size - 2),
                                 (out, U32_MAX)]:
        errno = ex.raw("get_output", computed_ctx, 0, out_ptr, 24, written_ptr)
        assert errno == INVALID_ARGUMENT, (out_ptr, written_ptr, ex.last_error)
        assert ex.read_u32(written) == 0xDEADBEEF  # no size reported for a failed copy
    # the too_large path must bounds-check written_out too
    errno = ex.raw("get_output", computed_ctx, 0, out, 4, size - 2)
    assert_error(ex, errno, INVALID_ARGUMENT, "get_output")
    assert ex.raw("get_output", computed_ctx, 0, out, 24, written) == SUCCESS
    assert ex.read(out, 24) == z.tobytes()


def test_pointers_ending_exactly_at_memory_end(ex, computed_ctx):
    """A range that ends on the last byte of memory is valid (no off-by-one)."""
    _, _, z = add_inputs()
    size = ex.mem_size
    assert ex.raw("get_output", computed_ctx, 0, size - 28, 24, size - 4) == SUCCESS, ex.last_error
    assert ex.read(size - 28, 24) == z.tobytes()
    assert ex.read_u32(size - 4) == 24
    errno, graph = ex.load_by_name("add")
    assert errno == SUCCESS
    size = ex.mem_size
    assert ex.raw("init_execution_context", graph, size - 4) == SUCCESS
    assert ex.read_u32(size - 4) == 1
    assert ex.raw("init_execution_context", graph, size - 3) == INVALID_ARGUMENT


# --- handles ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ctx", [1, 7, 0x80000000, U32_MAX])
def test_bad_context_handle(ex, computed_ctx, ctx):
    x, _, _ = add_inputs()
    out, written = ex.alloc(24), ex.out_slot()
    calls = {
        "set_input": lambda: ex.set_input(ctx, 0, F32, x),
        "compute": lambda: ex.raw("compute", ctx),
        "get_output": lambda: ex.raw("get_output", ctx, 0, out, 24, written),
        "compute_single": lambda: ex.raw("compute_single", ctx),
        "get_output_single": lambda: ex.raw("get_output_single", ctx, 0, out, 24, written),
        "fini_single": lambda: ex.raw("fini_single", ctx),
        "finalize_execution_context": lambda: ex.raw("finalize_execution_context", ctx),
    }
    for name, call in calls.items():
        assert_error(ex, call(), INVALID_ARGUMENT, name)
    assert ex.read_u32(written) == 0xDEADBEEF


@pytest.mark.parametrize("graph", [1, 5, 0x80000000, U32_MAX])
def test_bad_graph_handle(ex, add_graph, graph):
    out = ex.out_slot()
    assert_error(ex, ex.raw("init_execution_context", graph, out), INVALID_ARGUMENT,
                 "init_execution_context")
    assert ex.read_u32(out) == 0xDEADBEEF
    assert_error(ex, ex.raw("unload", graph), INVALID_ARGUMENT, "unload")


def test_init_bad_ctx_out(ex, add_graph):
    size = ex.mem_size
    for ctx_out in (0xFFFFFFF0, size - 2, size, U32_MAX):
        errno = ex.raw("init_execution_context", add_graph, ctx_out)
        assert_error(ex, errno, INVALID_ARGUMENT, "init_execution_context")


def test_single_step_unsupported_on_onnx(ex, computed_ctx):
    out, written = ex.alloc(24), ex.out_slot()
    assert_error(ex, ex.raw("compute_single", computed_ctx), UNSUPPORTED, "compute_single")
    errno = ex.raw("get_output_single", computed_ctx, 0, out, 24, written)
    assert_error(ex, errno, UNSUPPORTED, "get_output_single")
    assert_error(ex, ex.raw("fini_single", computed_ctx), UNSUPPORTED, "fini_single")
    # the context is untouched
    _, _, z = add_inputs()
    assert ex.get_output(computed_ctx, 0, 24) == (SUCCESS, z.tobytes(), 24)


def test_unload(ex, onnx_models):
    errno, graph = ex.load(onnx_models["add"].read_bytes())
    assert errno == SUCCESS
    assert ex.raw("unload", graph) == SUCCESS
    assert_error(ex, ex.init(graph)[0], INVALID_ARGUMENT, "init_execution_context")
    assert_error(ex, ex.raw("unload", graph), INVALID_ARGUMENT, "unload")


def test_unload_named_then_reload(ex):
    errno, graph = ex.load_by_name("add")
    assert errno == SUCCESS
    assert ex.raw("unload", graph) == SUCCESS
    assert_error(ex, ex.init(graph)[0], INVALID_ARGUMENT, "init_execution_context")
    errno, again = ex.load_by_name("add")
    assert errno == SUCCESS and again != graph  # a fresh handle; the old one stays dead
    check_add(ex, again)
    assert_error(ex, ex.init(graph)[0], INVALID_ARGUMENT, "init_execution_context")


def test_unload_does_not_touch_other_stores(host, module):
    """Named graphs are shared by the host: one store's unload (or end) leaves the others alone."""
    a, b = Exerciser(host, module), Exerciser(host, module)
    _, ga = a.load_by_name("add")
    _, gb = b.load_by_name("add")
    errno, ctx_b = b.init(gb)
    assert errno == SUCCESS
    assert a.raw("unload", ga) == SUCCESS
    check_add(b, gb)
    x, y, z = add_inputs()
    assert b.set_input(ctx_b, 0, F32, x) == SUCCESS and b.set_input(ctx_b, 1, F32, y) == SUCCESS
    del a
    gc.collect()
    assert b.raw("compute", ctx_b) == SUCCESS
    assert b.get_output(ctx_b, 0, 24) == (SUCCESS, z.tobytes(), 24)


def test_finalize_execution_context(ex, computed_ctx):
    x, _, _ = add_inputs()
    assert ex.raw("finalize_execution_context", computed_ctx) == SUCCESS
    assert_error(ex, ex.set_input(computed_ctx, 0, F32, x), INVALID_ARGUMENT, "set_input")
    assert_error(ex, ex.raw("compute", computed_ctx), INVALID_ARGUMENT, "compute")
    assert_error(ex, ex.get_output(computed_ctx, 0, 24)[0], INVALID_ARGUMENT, "get_output")
    assert_error(ex, ex.raw("finalize_execution_context", computed_ctx), INVALID_ARGUMENT,
                 "finalize_execution_context")
    # handles are not reused
    errno, ctx = ex.init(ex.load_by_name("add")[1])
    assert errno == SUCCESS and ctx != computed_ctx


# --- limits and stores -----------------------------------------------------------------------

def test_max_tensor_bytes(onnx_models, guests):
    h = Host(models=[f"add:onnx:cpu:{onnx_models['add']}",
                     f"identity_f32:onnx:cpu:{onnx_models['identity_f32']}"],
             max_tensor_bytes=16, module_cache=False)
    try:
        e = Exerciser(h, h.compile(guests["abi_exerciser"]))
        errno, graph = e.load_by_name("add")
        assert errno == SUCCESS
        errno, ctx = e.init(graph)
        assert errno == SUCCESS
        x, _, _ = add_inputs()  # 24 bytes > 16
        assert_error(e, e.set_input(ctx, 0, F32, x), TOO_LARGE, "set_input")
        # exactly at the limit is fine
        errno, ident = e.load_by_name("identity_f32")
        assert errno == SUCCESS
        array = VALUES["f32"]  # 16 bytes
        assert e.infer(ident, [(F32, array)], [16]) == [array.tobytes()]
        # the refused context stays usable and keeps refusing
        assert_error(e, e.set_input(ctx, 0, F32, x), TOO_LARGE, "set_input")
    finally:
        h.close()


def test_unregistered_store_gets_errno(host, module):
    """A Store never given to host.add_to_store: wasi-nn answers an errno, nothing traps."""
    bare = Exerciser(host, module, register=False)
    name = bare.put(b"add")
    out = bare.out_slot()
    assert bare.raw("load_by_name", name, 3, out) == RUNTIME_ERROR
    for fn, arity in (("compute", 1), ("unload", 1), ("init_execution_context", 2),
                      ("get_output", 5), ("set_input", 3), ("load", 5)):
        assert bare.raw(fn, *([0] * arity)) == RUNTIME_ERROR
    assert bare.read_u32(out) == 0xDEADBEEF
    # a registered store on the same host is unaffected
    good = Exerciser(host, module)
    check_add(good, good.load_by_name("add")[1])


def test_unregistered_store_plain_engine(onnx_models, guests):
    """The same with an embedder's engine without epoch interruption."""
    h = Host(models=[f"add:onnx:cpu:{onnx_models['add']}"], module_cache=False,
             engine=wasmtime.Engine())
    try:
        module = h.compile(guests["abi_exerciser"])
        bare = Exerciser(h, module, store=wasmtime.Store(h.engine))
        name = bare.put(b"add")
        assert bare.raw("load_by_name", name, 3, bare.out_slot()) == RUNTIME_ERROR
        good = Exerciser(h, module)
        check_add(good, good.load_by_name("add")[1])
    finally:
        h.close()


def test_unregistered_store_on_host_engine_stops_at_once(host, module):
    """Documented: a Store on host.engine must go through add_to_store (epoch deadline 0
    otherwise), so forgetting it stops the guest before it runs rather than later."""
    store = wasmtime.Store(host.engine)
    instance = host.linker(wasi=False).instantiate(store, module)
    with pytest.raises(wasmtime.Trap) as trap:
        instance.exports(store)["_initialize"](store)
    assert trap.value.trap_code == wasmtime.TrapCode.INTERRUPT


# --- guests without a usable memory (hand-written modules) --------------------------------------

_WAT = """
(module
  (import "wasi_ephemeral_nn" "load_by_name" (func $load_by_name (param i32 i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "compute" (func $compute (param i32) (result i32)))
  %s
  (func (export "by_name") (param i32 i32 i32) (result i32)
    (call $load_by_name (local.get 0) (local.get 1) (local.get 2)))
  (func (export "compute") (param i32) (result i32) (call $compute (local.get 0))))
"""


def _wat_guest(host, memory_decl):
    store = wasmtime.Store(host.engine)
    host.add_to_store(store)
    module = wasmtime.Module(host.engine, _WAT % memory_decl)
    exports = host.linker(wasi=False).instantiate(store, module).exports(store)
    return store, exports


@pytest.mark.parametrize("memory_decl", [
    "(memory 1)",                                   # not exported
    '(memory (export "mem") 1)',                    # exported under another name
    '(func (export "memory"))',                     # `memory` is not a memory
    '(global (export "memory") i32 (i32.const 0))',
])
def test_missing_memory(host, memory_decl):
    store, exports = _wat_guest(host, memory_decl)
    assert exports["by_name"](store, 0, 3, 8) == Errno.MISSING_MEMORY
    assert exports["compute"](store, 0) == INVALID_ARGUMENT  # no memory needed: a bad handle


def test_empty_memory(host):
    """A zero-page memory: every range is out of bounds, the empty one at 0 is not."""
    store, exports = _wat_guest(host, '(memory (export "memory") 0)')
    assert exports["by_name"](store, 0, 3, 8) == INVALID_ARGUMENT
    assert exports["by_name"](store, 0, 0, 0) == INVALID_ARGUMENT  # graph_out 0+4 > 0


def test_memory_found_by_export_name(host):
    store, exports = _wat_guest(host, '(memory (export "memory") 1) (data (i32.const 16) "add")')
    assert exports["by_name"](store, 16, 3, 32) == SUCCESS
    assert exports["by_name"](store, 16, 3, 65533) == INVALID_ARGUMENT
    assert exports["by_name"](store, 16, 3, 65532) == SUCCESS


# --- the tensor_type disambiguation helper ---------------------------------------------------

@pytest.mark.parametrize("code, dims, data_len, expected, result", [
    # codes that mean the same in both numberings
    (0, (2, 2), 8, np.float16, TensorType.F16),
    (1, (2, 3), 24, np.float32, TensorType.F32),
    # current numbering
    (2, (2, 2), 32, np.float64, TensorType.F64),
    (3, (2, 2), 4, np.uint8, TensorType.U8),
    (4, (2, 2), 16, np.int32, TensorType.I32),
    (5, (2, 2), 32, np.int64, TensorType.I64),
    # the older numbering, told apart by the graph's dtype and the byte length
    (2, (1, 224, 224, 3), 150528, np.uint8, TensorType.U8),
    (3, (2, 2), 16, np.int32, TensorType.I32),
    (4, (2, 2), 32, np.int64, TensorType.I64),
    # no graph dtype: the length decides, else the current numbering
    (2, (4,), 4, None, TensorType.U8),
    (2, (4,), 32, None, TensorType.F64),
    (3, (4,), 16, None, TensorType.I32),
    (3, (4,), 4, None, TensorType.U8),
    (4, (4,), 32, None, TensorType.I64),
    (4, (4,), 7, None, TensorType.I32),
    # the graph's dtype wins over the length (the caller then rejects the length)
    (2, (4,), 4, np.float64, TensorType.F64),
    # neither candidate is wanted: one that fits
    (3, (4,), 16, np.float32, TensorType.I32),
    # the GGML prompt case: type 3, dims [1], data_len = the prompt's length
    (3, (1,), 11, None, TensorType.U8),
])
def test_resolve_tensor_type(code, dims, data_len, expected, result):
    dtype = None if expected is None else np.dtype(expected)
    assert resolve_tensor_type(code, dims, data_len, dtype) is result


@pytest.mark.parametrize("code", [6, 7, 255, -1])
def test_resolve_tensor_type_unknown(code):
    with pytest.raises(InvalidArgument):
        resolve_tensor_type(code, (1,), 1, None)
