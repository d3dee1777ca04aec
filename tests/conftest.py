"""Shared fixtures: guests built from source, small ONNX graphs, the real classifier's assets."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from onnx_models import make_all

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build"


def _load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def guests() -> dict[str, Path]:
    """Every guest in guests/, compiled for wasm32-wasi (incremental)."""
    build = _load_script(REPO / "guests" / "build.py", "wasinn_guest_build")
    return build.build_guests(BUILD / "guests")


@pytest.fixture(scope="session")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_all(tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="session")
def example_assets() -> Path:
    """The real EfficientNet-Lite0 ONNX, ImageNet labels and the cat photo (made once)."""
    prepare = _load_script(REPO / "examples" / "classify" / "prepare.py", "wasinn_prepare")
    out = BUILD / "example"
    assert prepare.main([str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def reference():
    return _load_script(REPO / "examples" / "classify" / "reference.py", "wasinn_reference")
