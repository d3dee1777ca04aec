"""`wasinn run` as a user runs it: a real subprocess, real guests, real files."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from wasinn.cli import EXIT_TIMEOUT, EXIT_TRAP, EXIT_USAGE, parse_size


def wasinn(*args: str, stdin: str | None = None, cache: Path | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "wasinn", "run"]
    if cache is not None:
        cmd += ["--cache-dir", str(cache)]
    return subprocess.run(cmd + list(args), input=stdin, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def probe(guests: dict[str, Path]) -> str:
    return str(guests["probe"])


def test_args_reach_the_guest(probe: str, tmp_path: Path) -> None:
    result = wasinn(probe, "args", "one", "two words", "--not-a-flag", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["one", "two words", "--not-a-flag"]


def test_env(probe: str, tmp_path: Path) -> None:
    result = wasinn("--env", "GREETING=hello=world", probe, "env", "GREETING", cache=tmp_path)
    assert result.stdout == "hello=world\n"
    assert wasinn(probe, "env", "HOME", cache=tmp_path).stdout == "<unset>\n"


def test_preopened_dir_read_and_write(probe: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("from the host\n")
    result = wasinn("--dir", f"{data}:/work", probe, "cat", "/work/in.txt", cache=tmp_path)
    assert result.stdout == "from the host\n"
    result = wasinn("--dir", f"{data}:/work", probe, "write", "/work/out.txt", "from the guest",
                    cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (data / "out.txt").read_text() == "from the guest"


def test_guest_cannot_reach_unopened_paths(probe: str, tmp_path: Path) -> None:
    result = wasinn(probe, "cat", "/etc/passwd", cache=tmp_path)
    assert result.returncode != 0
    assert result.stdout == ""


def test_stdin_and_exit_code(probe: str, tmp_path: Path) -> None:
    assert wasinn(probe, "stdin", stdin="ping\n", cache=tmp_path).stdout == "ping\n"
    assert wasinn(probe, "exit", "7", cache=tmp_path).returncode == 7
    assert wasinn(probe, "exit", "0", cache=tmp_path).returncode == 0


def test_trap_is_reported(probe: str, tmp_path: Path) -> None:
    result = wasinn(probe, "trap", cache=tmp_path)
    assert result.returncode == EXIT_TRAP
    assert "trapped" in result.stderr


def test_timeout_stops_a_spinning_guest(probe: str, tmp_path: Path) -> None:
    start = time.monotonic()
    result = wasinn("--timeout", "0.5", probe, "spin", cache=tmp_path)
    assert result.returncode == EXIT_TIMEOUT
    assert "deadline" in result.stderr
    assert time.monotonic() - start < 20


def test_max_memory_makes_malloc_fail(probe: str, tmp_path: Path) -> None:
    result = wasinn("--max-memory", "32M", probe, "alloc", "100", cache=tmp_path)
    assert result.returncode == 3
    assert "malloc failed at 31 MB" in result.stdout


def test_named_models_both_syntaxes(probe: str, onnx_models: dict[str, Path],
                                    tmp_path: Path) -> None:
    graph_dir = tmp_path / "adder"
    graph_dir.mkdir()
    (graph_dir / "model.onnx").write_bytes(onnx_models["add"].read_bytes())
    result = wasinn("--nn-preload", f"sum:ONNX:CPU:{onnx_models['add']}",
                    "--nn-graph", f"onnx::{graph_dir}", probe, "nn-name", "sum", cache=tmp_path)
    assert result.stdout.splitlines() == ["errno 0", "graph 0"]
    result = wasinn("--nn-graph", f"onnx::{graph_dir}", probe, "nn-name", "adder", cache=tmp_path)
    assert result.stdout.splitlines() == ["errno 0", "graph 0"]


def test_guest_cannot_name_a_host_path(probe: str, onnx_models: dict[str, Path],
                                       tmp_path: Path) -> None:
    for name in [str(onnx_models["add"]), "../add.onnx", "add.onnx", ""]:
        result = wasinn("--nn-preload", f"sum:onnx:cpu:{onnx_models['add']}", probe, "nn-name",
                        name, cache=tmp_path)
        assert result.stdout.splitlines() == ["errno 8"], name


def test_config_file(probe: str, onnx_models: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "add.onnx").write_bytes(onnx_models["add"].read_bytes())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "note.txt").write_text("configured\n")
    config = tmp_path / "wasinn.toml"
    config.write_text('nn-preload = ["sum:onnx:cpu:models/add.onnx"]\n'
                      'dir = ["data:/data"]\n'
                      'env = {COLOUR = "blue"}\n'
                      'max-memory = "64M"\n')
    assert wasinn("--config", str(config), probe, "nn-name", "sum",
                  cache=tmp_path).stdout == "errno 0\ngraph 0\n"
    assert wasinn("--config", str(config), probe, "cat", "/data/note.txt",
                  cache=tmp_path).stdout == "configured\n"
    assert wasinn("--config", str(config), probe, "env", "COLOUR",
                  cache=tmp_path).stdout == "blue\n"
    result = wasinn("--config", str(config), probe, "alloc", "100", cache=tmp_path)
    assert "malloc failed at 63 MB" in result.stdout


def test_bad_input_gets_a_clear_error(probe: str, tmp_path: Path) -> None:
    cases = {
        ("--nn-preload", "nameonly"): "expected NAME:ENCODING:TARGET:PATH",
        ("--nn-preload", "m:nosuch:cpu:x.onnx"): "unknown graph encoding",
        ("--nn-preload", "m:onnx:warp:x.onnx"): "unknown execution target",
        ("--nn-graph", "onnx:/tmp"): "expected ENCODING::DIR",
        ("--env", "NOEQUALS"): "expected K=V",
        ("--max-memory", "lots"): "not a size",
        ("--dir", f"{tmp_path}/missing:/x"): "not a directory",
    }
    for flags, message in cases.items():
        result = wasinn(*flags, probe, "args", cache=tmp_path)
        assert result.returncode == EXIT_USAGE, flags
        assert message in result.stderr, (flags, result.stderr)
    result = wasinn(str(tmp_path / "missing.wasm"), cache=tmp_path)
    assert result.returncode == EXIT_USAGE and "no such module" in result.stderr
    (tmp_path / "junk.wasm").write_bytes(b"not wasm")
    result = wasinn(str(tmp_path / "junk.wasm"), cache=tmp_path)
    assert result.returncode == EXIT_USAGE and "wasinn:" in result.stderr


def test_missing_model_file_is_not_found_and_host_starts(probe: str, tmp_path: Path) -> None:
    result = wasinn("--nn-preload", f"ghost:onnx:cpu:{tmp_path}/nope.onnx", probe, "nn-name",
                    "ghost", cache=tmp_path)
    assert result.returncode == 0
    assert result.stdout.splitlines() == ["errno 8"]


def test_module_cache_skips_compilation(probe: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert wasinn(probe, "exit", "0", cache=cache).returncode == 0
    artifacts = list(cache.glob("*.cwasm"))
    assert len(artifacts) == 1
    stamp = artifacts[0].stat().st_mtime_ns
    assert wasinn(probe, "exit", "0", cache=cache).returncode == 0
    assert [p.stat().st_mtime_ns for p in cache.glob("*.cwasm")] == [stamp]


def test_parse_size() -> None:
    assert parse_size("512") == 512
    assert parse_size("4K") == 4096
    assert parse_size("64M") == 64 << 20
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("1.5g") == 3 << 29
