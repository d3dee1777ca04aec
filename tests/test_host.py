"""The Python API: Host in the user's own Linker and Store, and Host.run."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import wasmtime

from wasinn import GuestTimeout, Host, ModelSpec


def test_run_captures_stdout_and_returns_exit_code(guests: dict[str, Path], tmp_path: Path) -> None:
    host = Host(module_cache=tmp_path)
    out: list[bytes] = []
    assert host.run(guests["probe"], ["args", "a", "b"], stdout=out.append) == 0
    assert b"".join(out) == b"a\nb\n"
    assert host.run(guests["probe"], ["exit", "5"]) == 5


def test_run_stdin_from_bytes(guests: dict[str, Path], tmp_path: Path) -> None:
    """stdin given as bytes: no file to write (how routes pass request bodies)."""
    host = Host(module_cache=tmp_path)
    body = bytes(range(256)) * 600  # binary, and more than one read
    for given in (body, bytearray(body), memoryview(body)):
        out: list[bytes] = []
        assert host.run(guests["probe"], ["stdin"], stdin=given, stdout=out.append) == 0
        assert b"".join(out) == body
    out = []
    assert host.run(guests["probe"], ["stdin"], stdin=b"", stdout=out.append) == 0
    assert b"".join(out) == b""


def test_instance_pool(guests: dict[str, Path], tmp_path: Path) -> None:
    """wasmtime's pooling allocator: slots come back as stores go; past N alive, a clear
    error, and the host goes on."""
    host = Host(module_cache=tmp_path, instance_pool=2)
    module = host.compile(guests["probe"])
    linker = host.linker()
    held = []
    for _ in range(2):
        store = host.store()
        store.set_wasi(wasmtime.WasiConfig())
        held.append((store, linker.instantiate(store, module)))
    store = host.store()
    store.set_wasi(wasmtime.WasiConfig())
    with pytest.raises(wasmtime.WasmtimeError, match="concurrent"):
        linker.instantiate(store, module)
    held.clear()  # their slots come back
    for _ in range(5):
        out: list[bytes] = []
        assert host.run(module, ["args", "x"], stdout=out.append) == 0
        assert b"".join(out) == b"x\n"
    with pytest.raises(ValueError, match="instance_pool"):
        Host(engine=wasmtime.Engine(), instance_pool=2)
    with pytest.raises(ValueError, match="at least 1"):
        Host(instance_pool=0)


def test_run_stdio_files_env_dirs(guests: dict[str, Path], tmp_path: Path) -> None:
    host = Host(module_cache=tmp_path)
    (tmp_path / "in.txt").write_text("hello stdin")
    out = tmp_path / "out.txt"
    assert host.run(guests["probe"], ["stdin"], stdin=tmp_path / "in.txt", stdout=out) == 0
    assert out.read_text() == "hello stdin"
    assert host.run(guests["probe"], ["env", "X"], env={"X": "42"}, stdout=out) == 0
    assert out.read_text() == "42\n"
    assert host.run(guests["probe"], ["cat", "/d/in.txt"], dirs=[f"{tmp_path}:/d"], stdout=out) == 0
    assert out.read_text() == "hello stdin"


def test_timeout_then_host_keeps_working(guests: dict[str, Path], onnx_models: dict[str, Path],
                                         tmp_path: Path) -> None:
    host = Host(models=[f"sum:onnx:cpu:{onnx_models['add']}"], module_cache=tmp_path)
    with pytest.raises(GuestTimeout):
        host.run(guests["probe"], ["spin"], timeout=0.3)
    out: list[bytes] = []
    assert host.run(guests["probe"], ["nn-name", "sum"], stdout=out.append) == 0
    assert b"".join(out) == b"errno 0\ngraph 0\n"
    # a spinning guest in one thread does not stop a working one in another
    errors: list[BaseException] = []

    def spin() -> None:
        try:
            host.run(guests["probe"], ["spin"], timeout=1.0)
        except GuestTimeout as e:
            errors.append(e)

    thread = threading.Thread(target=spin)
    thread.start()
    out.clear()
    assert host.run(guests["probe"], ["args", "alive"], stdout=out.append) == 0
    thread.join(10)
    assert b"".join(out) == b"alive\n"
    assert len(errors) == 1


def test_trap_raises(guests: dict[str, Path], tmp_path: Path) -> None:
    host = Host(module_cache=tmp_path)
    with pytest.raises(wasmtime.Trap):
        host.run(guests["probe"], ["trap"])
    assert host.run(guests["probe"], ["exit", "0"]) == 0


def test_users_own_linker_and_store(guests: dict[str, Path], onnx_models: dict[str, Path],
                                    tmp_path: Path) -> None:
    """The embedder keeps control: its Linker has its own functions, its Store its own data."""
    host = Host(models=[ModelSpec.from_preload(f"sum:onnx:cpu:{onnx_models['add']}")],
                module_cache=tmp_path)
    linker = wasmtime.Linker(host.engine)
    linker.define_wasi()
    host.add_to_linker(linker)
    wasi = wasmtime.WasiConfig()
    wasi.argv = ["probe", "nn-name", "sum"]
    captured: list[bytes] = []
    wasi.stdout_custom = captured.append
    store = wasmtime.Store(host.engine)
    store.set_wasi(wasi)
    state = host.add_to_store(store)
    instance = linker.instantiate(store, host.compile(guests["probe"]))
    instance.exports(store)["_start"](store)  # main returned 0: no proc_exit
    assert b"".join(captured) == b"errno 0\ngraph 0\n"
    assert list(state.graphs) == [0]


def test_named_model_loaded_once_and_shared(guests: dict[str, Path], onnx_models: dict[str, Path],
                                            tmp_path: Path) -> None:
    host = Host(models=[f"sum:onnx:cpu:{onnx_models['add']}"], module_cache=tmp_path)
    assert not host.registry.is_loaded("sum")
    graphs = set()
    for _ in range(3):
        store = host.store()
        instance = host.linker(wasi=False).instantiate(store, host.compile(guests["abi_exerciser"]))
        exports = instance.exports(store)
        exports["_initialize"](store)
        memory = exports["memory"]
        buf = exports["ex_alloc"](store, 64)
        memory.write(store, b"sum", buf)
        assert exports["ex_load_by_name"](store, buf, 3, buf + 16) == 0
        graphs.add(id(host.registry.get("sum")))
    assert len(graphs) == 1
    assert host.registry.is_loaded("sum")


def test_progress_is_reported_for_large_loads(onnx_models: dict[str, Path]) -> None:
    events: list[tuple[str, int, int, str]] = []
    host = Host(models=[f"sum:onnx:cpu:{onnx_models['add']}"],
                progress=lambda *event: events.append(event))
    host.registry._progress_min_bytes = 0  # the tiny test model counts as large here
    host.registry.get("sum")
    size = onnx_models["add"].stat().st_size
    assert events[0][:3] == ("sum", size, size) and events[0][3] == "read"
    assert [e[3] for e in events[-2:]] == ["build", "ready"]


def test_threads_reach_onnxruntime(onnx_models: dict[str, Path]) -> None:
    host = Host(models=[f"sum:onnx:cpu:{onnx_models['add']}"], threads=1)
    graph = host.registry.get("sum")
    options = graph.session.get_session_options()
    assert options.intra_op_num_threads == 1
    ctx = graph.init_execution_context()
    assert ctx is not graph.init_execution_context()
    np.testing.assert_array_equal(graph.session.run(None, {
        "x": np.ones((2, 3), np.float32), "y": np.ones((2, 3), np.float32)})[0], 2)
