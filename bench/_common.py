"""What both benchmarks need: the repository's paths, its non-package scripts, its guests."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
GUESTS_OUT = ROOT / "build" / "guests"


def load_script(name: str, path: Path) -> ModuleType:
    """Import a script of this repository that is not in a package (guests/, examples/)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_guests(names: Sequence[str]) -> dict[str, Path]:
    """Compile these guests from guests/ (incremental, quiet) into build/guests."""
    builder = load_script("wasinn_guest_build", ROOT / "guests" / "build.py")
    with contextlib.redirect_stdout(io.StringIO()):
        built: dict[str, Path] = builder.build_guests(GUESTS_OUT, list(names))
    return built
