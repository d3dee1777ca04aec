"""Guests as HTTP handlers, WAGI-style: each request runs a fresh instance of a WASI command,
the body on its stdin, the request in CGI variables, and CGI headers + body on its stdout.

    route = WagiRoute(host, "edge_classify.wasm", route="/classify", timeout=10)
    response = route.handle(WagiRequest(method="POST", path="/classify", body=ppm))

`handle` runs in the calling thread (a bench calls it directly); the server goes through
`respond`, which runs it on a bounded `WagiPool` and answers 503 when the pool is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import wasmtime
from wasmtime import _ffi

from .. import __version__
from ..abi._raw import store_key
from .._native import NativeWasi, RouteRequest, pack
from ..host import (FAR_DEADLINE, HeldCallbacks, Host, Preopen, _set_input, _set_output,
                    deadline_ticks)
from ..preinit import PreinitError, has_start

log = logging.getLogger("wasinn.server")

#: what a route's guest may run for, and write, unless told otherwise
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_OUTPUT = 64 << 20
DEFAULT_WORKERS = 4
#: instances each route keeps made ahead (each holds a pooled instance slot)
DEFAULT_AHEAD = 1
_STDERR_KEPT = 4096  # of the guest's stderr, for the log and the 500's reason
_STDERR_ROOM = 1 << 20  # stderr written to a file: writes past this fail
#: stdout written to a file has this room past its limit, so that a write that passes the
#: limit succeeds and is seen (a single write larger than this fails: the guest sees EPERM)
_OVERFLOW_ROOM = 64 << 20
_HEADER = re.compile(r"^([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*$")

T = TypeVar("T")


@dataclass(frozen=True)
class WagiRequest:
    """One HTTP request, as a route's guest sees it. `path` is the URL's path (decoded),
    `raw_path` the same undecoded (default: `path`); `headers` keep their order and repeats."""

    method: str = "GET"
    path: str = "/"
    query: str = ""
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""
    server_name: str = "localhost"
    server_port: int = 80
    remote_addr: str = "127.0.0.1"
    protocol: str = "HTTP/1.1"
    raw_path: str | None = None


@dataclass
class WagiResponse:
    """A guest's answer (or the host's, when the guest failed: then `error` says why).
    `timings` are seconds per step of the request: setup (Store, WASI, stdin), instantiate,
    run (`_start`), and parse; and compute, the part of run spent in wasi-nn's compute (the
    inference)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def failure(cls, status: int, reason: str, **timings: float) -> WagiResponse:
        return cls(status, [("Content-Type", "text/plain; charset=utf-8")],
                   f"{reason}\n".encode(), error=reason, timings=dict(timings))


class WagiPool:
    """Threads that run guests, `workers` at once, with at most `queue` more waiting; past
    that, `submit` refuses (the server's 503) rather than queue without bound. wasmtime
    releases the GIL while guest code runs, so the workers run in parallel."""

    def __init__(self, workers: int = DEFAULT_WORKERS, queue: int | None = None) -> None:
        if workers < 1:
            raise ValueError(f"a route pool needs at least 1 worker, got {workers}")
        queue = workers if queue is None else queue
        if queue < 0:
            raise ValueError(f"a route pool's queue cannot be negative, got {queue}")
        self.workers = workers
        self.queue = queue
        self._executor = ThreadPoolExecutor(max_workers=workers,
                                            thread_name_prefix="wasinn-route")
        self._slots = threading.BoundedSemaphore(workers + queue)
        self._lock = threading.Lock()
        self._admitted = 0

    @property
    def admitted(self) -> int:
        """Requests running or waiting now."""
        return self._admitted

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T] | None:
        """Run fn(*args) on a worker; None when every worker is busy and the queue full."""
        if not self._slots.acquire(blocking=False):
            return None
        with self._lock:
            self._admitted += 1
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(lambda _: self._release())
        return future

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1
        self._slots.release()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class WagiRoute:
    """A WASI command module served at `route` (and the paths under it), WAGI-style.

    The module is compiled once (through the host's module cache) and, with `reuse_linking`,
    its imports are resolved once (an InstancePre); every request gets a new Store with its
    own wasi-nn state and WASI (argv, env, stdin, stdout), and a new instance. The host's
    named models are shared by all. `timeout` (seconds of guest time; None: none) and
    `max_memory` (bytes of linear memory; None: the host's) limit each request; `env` and
    `dirs` (preopened directories) are given to every instance. The guest may write at most
    `max_output` bytes. Turn `reuse_linking` off to link every request anew (to measure it).

    With the native path built, requests are driven from C (`_drive`), and `ahead` Stores,
    each with a fresh instance of the module, are made after responses on the route's own
    thread, for the next requests: a request then sets its WASI and wasi-nn state on one and
    runs it (no guest code runs before that: a module with a start function gets none made
    ahead). Each holds one of the host's pooled instance slots.
    """

    def __init__(self, host: Host, module: str | os.PathLike[str], *, route: str = "/",
                 timeout: float | None = DEFAULT_TIMEOUT, max_memory: int | None = None,
                 env: Mapping[str, str] | None = None, dirs: Iterable[Preopen | str] = (),
                 reuse_linking: bool = True, max_output: int = DEFAULT_MAX_OUTPUT,
                 pool: WagiPool | None = None, ahead: int = DEFAULT_AHEAD) -> None:
        if not route.startswith("/"):
            raise ValueError(f"route {route!r}: a route is a path, starting with /")
        self.host = host
        self.module_path = Path(module)
        self.route = route.rstrip("/") or "/"
        self.timeout = timeout
        self.max_memory = host.max_memory if max_memory is None else max_memory
        self.env = dict(env or {})
        self.dirs = [Preopen.parse(d) if isinstance(d, str) else d for d in dirs]
        for preopen in self.dirs:
            if not preopen.host.is_dir():
                raise ValueError(f"route {self.route}: {preopen.host} is not a directory")
        self.reuse_linking = reuse_linking
        self.max_output = max_output
        self.pool = pool
        wasm = self.module_path.read_bytes()
        self.module = host.compile(wasm)
        if not any(e.name == "_start" for e in self.module.exports):
            raise ValueError(f"{self.module_path}: not a WASI command (no _start export)")
        # a pre-initialized module's graph handles, bound again in every request's store
        self._preinit = host.preinit_record(self.module)
        if self._preinit is not None:
            missing = [b.name for b in self._preinit.graphs if b.name not in host.registry.names()]
            if missing:
                raise ValueError(f"{self.module_path} was pre-initialized with model(s) "
                                 f"{', '.join(missing)}, which this host does not offer")
        self._held = HeldCallbacks()
        self._linker = host.linker()
        # finished requests' Stores are deleted after their responses, in C, where the host's
        # native path is built (when their outputs are files: no Python runs there)
        fast = host._abi.fast
        workers = DEFAULT_WORKERS if pool is None else pool.workers
        self._reaper = None if fast is None else fast.reaper(workers)
        # each request's WASI set in one C call there (else, or if that fails, in Python),
        # its output files made ahead by the reaper's thread
        self._native_wasi = fast.wasi() if fast is not None and _FileCapture.available \
            else None
        if self._native_wasi is not None and self._reaper is not None:
            self._reaper.prepare(self._native_wasi, max_output + _OVERFLOW_ROOM, _STDERR_ROOM,
                                 min(8, workers))
        self._argv = pack([self.module_path.name])
        self._env_names = frozenset(self.env)
        self._env_packed = pack([p for pair in self.env.items() for p in pair]) if self.env \
            else b""
        self._dirs = pack([part for d in self.dirs for part in (str(d.host), d.guest)])
        # resolved now: a module importing what the host lacks fails at start-up, not per call
        self._pre = self._linker.instantiate_pre(self.module)
        self._ticks = -1 if timeout is None else deadline_ticks(timeout)
        host._start_native()
        self._ticker = host._ticker._native
        self.ahead = 0
        self._driven = False  # requests driven from C
        if reuse_linking and self._reaper is not None and self._native_wasi is not None \
                and self._ticker is not None:
            count = 0 if has_start(wasm) else min(max(ahead, 0), 8)
            self._driven = self._reaper.instances(host.engine, self._pre, self.max_memory,
                                                  FAR_DEADLINE, count)
            self.ahead = count if self._driven else 0

    def __repr__(self) -> str:
        return f"WagiRoute({self.route!r} -> {str(self.module_path)!r})"

    def close(self, timeout: float = 1.0) -> None:
        """Wait (at most `timeout` s) until wasmtime has let go of the last requests' output
        callbacks. It drops them on its own I/O threads a moment after a request ends; one
        dropped while the interpreter exits aborts the process, so call this before exiting."""
        if self._reaper is not None:
            self._reaper.close()
        self._held.wait(timeout)

    def settle(self) -> None:
        """Wait until the Stores of finished requests are deleted and the next requests'
        output files made (a bench's idle moment)."""
        if self._reaper is not None:
            self._reaper.settle()

    def matches(self, path: str) -> bool:
        return self.route == "/" or path == self.route or path.startswith(self.route + "/")

    # --- one request ------------------------------------------------------------------------

    async def respond(self, request: WagiRequest) -> WagiResponse:
        """`handle` on the route's pool (503 when it is full), or on a thread of its own."""
        if self.pool is None:
            return await asyncio.to_thread(self.handle, request)
        future = self.pool.submit(self.handle, request)
        if future is None:
            response = WagiResponse.failure(
                503, f"{self.route}: all {self.pool.workers} workers are busy and "
                     f"{self.pool.queue} requests wait; try again")
            response.headers.append(("Retry-After", "1"))
            return response
        return await asyncio.wrap_future(future)

    def handle(self, request: WagiRequest) -> WagiResponse:
        """Run a fresh instance on `request`, in this thread. A guest that fails (traps, exits
        non-zero, runs past its deadline, writes no valid headers) is a 500, or a 504 past
        the deadline, whose body says why; nothing here raises for what a guest does."""
        if self._driven:
            response = self._drive(request)
            if response is not None:
                return response
        start = time.perf_counter()
        host = self.host
        store = wasmtime.Store(host.engine)
        outputs = self._native_outputs(store, request)
        if outputs is None:
            stdout = self._capture(self.max_output)
            stderr = self._capture(_STDERR_KEPT, keep_tail=True)
        else:
            stdout, stderr = outputs
        state = None
        # every answer is made while the Store lives: a file capture's length is read from
        # wasmtime's descriptor of it, which goes with the Store
        try:
            if outputs is None:
                store.set_wasi(self._wasi(request, stdout, stderr))
            state = host.add_to_store(store, preinit=self._preinit)
            if self.max_memory != host.max_memory:  # add_to_store set the host's
                store.set_limits(memory_size=self.max_memory)
            setup = time.perf_counter()
            with host._ticker.deadline(store, self.timeout):
                instance = self._instantiate(store)
                ready = time.perf_counter()
                code = _run_start(instance, store)
            ran = time.perf_counter()
            return self._answer(stdout, stderr, code, start, {
                "setup": setup - start, "instantiate": ready - setup, "run": ran - ready,
                "compute": state.compute_s})
        except wasmtime.Trap as e:
            timings = {"total": time.perf_counter() - start}
            if e.trap_code == wasmtime.TrapCode.INTERRUPT:
                return self._failed(504, f"the guest ran past its {self.timeout:g} s deadline",
                                    stderr, timings)
            return self._failed(500, f"the guest trapped: {_cause(str(e))}", stderr,
                                timings)
        except PreinitError as e:  # a snapshot's model that could not load
            return self._failed(500, f"the guest could not start: {e}", stderr,
                                {"total": time.perf_counter() - start})
        except wasmtime.WasmtimeError as e:  # e.g. instantiation over the memory limit
            return self._failed(500, f"the guest could not start: {_cause(str(e))}",
                                stderr, {"total": time.perf_counter() - start})
        except OSError as e:  # its output files could not be set up
            return self._failed(500, f"the guest could not start: {e}", stderr,
                                {"total": time.perf_counter() - start})
        finally:
            if state is not None:
                host._forget(store_key(store), state)
            # deleting the Store (its memory zeroed or unmapped) cost 0.1-0.3 ms: after the
            # response, by the reaper, when no Python callback is attached to it
            if self._reaper is not None and isinstance(stdout, _FileCapture) \
                    and isinstance(stderr, _FileCapture):
                self._reaper.drop(store)

    def _drive(self, request: WagiRequest) -> WagiResponse | None:
        """`handle` driven from C: a Store (made ahead, with its instance, where one is
        ready) and its WASI in one call, the guest run in another; None where the first
        failed (e.g. out of descriptors: the Python steps then run, and report what fails)."""
        start = time.perf_counter()
        host, reaper, native = self.host, self._reaper, self._native_wasi
        if native is None:  # turned off: the Python steps
            return None
        assert reaper is not None and self._ticker is not None
        run = reaper.begin(native, *self._native_wasi_args(request))
        if run is None:
            return None
        key = run.context
        state = None
        try:
            state = host._attach(key, self._preinit)
            setup = time.perf_counter()
            reaper.run(self._ticker, run, self._ticks)
            if run.outcome == RouteRequest.NO_INSTANCE and not run.trap:
                # the host's pooled slots may all be held by Stores waiting for the reaper
                run.take_error()
                reaper.settle()
                reaper.run(self._ticker, run, self._ticks)
            ran = time.perf_counter()
            instantiate = run.instantiate_ns / 1e9
            timings = {"setup": setup - start, "instantiate": instantiate,
                       "run": ran - setup - instantiate, "compute": state.compute_s}
            if run.outcome == RouteRequest.RAN and run.exit_code == 0 \
                    and 0 <= run.out_len <= self.max_output:  # the usual answer, read at once
                with contextlib.suppress(ValueError):  # else answered below, with the reason
                    return self._parsed(os.pread(run.fds[0], run.out_len, 0), start, ran,
                                        timings)
            stdout = _FileCapture.known(run.fds[0], run.out_len, self.max_output, False)
            stderr = _FileCapture.known(run.fds[2], run.err_len, _STDERR_KEPT, True)
            if run.outcome == RouteRequest.RAN:
                return self._answer(stdout, stderr, run.exit_code, start, timings)
            timings["total"] = ran - start
            return self._failed(*self._why(run), stderr, timings)
        except PreinitError as e:  # a snapshot's model that could not load
            return WagiResponse.failure(500, f"the guest could not start: {e}",
                                        total=time.perf_counter() - start)
        finally:
            if state is not None:
                host._forget(key, state)
            reaper.end(run)

    def _why(self, run: RouteRequest) -> tuple[int, str]:
        """The status and reason of a driven request whose guest did not run to its end."""
        error = run.take_error()
        if isinstance(error, wasmtime.Trap):  # in _start, or in a start function
            if error.trap_code == wasmtime.TrapCode.INTERRUPT:
                return 504, f"the guest ran past its {self.timeout:g} s deadline"
            return 500, f"the guest trapped: {_cause(str(error))}"
        if run.outcome == RouteRequest.NO_START:
            return 500, "the guest could not start: the instance has no _start function"
        if run.outcome == RouteRequest.NO_TICKER:
            return 500, "the guest could not start: no thread could count its deadline"
        return 500, f"the guest could not start: {_cause(str(error))}"

    def _instantiate(self, store: wasmtime.Store) -> wasmtime.Instance:
        def instantiate() -> wasmtime.Instance:
            return (self._pre.instantiate(store) if self.reuse_linking
                    else self._linker.instantiate(store, self.module))

        try:
            return instantiate()
        except wasmtime.WasmtimeError:
            if self._reaper is None:
                raise
            # the host's pooled slots may all be held by Stores waiting for the reaper
            self._reaper.settle()
            return instantiate()

    def _answer(self, stdout: Captured, stderr: Captured, code: int, start: float,
                timings: dict[str, float]) -> WagiResponse:
        """The response of a guest that ran to its end."""
        ran = time.perf_counter()
        stdout.finish()
        if stdout.overflowed:
            return self._failed(500, f"the guest wrote more than {self.max_output} bytes",
                                stderr, timings)
        if code != 0:
            return self._failed(500, f"the guest exited with status {code}", stderr, timings)
        try:
            return self._parsed(stdout.data(), start, ran, timings)
        except ValueError as e:
            return self._failed(500, f"the guest's output is not a CGI response: {e}", stderr,
                                timings)

    @staticmethod
    def _parsed(output: bytes, start: float, ran: float,
                timings: dict[str, float]) -> WagiResponse:
        """The guest's CGI answer (ValueError if it is not one), with the request's timings."""
        response = parse_cgi(output)
        timings["parse"] = time.perf_counter() - ran
        timings["total"] = time.perf_counter() - start
        response.timings = timings
        return response

    def _capture(self, limit: int, keep_tail: bool = False) -> Captured:
        """An in-memory file where Linux offers one (wasmtime writes it as it writes a file),
        else a Python callback per write."""
        if _FileCapture.available:
            try:
                return _FileCapture(limit, keep_tail,
                                    _STDERR_ROOM if keep_tail else limit + _OVERFLOW_ROOM)
            except OSError as e:  # e.g. out of descriptors: this request goes the slow way
                log.warning("%s: no in-memory file for the guest's output: %s", self.route, e)
        return _Capture(self._held, limit, keep_tail)

    def _failed(self, status: int, reason: str, stderr: Captured,
                timings: dict[str, float]) -> WagiResponse:
        stderr.finish()  # read only when it is needed: it costs a file read
        said = _last_line(stderr.data())
        log.warning("%s: %s%s", self.route, reason, f" (stderr: {said})" if said else "")
        if said:
            reason = f"{reason}; its last words: {said[:200]}"
        response = WagiResponse.failure(status, reason)
        response.timings = timings
        return response

    def _native_outputs(self, store: wasmtime.Store, request: WagiRequest
                        ) -> tuple[_FileCapture, _FileCapture] | None:
        """The request's WASI set on `store` in C, and its stdout and stderr files; None
        where that is not built, or failed (then nothing is set)."""
        native = self._native_wasi
        if native is None:
            return None
        fds = native.set(store, *self._native_wasi_args(request), self._reaper)
        if fds is None:
            return None
        return (_FileCapture.adopt(fds[0], fds[1], self.max_output, False, native),
                _FileCapture.adopt(fds[2], fds[3], _STDERR_KEPT, True, native))

    def _wasi(self, request: WagiRequest, stdout: Captured,
              stderr: Captured) -> wasmtime.WasiConfig:
        wasi = wasmtime.WasiConfig()
        wasi.argv = [self.module_path.name]
        wasi.env = list(self._environ(request).items())
        _set_input(wasi, request.body)
        stdout.attach(wasi, "stdout")
        stderr.attach(wasi, "stderr")
        for preopen in self.dirs:
            wasi.preopen_dir(str(preopen.host), preopen.guest)
        return wasi

    def _native_wasi_args(self, request: WagiRequest
                          ) -> tuple[bytes, int, bytes, int, bytes, bytes, int, int, int]:
        """What `NativeWasi.set` and `Reaper.begin` take after the store: argv, the
        environment, stdin, the preopened directories (each packed, with its count) and the
        rooms of the output files."""
        env, envc = self._packed_environ(request)
        body = request.body if isinstance(request.body, bytes) else bytes(request.body)
        return (self._argv, 1, env, envc, body, self._dirs, len(self.dirs),
                self.max_output + _OVERFLOW_ROOM, _STDERR_ROOM)

    def _environ(self, request: WagiRequest) -> dict[str, str]:
        """The guest's environment: the route's, then the request's CGI variables."""
        return {**self.env, **self.cgi_env(request)}

    def _packed_environ(self, request: WagiRequest) -> tuple[bytes, int]:
        """`_environ` packed for C (names and values alternate), and its count: the route's
        part packed once, where no CGI variable replaces one of its names."""
        cgi = self.cgi_env(request)
        if self._env_names.isdisjoint(cgi):
            return self._env_packed + pack([p for pair in cgi.items() for p in pair]), \
                len(self.env) + len(cgi)
        env = {**self.env, **cgi}
        return pack([p for pair in env.items() for p in pair]), len(env)

    def cgi_env(self, request: WagiRequest) -> dict[str, str]:
        """The CGI/1.1 variables of `request` (WAGI's set): the route is SCRIPT_NAME, the
        rest of the path PATH_INFO, each header HTTP_NAME (dashes as underscores)."""
        script = "" if self.route == "/" else self.route
        path_info = request.path[len(script):]
        raw = request.raw_path if request.raw_path is not None else request.path
        raw_info = raw[len(script):] if raw.startswith(script) else path_info
        headers = {k.lower(): v for k, v in request.headers}
        env = {
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_SOFTWARE": f"wasinn/{__version__}",
            "SERVER_PROTOCOL": request.protocol,
            "SERVER_NAME": request.server_name,
            "SERVER_PORT": str(request.server_port),
            "REQUEST_METHOD": request.method,
            "SCRIPT_NAME": script,
            "PATH_INFO": path_info,
            "PATH_TRANSLATED": path_info,
            "X_RAW_PATH_INFO": raw_info,
            "X_MATCHED_ROUTE": f"{script}/...",
            "QUERY_STRING": request.query,
            "REMOTE_ADDR": request.remote_addr,
            "REMOTE_HOST": request.remote_addr,
            "CONTENT_TYPE": headers.get("content-type", ""),
            "CONTENT_LENGTH": str(len(request.body)),
            "X_FULL_URL": (f"http://{headers.get('host', request.server_name)}{raw}"
                           + (f"?{request.query}" if request.query else "")),
        }
        for name, value in request.headers:
            key = "HTTP_" + name.upper().replace("-", "_")
            if key in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
                continue  # CGI gives these without the prefix
            env[key] = f"{env[key]}, {value}" if key in env else value
        return env


def parse_cgi(output: bytes) -> WagiResponse:
    """A CGI response: header lines (`Name: value`, LF or CRLF), a blank line, the body.
    `Status: 404 Not Found` sets the status (default 200, or 302 with a Location); a
    response needs a Content-Type or a Location. Raises ValueError saying what is wrong."""
    end = len(output)
    for separator in (b"\r\n\r\n", b"\n\n"):
        at = output.find(separator)
        if at >= 0 and at < end:
            end, body_at = at, at + len(separator)
    if end == len(output):
        if not output:
            raise ValueError("it wrote nothing")
        raise ValueError("no blank line ends its headers")
    try:
        head = output[:end].decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        raise ValueError("its headers are not text") from None
    status: int | None = None
    headers: list[tuple[str, str]] = []
    for line in head.replace("\r\n", "\n").split("\n"):
        match = _HEADER.match(line)
        if not match:
            raise ValueError(f"not a header line: {line[:80]!r}")
        name, value = match[1], match[2]
        if name.lower() == "status":
            code = value.split(" ", 1)[0]
            if not (code.isdigit() and len(code) == 3 and 100 <= int(code) <= 599):
                raise ValueError(f"not a status: {value[:80]!r}")
            status = int(code)
        else:
            headers.append((name, value))
    names = {name.lower() for name, _ in headers}
    if "content-type" not in names and "location" not in names:
        raise ValueError("it gave neither a Content-Type nor a Location")
    if status is None:
        status = 302 if "location" in names else 200
    return WagiResponse(status, headers, output[body_at:])


_START = ctypes.create_string_buffer(b"_start", 6)


def _run_start(instance: wasmtime.Instance, store: wasmtime.Store) -> int:
    """Call the instance's `_start` through wasmtime's C API: wasmtime-py's call would first
    wrap every export of the instance and ask the function's type (0.05-0.1 ms a request)."""
    context = store._context()
    start = _ffi.wasmtime_extern_t()
    if not _ffi.wasmtime_instance_export_get(context, ctypes.byref(instance._instance), _START,
                                             len(_START), ctypes.byref(start)) \
            or start.kind != _ffi.WASMTIME_EXTERN_FUNC.value:  # checked when the route was made
        raise wasmtime.WasmtimeError("the instance has no _start function")
    trap = ctypes.POINTER(_ffi.wasm_trap_t)()
    error = _ffi.wasmtime_func_call(context, ctypes.byref(start.of.func), None, 0, None, 0,
                                    ctypes.byref(trap))
    if error:
        raised = wasmtime.WasmtimeError._from_ptr(error)
        if isinstance(raised, wasmtime.ExitTrap):
            return raised.code
        raise raised
    if trap:
        raise wasmtime.Trap._from_ptr(trap)
    return 0


class _Capture:
    """A guest's output stream, kept in memory up to `limit` bytes: past it, writes fail
    (the guest sees EIO) and `overflowed` says so; or, with `keep_tail`, only the last
    `limit` bytes are kept. Its callback is counted in `held` until wasmtime drops it."""

    def __init__(self, held: HeldCallbacks, limit: int, keep_tail: bool = False) -> None:
        self._held = held
        self._parts: list[bytes] = []
        self._size = 0
        self._limit = limit
        self._keep_tail = keep_tail
        self.overflowed = False

    def write(self, data: bytes) -> int:
        if self._keep_tail:
            self._parts = [b"".join(self._parts) + data]
            self._parts[0] = self._parts[0][-self._limit:]
            return len(data)
        if self._size + len(data) > self._limit:
            self.overflowed = True
            return -5  # -EIO
        self._parts.append(data)
        self._size += len(data)
        return len(data)

    def attach(self, wasi: wasmtime.WasiConfig, stream: str) -> None:
        _set_output(wasi, stream, self.write, self._held)

    def finish(self) -> None:
        """Nothing to read: each write came here."""

    def data(self) -> bytes:
        return b"".join(self._parts)


class _FileCapture:
    """A guest's stdout or stderr as a sealed in-memory file (a Linux memfd).

    wasmtime writes a file with write(2) on the guest's own thread; its C API's custom output
    streams go through its async runtime instead, and two of them cost 0.7-1 ms a request,
    written to or not (measured on the edge classifier). The file is sized, sparse, to `room`
    bytes (stdout: 64 MiB past `limit`, so that passing `limit` is seen) and sealed against
    growth: a write that would pass that fails (the guest sees EPERM). What the guest wrote is
    the offset of wasmtime's own descriptor of the file (it reopens the file by its /proc
    path), read with lseek in `finish` while that descriptor is open. Past `limit`, `overflowed` says so
    (stdout: the server's 500), or, with `keep_tail`, only the last `limit` bytes are kept
    (stderr)."""

    available = (hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")
                 and os.path.isdir("/proc/self/fd"))
    _SEALS = getattr(fcntl, "F_SEAL_GROW", 0) | getattr(fcntl, "F_SEAL_SHRINK", 0) \
        | getattr(fcntl, "F_SEAL_SEAL", 0)

    def __init__(self, limit: int, keep_tail: bool, room: int) -> None:
        self._limit = limit
        self._keep_tail = keep_tail
        self._room = room
        self._fd = -1
        self._fd = os.memfd_create("wasinn-output", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self._ino = os.fstat(self._fd).st_ino
        self._theirs = -1
        self._length = 0
        self._native: NativeWasi | None = None
        self._owned = True  # its descriptor is closed with it

    @classmethod
    def known(cls, fd: int, length: int, limit: int, keep_tail: bool) -> _FileCapture:
        """A file whose length is known already, `fd` not its to close (read it before the
        owner closes it)."""
        capture = cls.__new__(cls)
        capture._fd = fd
        capture._owned = False
        capture._limit = limit
        capture._keep_tail = keep_tail
        capture._theirs = -1
        capture._length = max(0, length)
        return capture

    @classmethod
    def adopt(cls, fd: int, theirs: int, limit: int, keep_tail: bool,
              native: NativeWasi) -> _FileCapture:
        """The file `NativeWasi.set` made and had wasmtime open (as `theirs`), sized and
        sealed as `attach` does; its length is read in C too."""
        capture = cls.__new__(cls)
        capture._fd = fd
        capture._limit = limit
        capture._keep_tail = keep_tail
        capture._room = 0  # made already
        capture._ino = -1
        capture._theirs = theirs
        capture._length = 0
        capture._native = native
        capture._owned = True
        return capture

    def attach(self, wasi: wasmtime.WasiConfig, stream: str) -> None:
        # wasmtime opens the path now, at the lowest free descriptor: most likely this one
        probe = os.dup(self._fd)
        os.close(probe)
        setattr(wasi, f"{stream}_file", f"/proc/self/fd/{self._fd}")
        self._theirs = probe if self._names_file(probe) else self._find_theirs()
        os.ftruncate(self._fd, self._room)  # after wasmtime's open, which truncates
        fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, self._SEALS)

    def _names_file(self, fd: int) -> bool:
        try:
            return fd != self._fd and os.fstat(fd).st_ino == self._ino
        except OSError:
            return False

    def _find_theirs(self) -> int:
        """Another thread took the probed number first: look for the descriptor."""
        for name in os.listdir("/proc/self/fd"):
            if self._names_file(int(name)):
                return int(name)
        raise OSError("wasmtime did not open the guest's output file")

    def finish(self) -> None:
        """How far the guest wrote: call before its Store goes (that closes wasmtime's
        descriptor); reading the file keeps working after."""
        if self._theirs < 0:
            return
        theirs, self._theirs = self._theirs, -1
        if self._native is not None:
            self._length = max(0, self._native.written(self._fd, theirs))
            return
        try:
            # its offset: lseek moves nothing (reading /proc/self/fdinfo cost 3 calls)
            if self._names_file(theirs):
                self._length = os.lseek(theirs, 0, os.SEEK_CUR)
        except OSError:
            pass  # never attached to a store that ran: nothing written

    @property
    def overflowed(self) -> bool:
        return not self._keep_tail and self._length > self._limit

    def data(self) -> bytes:
        size = min(self._length, self._limit)
        start = self._length - size if self._keep_tail else 0
        return os.pread(self._fd, size, start)

    def __del__(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1  # -1: __init__ failed before it had one
        if fd >= 0 and getattr(self, "_owned", True):
            os.close(fd)


#: a guest's captured stdout or stderr: an in-memory file, or Python callbacks
Captured = _FileCapture | _Capture


def _cause(text: str) -> str:
    """wasmtime's messages end with the cause, after a backtrace."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


def _last_line(data: bytes) -> str:
    lines = data.decode("utf-8", "replace").strip().splitlines()
    return lines[-1].strip() if lines else ""


def parse_route(text: str) -> tuple[str, Path]:
    """`/PATH=MODULE.wasm` (the --route syntax) as (path, module)."""
    path, sep, module = text.partition("=")
    if not sep or not path.startswith("/") or not module:
        raise ValueError(f"--route {text!r}: expected /PATH=MODULE.wasm")
    return path, Path(module).expanduser()



#: methods a route answers (the guest decides what each means)
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
#: bigger request bodies are refused (413) before a guest runs
DEFAULT_MAX_BODY = 64 << 20
#: headers the server sets itself, whatever the guest wrote
_SERVER_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})


def mount(app: Any, route: WagiRoute, max_body: int = DEFAULT_MAX_BODY) -> None:
    """Serve `route` on a Starlette/FastAPI `app`: its path and every path under it."""
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response

    async def endpoint(request: Request) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                return PlainTextResponse(f"the body is over {max_body} bytes\n", 413)
        scope = request.scope
        server = scope.get("server") or ("localhost", 80)
        raw_path = scope.get("raw_path")
        answer = await route.respond(WagiRequest(
            method=request.method, path=scope["path"], query=scope["query_string"].decode(
                "latin-1"),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
            body=bytes(body), server_name=str(server[0]), server_port=int(server[1] or 0),
            remote_addr=request.client.host if request.client else "",
            protocol=f"HTTP/{scope.get('http_version', '1.1')}",
            raw_path=raw_path.decode("latin-1") if raw_path else None))
        response = Response(b"" if request.method == "HEAD" else answer.body,
                            status_code=answer.status)
        response.raw_headers.extend((k.lower().encode("latin-1"), v.encode("latin-1"))
                                    for k, v in answer.headers
                                    if k.lower() not in _SERVER_HEADERS)
        return response

    base = "" if route.route == "/" else route.route
    for path in (route.route, f"{base}/{{rest:path}}"):
        app.add_route(path, endpoint, methods=list(METHODS), include_in_schema=False)
