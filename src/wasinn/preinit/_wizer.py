"""The real Wizer (npm `@bytecodealliance/wizer`), for guests whose init needs only WASI."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ._record import PreinitError

if TYPE_CHECKING:
    from ..host import Preopen

WIZER_ENV = "WASINN_WIZER"
#: where scripts/env.sh installs it, in a source checkout
_NPM_BIN = Path(__file__).resolve().parents[3] / "build" / "npm" / "node_modules" / ".bin" / "wizer"


def find_wizer() -> str | None:
    """$WASINN_WIZER, else the checkout's build/npm install, else `wizer` on PATH."""
    override = os.environ.get(WIZER_ENV)
    if override:
        return override
    if _NPM_BIN.is_file():
        return str(_NPM_BIN)
    return shutil.which("wizer")


def run_wizer(wizer: str, wasm: bytes, *, init_func: str, resume: bool,
              dirs: Iterable[Preopen] = ()) -> bytes:
    """Wizer's snapshot of `wasm`: WASI allowed during init, stdio inherited."""
    with tempfile.TemporaryDirectory(prefix="wasinn-wizer-") as tmp:
        source, output = Path(tmp) / "in.wasm", Path(tmp) / "out.wasm"
        source.write_bytes(wasm)
        command = [wizer, "--allow-wasi", "--wasm-bulk-memory=true", "-f", init_func]
        if resume:  # wizer.h's pattern: the snapshot starts at main, constructors done
            command += ["-r", "_start=wizer.resume"]
        for preopen in dirs:
            command += ["--mapdir", f"{preopen.guest}::{preopen.host}"]
        command += ["-o", str(output), str(source)]
        try:
            done = subprocess.run(command, stdout=None, stderr=subprocess.PIPE, text=True)
        except OSError as e:
            raise PreinitError(f"cannot run Wizer ({wizer}): {e}") from None
        if done.returncode != 0:
            raise PreinitError(f"Wizer failed (exit {done.returncode}): "
                               f"{done.stderr.strip()[-2000:]}")
        return output.read_bytes()
