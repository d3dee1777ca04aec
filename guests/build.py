"""Build the C test guests in this directory to wasm32-wasi with zig cc.

Usage: ``python guests/build.py [OUT_DIR]`` (default ``build/guests`` under the
repository root), or ``build_guests(out_dir)`` from Python.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

GUESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = GUESTS_DIR.parent
DEFAULT_OUT_DIR = REPO_ROOT / "build" / "guests"
HEADER = GUESTS_DIR / "wasi_nn.h"

#: Guests built as WASI reactors (no main; exported functions + _initialize).
REACTORS = frozenset({"abi_exerciser", "bench"})
#: All guests, by stem.
GUESTS = ("classify", "abi_exerciser", "bench", "probe", "chat", "stream", "embed",
          "edge_classify", "edge_chat", "edge_test",
          "preinit_table", "preinit_nn", "classify_preinit")
#: Guests that need libm.
WITH_LIBM = frozenset({"classify", "edge_classify", "classify_preinit"})

#: Guest stack size. zig's default (16 MiB) makes every guest start with 257
#: pages of memory; 1 MiB keeps the initial memory at ~17 pages so that host
#: memory-limit tests have headroom.
STACK_SIZE = 1 << 20

BASE_FLAGS = (
    "--target=wasm32-wasi",
    "-O2",
    "-msimd128",  # wasm SIMD (wasmtime and WasmEdge run it): image.h normalizes 16 pixels at once
    "-s",
    "-Wall",
    "-Werror",
    f"-Wl,-z,stack-size={STACK_SIZE}",
)


class GuestBuildError(RuntimeError):
    """A guest failed to compile; the message carries the compiler's stderr."""


def _compile_command(src: Path, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "ziglang", "cc", *BASE_FLAGS]
    if src.stem in REACTORS:
        cmd.append("-mexec-model=reactor")
    cmd += ["-I", str(GUESTS_DIR), "-o", str(out), str(src)]
    if src.stem in WITH_LIBM:
        cmd.append("-lm")
    return cmd


def _up_to_date(src: Path, out: Path) -> bool:
    if not out.exists():
        return False
    out_mtime = out.stat().st_mtime
    # every header, and any .c a guest includes (classify_preinit.c is classify.c + init)
    included = re.findall(r'^#include "(\w+\.c)"', src.read_text(), re.M)
    deps = (src, *GUESTS_DIR.glob("*.h"), *(GUESTS_DIR / name for name in included),
            Path(__file__).resolve())
    return all(dep.stat().st_mtime < out_mtime for dep in deps)


def build_guests(
    out_dir: Path, sources: list[str] | None = None
) -> dict[str, Path]:
    """Compile guests into ``out_dir``; return ``{stem: wasm_path}``.

    ``sources`` lists guest stems (``"probe"``) or ``.c`` paths; default: all.
    Guests whose ``.wasm`` is newer than their ``.c`` and ``wasi_nn.h`` are
    skipped. Raises :class:`GuestBuildError` with the compiler's stderr.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(GUESTS) if sources is None else list(sources)
    built: dict[str, Path] = {}
    for name in names:
        src = Path(name)
        if src.suffix != ".c":
            src = GUESTS_DIR / f"{name}.c"
        elif not src.is_absolute() and not src.exists():
            src = GUESTS_DIR / src.name
        if not src.exists():
            raise GuestBuildError(f"no such guest source: {src}")
        out = out_dir / f"{src.stem}.wasm"
        if not _up_to_date(src, out):
            cmd = _compile_command(src, out)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise GuestBuildError(
                    f"compiling {src.name} failed (exit {proc.returncode}):\n"
                    f"{proc.stderr}{proc.stdout}"
                )
            print(f"built {out}")
        built[src.stem] = out
    return built


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print("usage: python guests/build.py [OUT_DIR]", file=sys.stderr)
        return 2
    out_dir = Path(args[0]) if args else DEFAULT_OUT_DIR
    try:
        build_guests(out_dir)
    except GuestBuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
