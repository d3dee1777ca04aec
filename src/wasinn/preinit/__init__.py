"""Pre-initialization: run a guest's `wizer.initialize` once, and ship its memory and globals
as the module's starting state, so every fresh instance starts warm.

Two engines: the real Wizer, for an init that needs only WASI; and wasinn's own snapshotter,
which also lets the init load graphs by name. THE RULE for wasi-nn during init: only
load_by_name / load_by_name_with_config; the module then records which handle means which
model, and every instance gets the same handles bound to the same named models (a host that
offers none of that name refuses to instantiate it). Anything whose state lives in the host
(`load` from bytes, execution contexts) is refused at pre-initialization.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ._record import SECTION, GraphBinding, PreinitError, PreinitRecord, read_record
from ._snapshot import INIT_FUNC, RESUME_FUNC, check_init_export, imports_wasi_nn, snapshot
from ._wasm import FUNC_KIND, Module, WasmFormatError, has_start
from ._wizer import WIZER_ENV, find_wizer, run_wizer

if TYPE_CHECKING:
    from ..host import Host, Output, Preopen

Engine = Literal["auto", "wizer", "wasinn"]


@dataclass(frozen=True)
class Preinitialized:
    wasm: bytes
    #: "wizer" or "wasinn": which one made it
    engine: str
    #: the graph bindings the module carries (None from Wizer: it has none)
    record: PreinitRecord | None


def preinitialize(wasm: bytes, host: Host | None = None, *, engine: Engine = "auto",
                  init_func: str = INIT_FUNC, env: Mapping[str, str] | None = None,
                  dirs: Iterable[Preopen] = (), stdout: Output = None,
                  stderr: Output = None) -> Preinitialized:
    """Snapshot `wasm` after its `init_func`. `auto` takes Wizer when the module imports no
    wasi-nn (and Wizer is installed, and no `env` is asked for), else wasinn's engine, which
    runs under `host` (its named models serve load_by_name during init)."""
    try:
        module = Module.parse(wasm)
        check_init_export(module, init_func)
        uses_nn = imports_wasi_nn(module)
    except WasmFormatError as e:
        raise PreinitError(f"not a module wasinn can pre-initialize: {e}") from None
    dirs = list(dirs)
    wizer = find_wizer() if engine != "wasinn" else None
    if engine == "wizer":
        if wizer is None:
            raise PreinitError(f"Wizer is not installed (scripts/env.sh installs it; or set "
                               f"${WIZER_ENV}, or put `wizer` on PATH)")
        if uses_nn:
            raise PreinitError("the module imports wasi_ephemeral_nn, which Wizer cannot "
                               "provide during init: use --engine wasinn (or auto)")
        if env:
            raise PreinitError("Wizer can only inherit the whole environment: --env needs "
                               "--engine wasinn (or auto)")
    use_wizer = wizer is not None and not uses_nn and not env and engine != "wasinn"
    if use_wizer:
        assert wizer is not None
        resume = any(e.name == RESUME_FUNC and e.kind == FUNC_KIND for e in module.exports())
        return Preinitialized(run_wizer(wizer, wasm, init_func=init_func, resume=resume,
                                        dirs=dirs), "wizer", None)
    if host is None:
        raise PreinitError("wasinn's engine needs a Host to run the init under")
    out, record = snapshot(wasm, host, init_func=init_func, env=env, dirs=dirs, stdout=stdout,
                           stderr=stderr)
    return Preinitialized(out, "wasinn", record if uses_nn else None)


__all__ = ["INIT_FUNC", "SECTION", "WIZER_ENV", "Engine", "GraphBinding", "PreinitError",
           "PreinitRecord", "Preinitialized", "find_wizer", "has_start", "preinitialize",
           "read_record"]

