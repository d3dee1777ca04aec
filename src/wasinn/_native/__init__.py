"""An optional native repeat path for set_input and get_output (see fastpath.c for why).

fastpath.c is compiled for this machine with the `ziglang` wheel's `zig cc` on first use and
kept in ~/.cache/wasinn/native, keyed by the source's hash. Without zig (or if the build
fails) `FastPath.create()` answers None and the Python handlers serve every call alone.
Set WASINN_NATIVE=0 to turn it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
import wasmtime
from wasmtime import _ffi as ffi

from ..modcache import default_cache_dir

log = logging.getLogger("wasinn")

SOURCE = Path(__file__).with_name("fastpath.c")
_c = ctypes.c_void_p
_u32, _u64, _i64 = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int64
#: the signature of a wasmtime unchecked host function (and of fastpath.c's handlers)
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_size_t, _c, _c, _c, ctypes.c_size_t)
_KIND_INPUT, _KIND_OUTPUT = 1, 2
#: the functions with a handler of their own in fastpath.c, by witx name (the rest: fp_call):
#: set_input, get_output and init_execution_context (claiming a reserved ready context)
#: served there when they can be, compute marking outputs computed
SERVED = {"set_input": "fp_set_input", "get_output": "fp_get_output", "compute": "fp_compute",
          "init_execution_context": "fp_init_execution_context"}
#: how fastpath.c calls a Python handler: (caller, store context, 8 x u32) -> errno
HANDLER = ctypes.CFUNCTYPE(ctypes.c_int32, _c, _c, *([_u32] * 8))
_MAX_DIMS = 32  # fastpath.c's MAX_DIMS: the size of ready_input


class ReadyInput(ctypes.Structure):
    """fastpath.c's ready_input: one input of a ready context, as its registration."""

    _fields_ = [("index", _u32), ("type", _u32), ("len", _u32), ("dims_len", _u32),
                ("dims", _u32 * _MAX_DIMS), ("host", _c)]


class ReadyOutput(ctypes.Structure):
    _fields_ = [("index", _u32), ("len", _u32), ("host", _c)]


class ReadySpec:
    """The registrations of a ready context, laid out once for every reservation of it."""

    __slots__ = ("inputs", "outputs")

    def __init__(self, inputs: Sequence[tuple[int, Sequence[int], int, int, int]],
                 outputs: Sequence[tuple[int, int, int]]) -> None:
        """inputs: (index, dims, type code, bytes, address); outputs: (index, bytes, address)."""
        self.inputs = (ReadyInput * len(inputs))()
        for slot, (index, dims, type_code, nbytes, host) in zip(self.inputs, inputs):
            if len(dims) > _MAX_DIMS:
                raise ValueError(f"more than {_MAX_DIMS} dims")
            slot.index, slot.type, slot.len, slot.dims_len = index, type_code, nbytes, len(dims)
            slot.dims[:len(dims)] = dims
            slot.host = host
        self.outputs = (ReadyOutput * len(outputs))(*outputs)


def _library_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    tag = f"{platform.system()}-{platform.machine()}".lower()
    return Path(default_cache_dir()).parent / "native" / f"fastpath-{digest}-{tag}.so"


def _build(target: Path) -> Path:
    """Compile fastpath.c for this machine (atomically: concurrent builds are harmless)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [sys.executable, "-m", "ziglang", "cc", "-shared", "-fPIC", "-O2",
               "-std=c11", "-pthread", "-o", str(out), str(SOURCE)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        os.replace(out, target)
    return target


def _load_library() -> ctypes.CDLL | None:
    if os.environ.get("WASINN_NATIVE", "1") == "0":
        return None
    if platform.system() != "Linux" or ctypes.sizeof(ffi.wasmtime_val_raw_t) != 16:
        return None
    path = _library_path()
    try:
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.debug("native fast path unavailable: %s %s", e, detail.decode(errors="replace"))
        return None
    lib.fp_new.restype = _c
    lib.fp_new.argtypes = [_c, _c, _c, _c, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t]
    lib.fp_release.argtypes = [_c]
    lib.fp_func_env.restype = _c
    lib.fp_func_env.argtypes = [_c, _c, _c, _c]
    lib.fp_put_input.restype = ctypes.c_int
    lib.fp_put_input.argtypes = [_c, _u64, _u64, _u32, _u32, _u32, ctypes.POINTER(_u32), _u32,
                                 _u32, _c]
    lib.fp_put_output.restype = ctypes.c_int
    lib.fp_put_output.argtypes = [_c, _u64, _u64, _u32, _u32, _u32, _c, _u32]
    lib.fp_drop.argtypes = [_c, _u64, _i64, _u32, _i64]
    lib.fp_reserve.restype = ctypes.c_int
    lib.fp_reserve.argtypes = [_c, _u64, _u32, _c, ctypes.c_size_t, _c, ctypes.c_size_t]
    lib.fp_settle.restype = ctypes.c_int
    lib.fp_settle.argtypes = [_c, _u64, ctypes.POINTER(_u64), ctypes.POINTER(_u64)]
    lib.fp_stats.argtypes = [_c, ctypes.POINTER(_u64), ctypes.POINTER(_u64), ctypes.POINTER(_u64)]
    lib.fp_ticker_new.restype = _c
    lib.fp_ticker_new.argtypes = [_c, _c, ctypes.c_long]
    lib.fp_ticker_enter.restype = ctypes.c_int
    lib.fp_ticker_enter.argtypes = [_c]
    lib.fp_ticker_leave.argtypes = [_c]
    lib.fp_ticker_close.argtypes = [_c]
    lib.fp_reaper_new.restype = _c
    lib.fp_reaper_new.argtypes = [_c, ctypes.c_size_t]
    lib.fp_reaper_drop.restype = ctypes.c_int
    lib.fp_reaper_drop.argtypes = [_c, _c]
    lib.fp_reaper_settle.argtypes = [_c]
    lib.fp_reaper_prepare.restype = ctypes.c_int
    lib.fp_reaper_prepare.argtypes = [_c, _c, ctypes.c_int64, ctypes.c_int64, ctypes.c_size_t]
    lib.fp_reaper_close.argtypes = [_c]
    lib.fp_reaper_instances.restype = ctypes.c_int
    lib.fp_reaper_instances.argtypes = [_c, ctypes.POINTER(_c), ctypes.c_size_t, _c, _c,
                                        ctypes.c_int64, _u64, ctypes.c_size_t,
                                        ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t]
    lib.fp_wasi_api_new.restype = _c
    lib.fp_wasi_api_new.argtypes = [ctypes.POINTER(_c), ctypes.c_size_t]
    lib.fp_wasi_api_free.argtypes = [_c]
    _size = ctypes.c_size_t
    lib.fp_wasi_set.restype = ctypes.c_int
    lib.fp_wasi_set.argtypes = [_c, _c, _c, ctypes.c_char_p, _size, _size, ctypes.c_char_p, _size,
                                _size, ctypes.c_char_p, _size, ctypes.c_char_p, _size, _size,
                                ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_int)]
    lib.fp_written.restype = ctypes.c_int64
    lib.fp_written.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.fp_route_begin.restype = ctypes.c_int
    lib.fp_route_begin.argtypes = [_c, _c, ctypes.c_char_p, _size, _size, ctypes.c_char_p,
                                   _size, _size, ctypes.c_char_p, _size, ctypes.c_char_p,
                                   _size, _size, ctypes.c_int64, ctypes.c_int64,
                                   ctypes.POINTER(RouteRequest)]
    lib.fp_route_run.restype = None
    lib.fp_route_run.argtypes = [_c, _c, ctypes.POINTER(RouteRequest), ctypes.c_int64]
    lib.fp_route_end.restype = None
    lib.fp_route_end.argtypes = [_c, ctypes.POINTER(RouteRequest)]
    return lib


def _address(name: str) -> int:
    return ctypes.cast(getattr(ffi.dll, name), _c).value or 0


class FastPath:
    """One table of registrations, shared by the functions one WitxAbi defines."""

    def __init__(self, lib: ctypes.CDLL, table: int) -> None:
        self._lib = lib
        self._table = table
        # bound once: these run on every slow set_input / compute / get_output
        self._put_input = lib.fp_put_input
        self._put_output = lib.fp_put_output
        self._drop = lib.fp_drop
        self._reserve = lib.fp_reserve
        self._settle = lib.fp_settle

    @classmethod
    def create(cls) -> FastPath | None:
        lib = _load_library()
        if lib is None:
            return None
        table = lib.fp_new(_address("wasmtime_caller_context"),
                           _address("wasmtime_caller_export_get"),
                           _address("wasmtime_memory_data"), _address("wasmtime_memory_data_size"),
                           ctypes.sizeof(ffi.wasmtime_extern_t), ffi.wasmtime_extern_t.of.offset,
                           ffi.WASMTIME_EXTERN_MEMORY.value)
        return cls(lib, table) if table else None

    def handler(self, name: str, handler: object, handler_id: int, finalize: object
                ) -> tuple[object, int, object] | None:
        """(callback, env, finalizer) for defining `name` in C: its calls (or, for set_input
        and get_output, those C cannot serve) go to `handler`, a HANDLER function pointer;
        `finalize(handler_id)` runs when wasmtime drops the function. None if out of memory."""
        env = self._lib.fp_func_env(self._table, ctypes.cast(handler, _c), handler_id,
                                    ctypes.cast(finalize, _c))
        if not env:
            return None
        symbol = SERVED.get(name, "fp_call")
        callback = ctypes.cast(getattr(self._lib, symbol), ffi.wasmtime_func_unchecked_callback_t)
        finalizer = ctypes.cast(self._lib.fp_func_env_free, ctypes.CFUNCTYPE(None, _c))
        return callback, env, finalizer

    # --- what Python registers after a checked call, and drops before the memory goes -----

    # `store` is the store context's address (what the drops name); `store_id` wasmtime's id
    # of the store, which C checks on every hit: an address can be reused by a new store
    # before the old one's registrations are dropped, an id cannot
    def put_input(self, store: int, store_id: int, ctx: int, index: int, dims: Sequence[int],
                  type_code: int, nbytes: int, host: int) -> None:
        self._put_input(self._table, store, store_id, ctx, index, len(dims),
                        (_u32 * len(dims))(*dims), type_code, nbytes, host)

    def put_output(self, store: int, store_id: int, ctx: int, index: int, nbytes: int,
                   host: int, computed: bool = True) -> None:
        """`computed=False`: armed before the context's first compute; C serves it only
        after a compute succeeds."""
        self._put_output(self._table, store, store_id, ctx, index, nbytes, host, computed)

    def drop_input(self, store: int, ctx: int, index: int) -> None:
        self._drop(self._table, store, ctx, _KIND_INPUT, index)

    def drop_output(self, store: int, ctx: int, index: int) -> None:
        self._drop(self._table, store, ctx, _KIND_OUTPUT, index)

    def drop_context(self, store: int, ctx: int) -> None:
        self._drop(self._table, store, ctx, 0, -1)

    def drop_store(self, store: int) -> None:
        self._drop(self._table, store, -1, 0, -1)

    def reserve(self, store: int, graph: int, spec: ReadySpec) -> bool:
        """The store's first init_execution_context of graph handle `graph` may be served in
        C as context 0, with `spec`'s registrations (pending until then). False if no room."""
        return bool(self._reserve(self._table, store, graph, spec.inputs, len(spec.inputs),
                                  spec.outputs, len(spec.outputs)))

    def settle(self, store: int) -> tuple[int, int, int]:
        """(1 claimed / 0 not, its registrations dropped / -1 none, the store's id, a bit
        per input index the guest has set since)."""
        store_id, mask = _u64(), _u64()
        state = self._settle(self._table, store, ctypes.byref(store_id), ctypes.byref(mask))
        return state, store_id.value, mask.value

    def stats(self) -> tuple[int, int, int]:
        """(calls served in C, calls passed to Python, registrations held now)."""
        hits, misses, entries = _u64(), _u64(), _u64()
        self._lib.fp_stats(self._table, ctypes.byref(hits), ctypes.byref(misses),
                           ctypes.byref(entries))
        return hits.value, misses.value, entries.value

    def ticker(self, engine: wasmtime.Engine, tick_s: float) -> Ticker | None:
        """A thread in C that advances `engine`'s epoch every `tick_s` while a guest runs
        under a deadline (see Ticker); None if out of memory."""
        ptr = self._lib.fp_ticker_new(_address("wasmtime_engine_increment_epoch"),
                                      ctypes.cast(engine.ptr(), _c),
                                      max(1, round(tick_s * 1e6)))
        return Ticker(self._lib, ptr, engine) if ptr else None

    def reaper(self, max_pending: int) -> Reaper | None:
        """A thread in C that deletes Stores handed to it (see Reaper); None if out of memory."""
        ptr = self._lib.fp_reaper_new(_address("wasmtime_store_delete"), max_pending)
        return Reaper(self._lib, ptr) if ptr else None

    def wasi(self) -> NativeWasi | None:
        """Sets a request's WASI on a store in one call (see NativeWasi); None if out of
        memory or this wasmtime lacks a function it needs."""
        funcs = (_c * len(_WASI_FUNCS))(*(_address(name) for name in _WASI_FUNCS))
        api = self._lib.fp_wasi_api_new(funcs, len(_WASI_FUNCS))
        return NativeWasi(self._lib, api) if api else None

    def __del__(self) -> None:
        table, self._table = self._table, 0
        if table:
            self._lib.fp_release(table)


#: the C API functions fp_reaper_instances calls, in the order of its store_api struct
_STORE_FUNCS = ("wasmtime_store_new", "wasmtime_store_context", "wasmtime_store_limiter",
                "wasmtime_context_set_epoch_deadline", "wasmtime_instance_pre_instantiate",
                "wasmtime_error_delete", "wasm_trap_delete", "wasmtime_instance_export_get",
                "wasmtime_func_call", "wasmtime_error_exit_status")


#: the C API functions fp_wasi_set calls, in the order of its wasi_api struct
_WASI_FUNCS = ("wasi_config_new", "wasi_config_delete", "wasi_config_set_argv",
               "wasi_config_set_env", "wasm_byte_vec_new", "wasi_config_set_stdin_bytes",
               "wasi_config_set_stdout_file", "wasi_config_set_stderr_file",
               "wasi_config_preopen_dir", "wasmtime_context_set_wasi", "wasmtime_error_delete")


def pack(strings: Sequence[str]) -> bytes:
    """Strings for fp_wasi_set: each UTF-8, NUL-terminated, end to end. A NUL inside one ends
    it there, as it would for any C string."""
    text = "\0".join(strings)
    if text.count("\0") != len(strings) - 1:
        text = "\0".join(s.partition("\0")[0] for s in strings)
    return text.encode() + b"\0"


class NativeWasi:
    """A route request's WASI (argv, environment, stdin's bytes, preopened directories, and
    stdout and stderr as sealed in-memory files wasmtime opened) set on a store in one C
    call: the same steps in Python cost ~0.15 ms a request after the inference's cold
    caches. Strings come packed (`pack`); environment names and values alternate."""

    def __init__(self, lib: ctypes.CDLL, api: int) -> None:
        self._lib = lib
        self._api = api
        self._set = lib.fp_wasi_set
        self.written = lib.fp_written

    def set(self, store: wasmtime.Store, argv: bytes, argc: int, env: bytes, envc: int,
            stdin: bytes, dirs: bytes, ndirs: int, stdout_room: int, stderr_room: int,
            ahead: Reaper | None = None) -> tuple[int, int, int, int] | None:
        """(stdout's file, wasmtime's descriptor of it, stderr's, wasmtime's), the first and
        third now the caller's to close; None if anything failed (nothing is left set).
        `ahead`: a reaper preparing configs for these rooms (`Reaper.prepare`): one of its
        configs, files made, is used when it has one."""
        fds = (ctypes.c_int * 4)()
        if self._set(self._api, ahead._ptr if ahead is not None else None,
                     ctypes.cast(store._context(), _c), argv, len(argv), argc, env, len(env),
                     envc, stdin, len(stdin), dirs, len(dirs), ndirs, stdout_room, stderr_room,
                     fds):
            return None
        return fds[0], fds[1], fds[2], fds[3]

    def __del__(self) -> None:
        api, self._api = getattr(self, "_api", 0), 0
        if api:
            self._lib.fp_wasi_api_free(api)


class _Worker:
    """A thread in C that Python owns: `close` (or garbage collection) stops it, through the
    C function named `_close`, after it finishes what it holds."""

    _close = ""

    def __init__(self, lib: ctypes.CDLL, ptr: int) -> None:
        self._lib = lib
        self._ptr = ptr

    def close(self) -> None:
        ptr, self._ptr = self._ptr, 0
        if ptr:
            getattr(self._lib, self._close)(ptr)

    def __del__(self) -> None:
        self.close()


class RouteRequest(ctypes.Structure):
    """fastpath.c's route_request: one request's Store, and how its guest ran."""

    _fields_ = [("store", _c), ("context", _c), ("instance", ctypes.c_uint8 * 32),
                ("has_instance", ctypes.c_int32), ("fds", ctypes.c_int32 * 4),
                ("outcome", ctypes.c_int32), ("exit_code", ctypes.c_int32), ("error", _c),
                ("trap", _c), ("out_len", ctypes.c_int64), ("err_len", ctypes.c_int64),
                ("instantiate_ns", ctypes.c_int64)]

    RAN, ERROR, TRAP, NO_INSTANCE, NO_START, NO_TICKER = range(6)

    def take_error(self) -> wasmtime.WasmtimeError | None:
        """The error or trap the run left (now Python's to delete), as wasmtime-py's."""
        error, trap, self.error, self.trap = self.error, self.trap, None, None
        if error:
            return wasmtime.WasmtimeError._from_ptr(
                ctypes.cast(error, ctypes.POINTER(ffi.wasmtime_error_t)))
        if trap:
            return wasmtime.Trap._from_ptr(ctypes.cast(trap, ctypes.POINTER(ffi.wasm_trap_t)))
        return None


class Reaper(_Worker):
    """Deletes finished Stores on a thread of its own (in C, so it never waits for the GIL),
    at most `max_pending` at a time: a response need not wait for its Store's teardown.
    Hand over only a Store whose wasi-nn state is forgotten and that holds no Python callback
    (its delete must run no Python: a route's outputs are files). `close` deletes what is
    queued first."""

    _close = "fp_reaper_close"

    def __init__(self, lib: ctypes.CDLL, ptr: int) -> None:
        super().__init__(lib, ptr)
        self._begin, self._run, self._end = lib.fp_route_begin, lib.fp_route_run, lib.fp_route_end

    def drop(self, store: wasmtime.Store) -> bool:
        """Take `store` (it is closed for Python); False: the reaper is full, nothing taken."""
        if not self._ptr:
            return False
        pointer = store.ptr()
        if not self._lib.fp_reaper_drop(self._ptr, ctypes.cast(pointer, _c)):
            return False
        store._consume()  # the reaper deletes it now: Python's delete must not
        return True

    def prepare(self, wasi: NativeWasi, stdout_room: int, stderr_room: int,
                count: int) -> bool:
        """Between Stores, also make `count` (at most 8) WASI configs ahead, stdout and
        stderr files of these rooms opened, for `NativeWasi.set(..., ahead=self)`: in the
        request the two files cost ~0.12 ms after an inference's cold caches."""
        # (the reaper copies the function table: `wasi` may go first)
        return bool(self._ptr) and bool(self._lib.fp_reaper_prepare(
            self._ptr, wasi._api, stdout_room, stderr_room, count))

    def instances(self, engine: wasmtime.Engine, pre: wasmtime.InstancePre,
                  memory_size: int | None, deadline: int, count: int) -> bool:
        """Between Stores, also make `count` (at most 8) Stores ahead, each with a memory
        limit of `memory_size` bytes (None: none) and this epoch deadline, and an instance of
        `pre`'s module in it, for `begin`; with `count` 0, make none but let `begin` make
        Stores the same way. Only for a module without a start function:
        no guest code may run on this thread. Holds `engine` and `pre` until closed."""
        if not self._ptr:
            return False
        funcs = (_c * len(_STORE_FUNCS))(*(_address(name) for name in _STORE_FUNCS))
        self._keep = (engine, pre)  # the thread uses their pointers: they must outlive it
        return bool(self._lib.fp_reaper_instances(
            self._ptr, funcs, len(_STORE_FUNCS), ctypes.cast(engine.ptr(), _c),
            ctypes.cast(pre.ptr(), _c), -1 if memory_size is None else memory_size, deadline,
            count, ctypes.sizeof(ffi.wasmtime_extern_t), ffi.wasmtime_extern_t.of.offset,
            ffi.WASMTIME_EXTERN_FUNC.value))

    # --- a route's request, driven from C (after `instances`; see fp_route_begin) -----------

    def begin(self, wasi: NativeWasi, argv: bytes, argc: int, env: bytes, envc: int,
              stdin: bytes, dirs: bytes, ndirs: int, stdout_room: int, stderr_room: int
              ) -> RouteRequest | None:
        """A Store for one request (made ahead with its instance where one is ready), its
        WASI set as `NativeWasi.set` sets it; None if that failed (nothing is left)."""
        request = RouteRequest()
        if not self._ptr or self._begin(self._ptr, wasi._api, argv, len(argv), argc, env,
                                        len(env), envc, stdin, len(stdin), dirs, len(dirs),
                                        ndirs, stdout_room, stderr_room, request):
            return None
        return request

    def run(self, ticker: Ticker, request: RouteRequest, ticks: int) -> None:
        """Instantiate (if needed) and run `_start`, `ticks` epochs allowed (< 0: no
        deadline); `request` then tells how it went."""
        self._run(self._ptr, ticker._ptr, request, ticks)

    def end(self, request: RouteRequest) -> None:
        """The Store deleted after the response, the output files closed: after the wasi-nn
        state is forgotten and the outputs read."""
        self._end(self._ptr, request)

    def settle(self) -> None:
        """Wait until every Store handed over is deleted (and the configs and instances
        asked of `prepare` and `instances` are made)."""
        if self._ptr:
            self._lib.fp_reaper_settle(self._ptr)


class Ticker(_Worker):
    """Advances an engine's epoch from a thread in C while `enter` outnumbers `leave`: a
    Python thread took the GIL at every tick, and as each guest started. Holds the engine
    until closed."""

    _close = "fp_ticker_close"

    def __init__(self, lib: ctypes.CDLL, ptr: int, engine: wasmtime.Engine) -> None:
        super().__init__(lib, ptr)
        self._engine = engine  # the C thread uses its pointer: it must outlive the thread

    def enter(self) -> bool:
        """False if no thread could be started (the caller ticks some other way)."""
        return bool(self._ptr) and bool(self._lib.fp_ticker_enter(self._ptr))

    def leave(self) -> None:
        if self._ptr:
            self._lib.fp_ticker_leave(self._ptr)
