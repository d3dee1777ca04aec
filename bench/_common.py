"""What the benchmarks share: the repository's paths, its non-package scripts, its guests, and
the guest-vs-direct method of overhead.py and backends.py (GuestRunner over guests/bench.c,
warm-up then alternating rounds, medians)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import wasmtime

import wasinn
from wasinn.host import Host
from wasinn.tensor import TensorType

ROOT = Path(__file__).resolve().parent.parent
GUESTS_OUT = ROOT / "build" / "guests"
MODELS_OUT = ROOT / "build" / "bench"
EXAMPLE_OUT = ROOT / "build" / "example"
CLASSIFIER_DIR = EXAMPLE_OUT / "efficientnet-lite0"
CLASSIFIER = CLASSIFIER_DIR / "model.onnx"
IMAGE = EXAMPLE_OUT / "chelsea.ppm"


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


def build_bench_guest() -> Path:
    return build_guests(["bench"])["bench"]


def run_example_script(script: str, *needed: Path) -> None:
    """examples/classify/SCRIPT into build/example, unless every needed file is there (the
    scripts skip what exists)."""
    if all(path.exists() for path in needed):
        return
    cmd = [sys.executable, str(ROOT / "examples" / "classify" / script), str(EXAMPLE_OUT)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n"
                         f"{proc.stdout}{proc.stderr}")


def prepare_classifier(*needed: Path) -> None:
    """examples/classify/prepare.py: the ONNX classifier, its TorchScript twin, the photo."""
    run_example_script("prepare.py", CLASSIFIER, IMAGE, *needed)


def classifier_input() -> np.ndarray:
    reference = load_script("wasinn_bench_reference", ROOT / "examples" / "classify" / "reference.py")
    array: np.ndarray = reference.preprocess(IMAGE)
    return array


# --- the two sides ---------------------------------------------------------------------------


#: runs n inferences and answers the seconds they took
Side = Callable[[int], float]


class GuestRunner:
    """One instance of guests/bench.c with its context set up and its input in its memory."""

    def __init__(self, host: Host, module: wasmtime.Module, model: str, array: np.ndarray,
                 output_bytes: int) -> None:
        self.store = wasmtime.Store(host.engine)
        self.state = host.add_to_store(self.store)
        instance = host.linker(wasi=False).instantiate(self.store, module)
        exports = instance.exports(self.store)

        def func(name: str) -> wasmtime.Func:
            found = exports[name]
            assert isinstance(found, wasmtime.Func), name
            return found

        memory = exports["memory"]
        assert isinstance(memory, wasmtime.Memory)
        self.memory = memory
        func("_initialize")(self.store)
        alloc = func("bench_alloc")
        name = model.encode()
        dims = np.asarray(array.shape, dtype="<u4").tobytes()
        data = np.ascontiguousarray(array).tobytes()
        name_ptr = self._put(alloc, name)
        dims_ptr = self._put(alloc, dims)
        in_ptr = self._put(alloc, data)
        self.out_ptr = self._alloc(alloc, output_bytes)
        self.output_bytes = output_bytes
        self._check(func("bench_setup")(self.store, name_ptr, len(name)), "bench_setup")
        self._run = func("bench_run")
        tensor_type = int(TensorType.from_dtype(array.dtype))
        self._args = (in_ptr, len(data), dims_ptr, len(array.shape), tensor_type, self.out_ptr,
                      output_bytes)

    def _alloc(self, alloc: wasmtime.Func, size: int) -> int:
        ptr = alloc(self.store, size)
        assert isinstance(ptr, int)
        if ptr == 0:
            raise MemoryError(f"bench_alloc({size}) failed in the guest")
        return ptr

    def _put(self, alloc: wasmtime.Func, data: bytes) -> int:
        ptr = self._alloc(alloc, max(len(data), 1))
        self.memory.write(self.store, data, ptr)
        return ptr

    def _check(self, errno: object, what: str) -> None:
        if errno != 0:
            raise RuntimeError(f"guest {what} answered errno {errno}: {self.state.last_error}")

    def __call__(self, n: int) -> float:
        run, store, args = self._run, self.store, self._args
        start = time.perf_counter()
        errno = run(store, n, *args)
        elapsed = time.perf_counter() - start
        self._check(errno, "bench_run")
        return elapsed

    def output(self) -> bytes:
        return bytes(self.memory.read(self.store, self.out_ptr, self.out_ptr + self.output_bytes))


def timed_loop(infer: Callable[[], object]) -> Side:
    """A direct side: n calls of `infer` back to back."""

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            infer()
        return time.perf_counter() - start

    return run


# --- measuring -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    model: str
    input: str  # e.g. f32[1,16]
    iters: int
    direct: list[float]  # seconds per inference, one per round
    guest: list[float]

    @property
    def direct_s(self) -> float:
        return statistics.median(self.direct)

    @property
    def guest_s(self) -> float:
        return statistics.median(self.guest)

    @property
    def ratio(self) -> float:
        return self.guest_s / self.direct_s

    @property
    def fixed_us(self) -> float:
        return (self.guest_s - self.direct_s) * 1e6

    @property
    def noise_us(self) -> float:
        """Half the interquartile range of the per-round differences guest - direct."""
        diffs = [g - d for g, d in zip(self.guest, self.direct)]
        if len(diffs) < 4:
            return float("nan")
        q1, _, q3 = statistics.quantiles(diffs, n=4)
        return (q3 - q1) / 2 * 1e6


def measure(model: str, input_label: str, direct: Side, guest: Side, iters: int,
            rounds: int, warmup: int) -> Result:
    """Warm both sides up, then alternate them round by round (A B, B A, ...)."""
    for _ in range(warmup):
        direct(iters)
        guest(iters)
    direct_times: list[float] = []
    guest_times: list[float] = []
    for r in range(rounds):
        if r % 2 == 0:
            d = direct(iters)
            g = guest(iters)
        else:
            g = guest(iters)
            d = direct(iters)
        direct_times.append(d / iters)
        guest_times.append(g / iters)
    return Result(model, input_label, iters, direct_times, guest_times)


# --- report ----------------------------------------------------------------------------------


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f}"


def describe(array: np.ndarray) -> str:
    kind = TensorType.from_dtype(array.dtype).name.lower()
    return f"{kind}[{','.join(map(str, array.shape))}]"


def print_table(rows: Sequence[Sequence[str]], left: int) -> None:
    """Rows of cells (the first is the header), the first `left` columns left-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(w) if i < left else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(row, widths))]
        print("  " + "  ".join(cells))


# --- a server on loopback and a lean client for it ---------------------------------------


class Server:
    """`python -m wasinn serve --host 127.0.0.1 --port 0 ARGS...` (this very wasinn) in a
    subprocess; `port` once it listens."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        env = dict(os.environ if env is None else env)
        source = str(Path(wasinn.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "wasinn", "serve", "--host", "127.0.0.1", "--port", "0",
               *args]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.log: deque[str] = deque(maxlen=40)
        self._port: int | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(120) or self._port is None:
            self.stop()
            raise SystemExit("wasinn serve did not start:\n" + "".join(self.log))
        self.port = self._port

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if found:
                self._port = int(found.group(1))
                self._ready.set()
        self._ready.set()  # it ended

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn shuts down, the store closes
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class HttpConnection:
    """One HTTP/1.1 keep-alive connection, one request at a time: about the least a client
    can cost (asyncio streams set TCP_NODELAY; headers and body go in one write)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 host: str) -> None:
        self._reader = reader
        self._writer = writer
        self._host = host.encode()

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, f"{host}:{port}")

    async def post(self, path: str, body: bytes | str,
                   content_type: str = "application/json") -> tuple[int, dict[str, str], bytes]:
        raw = body.encode() if isinstance(body, str) else body
        self._writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: %s\r\n"
                           b"Content-Length: %d\r\n\r\n%s"
                           % (path.encode(), self._host, content_type.encode(), len(raw), raw))
        head = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        if "content-length" not in headers:
            raise RuntimeError(f"an answer without Content-Length ({head[0]})")
        return status, headers, await self._reader.readexactly(int(headers["content-length"]))

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()
