"""wasinn's own snapshotter: Wizer's method, with wasi-nn's named graphs allowed during init.

A copy of the module exports its memory and mutable globals under private names; it runs under
a wasinn Host (WASI + wasi_ephemeral_nn) until its init function returns; then the ORIGINAL
module is rewritten so its memory and globals start where the init left them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import wasmtime

from ..abi import MODULE as NN_MODULE
from ._record import SECTION, GraphBinding, PreinitError, PreinitRecord
from ._wasm import (F32, F64, FUNC_KIND, GLOBAL_KIND, I32, I64, MEMORY_KIND, PAGE, START,
                    DataSegment, Export, Global, Module, const_of, i32_const)

if TYPE_CHECKING:
    from ..host import Host, Output, Preopen

INIT_FUNC = "wizer.initialize"
#: wizer.h's entry point for a snapshot: it becomes `_start` (Wizer's `-r _start=wizer.resume`)
RESUME_FUNC = "wizer.resume"
_PRIVATE = "__wasinn_snapshot"
#: zero runs shorter than this stay inside one data segment (a segment costs ~6 bytes)
_MERGE_GAP = 64
_MAX_SEGMENTS = 10_000


def check_init_export(module: Module, init_func: str) -> None:
    if not any(e.name == init_func and e.kind == FUNC_KIND for e in module.exports()):
        raise PreinitError(f"the module exports no function {init_func!r} to pre-initialize "
                           f"with (see guests/preinit.h; --init-func names another export)")


def imports_wasi_nn(module: Module) -> bool:
    return any(i.module == NN_MODULE for i in module.imports())


def snapshot(wasm: bytes, host: Host, *, init_func: str = INIT_FUNC,
             env: Mapping[str, str] | None = None, dirs: Iterable[Preopen | str] = (),
             stdout: Output = None, stderr: Output = None,
             program: str = "main.wasm") -> tuple[bytes, PreinitRecord]:
    """Run `init_func` of `wasm` under `host` and return the pre-initialized module and the
    graph bindings it carries. Raises PreinitError naming what cannot be snapshotted."""
    from ..host import HeldCallbacks, Preopen, _set_output

    module = Module.parse(wasm)
    check_init_export(module, init_func)
    for item in module.imports():
        if item.kind in (MEMORY_KIND, GLOBAL_KIND):
            raise PreinitError(f"the module imports {item.module}.{item.name}: a snapshot "
                               f"cannot hold imported memories or globals")
    memories = module.memories()
    if len(memories) > 1 or any(m.flags & 2 for m in memories):
        raise PreinitError("only a module with one unshared memory can be pre-initialized")
    globals_ = module.globals()
    for index, item in enumerate(globals_):
        if item.mutable and item.valtype not in (I32, I64, F32, F64):
            raise PreinitError(f"global {index} is a mutable {item.valtype:#x}: only numeric "
                               f"globals can be snapshotted")

    # (a) a copy that shows its state: memory and every mutable global, under private names
    instrumented = Module.parse(wasm)
    exports = instrumented.exports()
    exports += [Export(f"{_PRIVATE}_global_{i}", GLOBAL_KIND, i)
                for i, g in enumerate(globals_) if g.mutable]
    if memories:
        exports.append(Export(f"{_PRIVATE}_memory", MEMORY_KIND, 0))
    instrumented.set_exports(exports)
    try:
        compiled = wasmtime.Module(host.engine, instrumented.encode())
    except wasmtime.WasmtimeError as e:
        raise PreinitError(f"the module does not compile: {e}") from None

    # (b) instantiate under the host, wasi-nn refusing what a snapshot could not keep
    wasi = wasmtime.WasiConfig()
    wasi.argv = [program]
    if env:
        wasi.env = list(env.items())
    for entry in dirs:
        preopen = Preopen.parse(entry) if isinstance(entry, str) else entry
        wasi.preopen_dir(str(preopen.host), preopen.guest)
    held = HeldCallbacks()
    _set_output(wasi, "stdout", stdout, held)
    _set_output(wasi, "stderr", stderr, held)
    store = wasmtime.Store(host.engine)
    store.set_wasi(wasi)
    state = host.add_to_store(store)
    state.snapshot_refusals = []
    try:
        # (c) run the init function: its own start function too, as instantiation runs it
        try:
            instance = host.linker().instantiate(store, compiled)
            init = instance.exports(store)[init_func]
            assert isinstance(init, wasmtime.Func)
            init(store)
        except wasmtime.ExitTrap as e:
            _refused(state.snapshot_refusals, init_func)
            raise PreinitError(f"{init_func} exited (code {e.code}) instead of returning"
                               f"{_last_error(state)}") from None
        except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
            _refused(state.snapshot_refusals, init_func)
            raise PreinitError(f"{init_func} failed: {e}") from None
        _refused(state.snapshot_refusals, init_func)

        # (d) read the state
        values = {i: instance.exports(store)[f"{_PRIVATE}_global_{i}"].value(store)  # type: ignore[union-attr]
                  for i, g in enumerate(globals_) if g.mutable}
        memory = b""
        if memories:
            exported = instance.exports(store)[f"{_PRIVATE}_memory"]
            assert isinstance(exported, wasmtime.Memory)
            memory = bytes(exported.read(store, 0, exported.data_len(store)))
        record = PreinitRecord(tuple(GraphBinding(*g) for g in state.named_graphs()),
                               state.next_graph)
    finally:
        state.close()
        del store
        held.wait(1.0)  # wasmtime lets go of the output callbacks (see HeldCallbacks)

    # (e) the original module, starting from that state
    for index, value in values.items():
        globals_[index] = Global(globals_[index].valtype, True,
                                 const_of(globals_[index].valtype, value))
    if globals_:
        module.set_globals(globals_)
    if memories:
        memories[0].minimum = len(memory) // PAGE
        module.set_memories(memories)
        module.set_data(_data(module.data(), memory))
    module.set(START, None)  # it ran during init: its effects are in the snapshot
    module.set_exports(_final_exports(module.exports(), init_func))
    if imports_wasi_nn(module):
        module.set_custom(SECTION, record.to_json())
    return module.encode(), record


def _refused(refusals: list[str] | None, init_func: str) -> None:
    if refusals:
        calls = ", ".join(dict.fromkeys(refusals))
        raise PreinitError(f"{init_func} called wasi-nn {calls}: during pre-initialization a "
                           f"guest may only load graphs by name (load_by_name, "
                           f"load_by_name_with_config); execution contexts and graphs loaded "
                           f"from bytes live in the host and cannot be in a snapshot")


def _last_error(state: object) -> str:
    message = getattr(state, "last_error", None)
    return f" (last wasi-nn error: {message})" if message else ""


def _final_exports(exports: list[Export], init_func: str) -> list[Export]:
    """Without the init function; `wizer.resume`, when there is one, becomes `_start`."""
    exports = [e for e in exports if e.name != init_func]
    resume = next((e for e in exports if e.name == RESUME_FUNC and e.kind == FUNC_KIND), None)
    if resume is not None:
        exports = [e for e in exports if e.name != "_start" and e is not resume]
        exports.append(Export("_start", FUNC_KIND, resume.index))
    return exports


def _data(original: list[DataSegment], memory: bytes) -> list[DataSegment]:
    """The snapshot's non-zero runs as active segments. Passive segments keep their indices
    (memory.init and data.drop name them); the original active ones become empty passive ones,
    which behave as the dropped segments they were after instantiation."""
    segments = [s if s.passive else DataSegment(1, b"") for s in original] \
        if any(s.passive for s in original) else []
    for start, end in _runs(memory):
        segments.append(DataSegment(0, memory[start:end], i32_const(start)))
    return segments


def _runs(memory: bytes) -> list[tuple[int, int]]:
    """[start, end) of the non-zero bytes, runs closer than a small gap merged."""
    nonzero = np.flatnonzero(np.frombuffer(memory, np.uint8))
    if not nonzero.size:
        return []
    gap = _MERGE_GAP
    while True:
        breaks = np.flatnonzero(np.diff(nonzero) > gap)
        if len(breaks) < _MAX_SEGMENTS:
            break
        gap *= 2
    starts = np.concatenate(([nonzero[0]], nonzero[breaks + 1]))
    ends = np.concatenate((nonzero[breaks], [nonzero[-1]])) + 1
    return list(zip(starts.tolist(), ends.tolist()))

