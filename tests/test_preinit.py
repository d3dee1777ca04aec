"""Pre-initialization: the real Wizer and wasinn's own snapshotter on real guests, the graph
handles a snapshot holds bound again at instantiation, and THE RULE for wasi-nn during init."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import wasmtime

from wasinn import Host
from wasinn.preinit import (SECTION, GraphBinding, PreinitError, PreinitRecord, find_wizer,
                            preinitialize, read_record)
from wasinn.preinit._wasm import (CODE, DATA, DATACOUNT, EXPORT, FUNCTION, GLOBAL, IMPORT, MEMORY, START,
                                  TYPE, Module, uleb)

#: what preinit_nn prints: x + y for x = 1..6, y = 10..60, on both graphs bound during init
NN_OUTPUT = ["add (graph 0): 11 22 33 44 55 66", "add2 (graph 1): 11 22 33 44 55 66",
             "add again: errno 0, graph 0"]


@pytest.fixture(scope="module")
def host(onnx_models: dict[str, Path]) -> Host:
    add = onnx_models["add"]
    host = Host(models=[f"add:onnx:cpu:{add}", f"add2:onnx:cpu:{add}", f"add3:onnx:cpu:{add}"],
                module_cache=False)
    yield host
    host.close()


@pytest.fixture(scope="module")
def wizer() -> str:
    path = find_wizer()
    if path is None:
        pytest.skip("Wizer is not installed (scripts/env.sh installs it with npm; or set "
                    "$WASINN_WIZER)")
    return path


def run(host: Host, wasm: bytes, *args: str) -> list[str]:
    out = bytearray()
    assert host.run(wasm, args, stdout=out.extend) == 0
    return out.decode().splitlines()


def test_reader_writer_round_trip_on_every_guest(guests: dict[str, Path]) -> None:
    engine = wasmtime.Engine()
    for name, path in guests.items():
        wasm = path.read_bytes()
        module = Module.parse(wasm)
        assert module.encode() == wasm, name
        # decoded and re-encoded, every section this reader knows comes back the same
        for section, get, put in [(GLOBAL, module.globals, module.set_globals),
                                  (EXPORT, module.exports, module.set_exports),
                                  (MEMORY, module.memories, module.set_memories),
                                  (DATA, module.data, module.set_data)]:
            if module.find(section) is not None:
                put(get())
        assert module.encode() == wasm, name
        wasmtime.Module.validate(engine, module.encode())


def test_wizer_snapshot_starts_warm(guests: dict[str, Path], host: Host, wizer: str) -> None:
    wasm = guests["preinit_table"].read_bytes()
    cold = run(host, wasm, "5", "65535")
    done = preinitialize(wasm, host, engine="wizer")
    assert done.engine == "wizer" and done.record is None
    warm = run(host, done.wasm, "5", "65535")
    # init ran once, before the snapshot (warm: 1), and not again in main
    assert cold[:2] == ["init runs: 1", "warm: 0"]
    assert warm[:2] == ["init runs: 1", "warm: 1"]
    assert warm[2:] == cold[2:] and cold[2].startswith("checksum: ")
    exports = [e.name for e in Module.parse(done.wasm).exports()]
    assert "wizer.initialize" not in exports and "wizer.resume" not in exports


def test_own_engine_matches_wizer(guests: dict[str, Path], host: Host) -> None:
    wasm = guests["preinit_table"].read_bytes()
    done = preinitialize(wasm, host, engine="wasinn")
    assert done.engine == "wasinn"
    cold = run(host, wasm, "5", "65535")
    assert run(host, done.wasm, "5", "65535") == ["init runs: 1", "warm: 1", *cold[2:]]
    module = Module.parse(done.wasm)
    assert module.custom(SECTION) is None  # no wasi-nn imports: nothing to record
    assert module.find(START) is None
    assert [e.name for e in module.exports()] == ["memory", "_start"]
    # the snapshot's bytes, not the compiler's: far more data than the original module had
    assert sum(len(s.data) for s in module.data()) > 65536 * 4 * 0.9


def test_auto_picks_wizer_without_wasi_nn(guests: dict[str, Path], host: Host,
                                          wizer: str) -> None:
    wasm = guests["preinit_table"].read_bytes()
    assert preinitialize(wasm, host).engine == "wizer"
    # Wizer only inherits the whole environment: an --env means our engine
    assert preinitialize(wasm, host, env={"A": "b"}).engine == "wasinn"


def test_nn_guest_handles_bound_again(guests: dict[str, Path], host: Host) -> None:
    wasm = guests["preinit_nn"].read_bytes()
    assert run(host, wasm, "add3") == ["warm: 0", *NN_OUTPUT, "add3: errno 0, graph 2"]
    done = preinitialize(wasm, host)
    assert done.engine == "wasinn"
    expected = PreinitRecord((GraphBinding(0, "add"),
                              GraphBinding(1, "add2", {"note": "loaded during init"})), 2)
    assert done.record == expected
    assert read_record(done.wasm) == expected
    # the same handles, the same models; a new load continues past them
    assert run(host, done.wasm, "add3") == ["warm: 1", *NN_OUTPUT, "add3: errno 0, graph 2"]
    # a Module compiled by the host carries its record to add_to_store
    compiled = host.compile(done.wasm)
    assert host.preinit_record(compiled) == expected
    assert host.preinit_record(host.compile(wasm)) is None


def test_missing_model_fails_at_instantiation(guests: dict[str, Path], host: Host,
                                              onnx_models: dict[str, Path]) -> None:
    done = preinitialize(guests["preinit_nn"].read_bytes(), host)
    other = Host(models=[f"add:onnx:cpu:{onnx_models['add']}"], module_cache=False)
    try:
        with pytest.raises(PreinitError, match="model 'add2' as graph 1.*no model named 'add2'"):
            other.run(done.wasm)
        store = other.store()
        with pytest.raises(PreinitError, match="add2"):
            other.add_to_store(store, preinit=read_record(done.wasm))
    finally:
        other.close()


@pytest.mark.parametrize(("mode", "call"), [("context", "init_execution_context"),
                                            ("bytes", "load")])
def test_init_that_holds_host_state_is_refused(guests: dict[str, Path], host: Host, mode: str,
                                               call: str) -> None:
    # the guest ignores the errno it gets: the refusal does not depend on the guest noticing
    with pytest.raises(PreinitError, match=f"called wasi-nn {call}: .* only load graphs by name"):
        preinitialize(guests["preinit_nn"].read_bytes(), host, env={"PREINIT_MODE": mode})


def test_module_without_init_function(guests: dict[str, Path], host: Host) -> None:
    with pytest.raises(PreinitError, match="exports no function 'wizer.initialize'"):
        preinitialize(guests["probe"].read_bytes(), host)
    with pytest.raises(PreinitError, match="not a module"):
        preinitialize(b"\0asm\x01\0\0\0\x07\x05", host)


def test_wizer_refuses_wasi_nn(guests: dict[str, Path], host: Host, wizer: str) -> None:
    with pytest.raises(PreinitError, match="imports wasi_ephemeral_nn"):
        preinitialize(guests["preinit_nn"].read_bytes(), host, engine="wizer")


def test_malformed_record_is_a_clear_error() -> None:
    module = Module.parse(b"\0asm\x01\0\0\0")
    module.set_custom(SECTION, b'{"format": 1, "graphs": [{"handle": -1}], "next_graph": 0}')
    with pytest.raises(PreinitError, match="malformed"):
        read_record(module.encode())
    module.set_custom(SECTION, b'{"format": 9, "graphs": [], "next_graph": 0}')
    with pytest.raises(PreinitError, match="format 9"):
        read_record(module.encode())


def test_cli_preinit_then_run(guests: dict[str, Path], onnx_models: dict[str, Path],
                              tmp_path: Path) -> None:
    out = tmp_path / "nn.wasm"
    models = []
    for name in ("add", "add2"):
        models += ["--nn-preload", f"{name}:onnx:cpu:{onnx_models['add']}"]
    cli = [sys.executable, "-m", "wasinn"]
    made = subprocess.run([*cli, "preinit", str(guests["preinit_nn"]), "-o", str(out), *models],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert "with wasinn" in made.stderr and "graphs bound: 0=add, 1=add2" in made.stderr
    ran = subprocess.run([*cli, "run", "--no-cache", *models, str(out)], capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["warm: 1", *NN_OUTPUT]
    # without the models it was made with, `wasinn run` says so before the guest starts
    bare = subprocess.run([*cli, "run", "--no-cache", str(out)], capture_output=True,
                          text=True, timeout=60)
    assert bare.returncode == 2 and "no model named 'add'" in bare.stderr
    assert bare.stdout == ""
    refused = subprocess.run([*cli, "preinit", str(guests["preinit_nn"]), "-o",
                              str(tmp_path / "bad.wasm"), "--env", "PREINIT_MODE=context",
                              *models], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "init_execution_context" in refused.stderr
    assert not (tmp_path / "bad.wasm").exists()


def test_sections_rewritten(guests: dict[str, Path], host: Host) -> None:
    original = Module.parse(guests["preinit_nn"].read_bytes())
    done = Module.parse(preinitialize(guests["preinit_nn"].read_bytes(), host).wasm)
    # code, types, imports are untouched; data, exports and the record are new
    for section in (TYPE, IMPORT, FUNCTION, CODE):
        assert done.find(section).payload == original.find(section).payload
    assert done.custom(SECTION) is not None
    assert done.find(DATA).payload != original.find(DATA).payload
    assert done.find(EXPORT).payload != original.find(EXPORT).payload
    assert done.memories()[0].minimum >= original.memories()[0].minimum


def test_classify_preinit_matches_classify(guests: dict[str, Path],
                                           example_assets: Path) -> None:
    """The README's classifier, pre-initialized: the model bound by name and the labels read
    during init; the same top-5 as the plain guest."""
    model = f"eff:onnx:cpu:{example_assets / 'efficientnet-lite0' / 'model.onnx'}"
    host = Host(models=[model], module_cache=False)
    dirs = [f"{example_assets}:/data"]
    args = ("eff", "/data/chelsea.ppm", "/data/imagenet_labels.txt")
    try:
        plain = bytearray()
        assert host.run(guests["classify"], args, dirs=dirs, stdout=plain.extend) == 0
        done = preinitialize(guests["classify_preinit"].read_bytes(), host, dirs=dirs,
                             env={"CLASSIFY_MODEL": "eff",
                                  "CLASSIFY_LABELS": "/data/imagenet_labels.txt"})
        assert done.record == PreinitRecord((GraphBinding(0, "eff"),), 1)
        warm = bytearray()
        assert host.run(done.wasm, args, dirs=dirs, stdout=warm.extend) == 0
    finally:
        host.close()
    assert warm == plain
    assert plain.decode().startswith("1: Egyptian cat (class 285, p=0.4267)\n")


SNAPSHOT_WAT = """
(module
  (memory (export "memory") 1)
  (global $count (mut i32) (i32.const 0))
  (global $big (mut i64) (i64.const 0))
  (global $half (mut f64) (f64.const 0))
  (global $k i32 (i32.const 7))
  (data $active (i32.const 16) "active")
  (data $passive "passive")
  (func $start (global.set $count (i32.add (global.get $count) (i32.const 1))))
  (start $start)
  (func (export "wizer.initialize")
    (drop (memory.grow (i32.const 2)))
    (memory.init $passive (i32.const 131072) (i32.const 0) (i32.const 7))
    (i32.store (i32.const 65536) (i32.const 0x01020304))
    (global.set $big (i64.const -5000000000))
    (global.set $half (f64.const 0.5)))
  (func (export "use_passive") (memory.init $passive (i32.const 64) (i32.const 0) (i32.const 7)))
  (func (export "count") (result i32) (global.get $count))
  (func (export "big") (result i64) (global.get $big))
  (func (export "half") (result f64) (global.get $half)))
"""


def test_snapshot_of_globals_start_and_passive_data(host: Host) -> None:
    wasm = wasmtime.wat2wasm(SNAPSHOT_WAT)
    out = preinitialize(bytes(wasm), host, engine="wasinn").wasm
    module = Module.parse(out)
    assert module.find(START) is None  # it ran before the snapshot, and must not run again
    assert module.memories()[0].minimum == 3
    segments = module.data()
    # the passive segment keeps its index (memory.init names it), the active one is emptied
    assert [s.passive for s in segments[:2]] == [True, True]
    assert segments[0].data == b"" and segments[1].data == b"passive"
    assert module.find(DATACOUNT).payload == uleb(len(segments))
    store = wasmtime.Store()
    instance = wasmtime.Instance(store, wasmtime.Module(store.engine, out), [])
    exports = instance.exports(store)
    assert exports["count"](store) == 1
    assert exports["big"](store) == -5000000000
    assert exports["half"](store) == 0.5
    memory = exports["memory"]
    assert memory.read(store, 16, 22) == b"active"
    assert memory.read(store, 65536, 65540) == b"\x04\x03\x02\x01"
    assert memory.read(store, 131072, 131079) == b"passive"
    exports["use_passive"](store)
    assert memory.read(store, 64, 71) == b"passive"
    assert "wizer.initialize" not in [e.name for e in module.exports()]
