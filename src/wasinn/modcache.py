"""Compiled modules cached on disk, so a module's second run skips compilation."""

from __future__ import annotations

import hashlib
import os
import tempfile
from importlib.metadata import version
from pathlib import Path

import wasmtime


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wasinn" / "modules"


class ModuleCache:
    """Maps a module's bytes to its compiled artifact. The key covers the wasmtime version, so
    an upgrade recompiles rather than loading an artifact built for another engine."""

    def __init__(self, engine: wasmtime.Engine, directory: Path | None = None,
                 enabled: bool = True) -> None:
        self.engine = engine
        self.directory = directory or default_cache_dir()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0
        self._salt = f"wasmtime-py {version('wasmtime')} epoch".encode()

    def key(self, wasm: bytes) -> str:
        return hashlib.sha256(self._salt + b"\0" + wasm).hexdigest()

    def load(self, module: str | os.PathLike[str] | bytes) -> wasmtime.Module:
        wasm = module if isinstance(module, bytes) else Path(module).read_bytes()
        if not self.enabled:
            return wasmtime.Module(self.engine, wasm)
        path = self.directory / f"{self.key(wasm)}.cwasm"
        if path.is_file():
            try:
                compiled = wasmtime.Module.deserialize_file(self.engine, str(path))
            except wasmtime.WasmtimeError:
                path.unlink(missing_ok=True)  # unreadable artifact: compile afresh
            else:
                self.hits += 1
                return compiled
        self.misses += 1
        compiled = wasmtime.Module(self.engine, wasm)
        self._store(path, compiled.serialize())
        return compiled

    def _store(self, path: Path, artifact: bytearray) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(artifact)
            os.replace(tmp, path)  # atomic: a reader never sees half an artifact
        except OSError:
            pass  # a read-only cache only costs the next run a compile
