"""The Python API: a Host owns an Engine, its named models and its limits, and adds wasi-nn to
wasmtime Linkers and Stores, its own or the embedder's."""

from __future__ import annotations

import ctypes
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime
from wasmtime import _bindings as _ffi

from .abi import Limits, NnState, WitxAbi
from .abi.witx import BufferPool, ReadyContexts
from ._native import FastPath, Ticker
from .abi._raw import store_key
from .backends import Backends
from .errors import WasiNnError
from .modcache import ModuleCache
from .preinit._record import PreinitError, PreinitRecord, read_record
from .registry import ModelSpec, Progress, Registry
from .tensor import GraphEncoding

Output = str | os.PathLike[str] | Callable[[bytes], None] | None
#: a guest's stdin: a file, the bytes themselves, or (None) the host's own stdin
Input = str | os.PathLike[str] | bytes | bytearray | memoryview | None

#: how often the epoch ticks while some guest runs under a deadline
EPOCH_TICK_S = 0.01
#: a store's epoch deadline until a timeout sets one (with epoch interruption on, a store's
#: deadline starts at 0: it would stop at once)
FAR_DEADLINE = 1 << 62


class GuestTimeout(Exception):
    """The guest ran past its deadline and was stopped; the host goes on."""


@dataclass(frozen=True)
class Preopen:
    """A host directory the guest sees at `guest` (`--dir HOST:GUEST`)."""

    host: Path
    guest: str

    @classmethod
    def parse(cls, text: str) -> Preopen:
        host, sep, guest = text.partition(":")
        return cls(Path(host), guest if sep else host)


class Host:
    """A wasi-nn host: named models shared by every guest it runs, and the limits they run under.

    `module_cache` is True for the default directory (~/.cache/wasinn/modules), a directory, or
    False to compile every time. `instance_pool=N` has wasmtime keep N instance slots whose
    memory stays mapped and resident between instances (its pooling allocator), so a new
    instance maps nothing and its first writes take no page faults; at most N instances of
    this host's engine are alive at once (a further one fails to instantiate).
    `native=False` keeps every wasi-nn call in Python (by default a guest's repeated
    set_input / get_output are served in C, built with zig if installed).

    >>> host = Host(models=["classifier:onnx:cpu:model.onnx"])
    >>> exit_code = host.run("classify.wasm", ["classifier", "cat.ppm"])
    """

    def __init__(self, *, models: Iterable[ModelSpec | str] = (), threads: int | None = None,
                 max_memory: int | None = None, timeout: float | None = None,
                 max_tensor_bytes: int | None = None,
                 module_cache: bool | str | os.PathLike[str] = True,
                 progress: Progress | None = None, engine: wasmtime.Engine | None = None,
                 backend_options: Mapping[GraphEncoding, Mapping[str, Any]] | None = None,
                 native: bool = True, instance_pool: int | None = None) -> None:
        if engine is not None and instance_pool is not None:
            raise ValueError("instance_pool configures the engine Host makes: not with engine=")
        if engine is None:
            config = wasmtime.Config()
            config.epoch_interruption = True
            # a pre-initialized snapshot keeps its heap above the zeroed statics: as one
            # copy-on-write image, each first write to them copies a page (a fresh instance
            # of the edge classifier ran 0.6 ms slower); copying the data segments is cheaper
            config.memory_init_cow = False
            if instance_pool is not None:
                _use_pooling(config, instance_pool, max_memory)
            engine = wasmtime.Engine(config)
        self.engine = engine
        self.backends = Backends(threads=threads, options=backend_options)
        self.registry = Registry(self.backends, progress=progress)
        for model in models:
            self.add_model(model)
        self.max_memory = max_memory
        self.timeout = timeout
        self.limits = Limits() if max_tensor_bytes is None else Limits(max_tensor_bytes)
        cache_dir = None if isinstance(module_cache, bool) else Path(module_cache)
        self.modules = ModuleCache(engine, cache_dir, enabled=module_cache is not False)
        self._states: dict[int, NnState] = {}
        self._abi = WitxAbi(self._states.get)
        self._buffers = BufferPool()
        self._ready = ReadyContexts(self._buffers)
        # a guest's repeated set_input / get_output served in C when zig can build it; made
        # with the first Linker or Store, so a Host that runs no guest never builds it
        self._native: bool | None = native
        self._ticker = _EpochTicker(engine)
        self._run_linker: wasmtime.Linker | None = None  # store-independent, so made once
        # the preinit record of each module this host compiled, read once with its bytes
        self._records: weakref.WeakKeyDictionary[wasmtime.Module, PreinitRecord] = \
            weakref.WeakKeyDictionary()

    # --- models ---------------------------------------------------------------------------

    def add_model(self, model: ModelSpec | str) -> ModelSpec:
        """Offer a named model: a ModelSpec, or WasmEdge's `NAME:ENCODING:TARGET:PATH...`."""
        spec = ModelSpec.from_preload(model) if isinstance(model, str) else model
        self.registry.register(spec)
        return spec

    def add_graph_dir(self, text: str) -> ModelSpec:
        """Offer a model from wasmtime's `ENCODING::DIR` (named after the directory)."""
        spec = ModelSpec.from_graph_dir(text)
        self.registry.register(spec)
        return spec

    # --- embedding in the user's own Linker and Store -------------------------------------

    def add_to_linker(self, linker: wasmtime.Linker) -> None:
        """Define the `wasi_ephemeral_nn` imports on `linker` (WASI is the embedder's choice)."""
        self._start_native()
        self._abi.add_to_linker(linker)

    def _start_native(self) -> None:
        if self._native:
            self._abi.fast = FastPath.create()
            if self._abi.fast is not None:
                self._ticker.use_native(self._abi.fast)
        self._native = None  # decided

    def add_to_store(self, store: wasmtime.Store,
                     preinit: PreinitRecord | None = None) -> NnState:
        """Give `store` its own wasi-nn handles and this host's limits. Call once per Store.

        Every Store on `host.engine` needs this (or comes from `host.store()`): the engine
        runs with epoch interruption for timeouts, and this also sets the store's deadline.
        `preinit` (from `host.preinit_record(module)`) binds the graph handles a pre-initialized
        module's snapshot holds, to the same named models; PreinitError if one is not offered.
        """
        key = store_key(store)
        state = self._attach(key, preinit)
        weakref.finalize(store, self._forget, key, state)
        if self.max_memory is not None:
            store.set_limits(memory_size=self.max_memory)
        store.set_epoch_deadline(FAR_DEADLINE)
        return state

    def _attach(self, key: int, preinit: PreinitRecord | None = None) -> NnState:
        """The wasi-nn state of the store whose context is at `key` (see add_to_store);
        `_forget` it before that store goes."""
        self._start_native()
        state = NnState(self.registry, self.backends, self.limits, fast=self._abi.fast,
                        store_key=key, buffer_pool=self._buffers, ready_contexts=self._ready)
        if preinit is not None:
            _bind_preinit(state, preinit)
            state.reserve()
        self._states[key] = state
        return state

    def _forget(self, key: int, state: NnState) -> None:
        if self._states.get(key) is state:
            del self._states[key]
        state.close()

    def linker(self, wasi: bool = True) -> wasmtime.Linker:
        """A new Linker with WASI preview1 (if asked) and wasi-nn."""
        linker = wasmtime.Linker(self.engine)
        if wasi:
            linker.define_wasi()
        self.add_to_linker(linker)
        return linker

    def store(self, wasi: wasmtime.WasiConfig | None = None) -> wasmtime.Store:
        """A new Store with wasi-nn state, this host's limits and, if given, WASI."""
        store = wasmtime.Store(self.engine)
        if wasi is not None:
            store.set_wasi(wasi)
        self.add_to_store(store)
        return store

    def compile(self, module: str | os.PathLike[str] | bytes) -> wasmtime.Module:
        """Compile a module, or take it from the on-disk cache of compiled modules. A
        pre-initialized module's record is read here, once: see `preinit_record`."""
        wasm = module if isinstance(module, bytes) else Path(module).read_bytes()
        record = read_record(wasm)
        compiled = self.modules.load(wasm)
        if record is not None:
            self._records[compiled] = record
        return compiled

    def preinit_record(self, module: wasmtime.Module) -> PreinitRecord | None:
        """The graphs a pre-initialized module (compiled by `compile`) expects bound at
        instantiation, for `add_to_store(store, preinit=...)`; None for other modules."""
        return self._records.get(module)

    # --- running a command module in one call ---------------------------------------------

    def run(self, module: str | os.PathLike[str] | bytes | wasmtime.Module,
            args: Sequence[str] = (), *, env: Mapping[str, str] | None = None,
            dirs: Iterable[Preopen | str] = (), stdin: Input = None, stdout: Output = None,
            stderr: Output = None, timeout: float | None = None,
            program: str | None = None) -> int:
        """Run a WASI command module to its end and return its exit code.

        stdio is inherited unless given: a file path, stdin's bytes, or (stdout/stderr) a
        callable taking bytes.
        Raises GuestTimeout past the deadline and wasmtime.Trap if the guest traps.
        """
        compiled = module if isinstance(module, wasmtime.Module) else self.compile(module)
        if program is None:
            program = Path(module).name if isinstance(module, (str, os.PathLike)) else "main.wasm"
        wasi = wasmtime.WasiConfig()
        wasi.argv = [program, *args]
        if env:
            wasi.env = list(env.items())
        for entry in dirs:
            preopen = Preopen.parse(entry) if isinstance(entry, str) else entry
            wasi.preopen_dir(str(preopen.host), preopen.guest)
        _set_input(wasi, stdin)
        held = HeldCallbacks()
        _set_output(wasi, "stdout", stdout, held)
        _set_output(wasi, "stderr", stderr, held)
        try:
            return self._run_in_store(compiled, wasi, self.timeout if timeout is None
                                      else timeout)
        finally:
            held.wait(1.0)  # the store is gone: wasmtime lets go of the callbacks at once

    def _run_in_store(self, compiled: wasmtime.Module, wasi: wasmtime.WasiConfig,
                      timeout: float | None) -> int:
        store = wasmtime.Store(self.engine)
        store.set_wasi(wasi)
        state = self.add_to_store(store, preinit=self.preinit_record(compiled))
        if self._run_linker is None:
            self._run_linker = self.linker()
        linker = self._run_linker
        try:
            with self._ticker.deadline(store, timeout):
                instance = linker.instantiate(store, compiled)
                start = instance.exports(store).get("_start")
                if not isinstance(start, wasmtime.Func):
                    raise ValueError("the module is not a WASI command (no _start export)")
                start(store)
        except wasmtime.ExitTrap as e:
            return e.code
        except wasmtime.Trap as e:
            if e.trap_code == wasmtime.TrapCode.INTERRUPT:
                raise GuestTimeout(f"the guest ran past its {timeout} s deadline") from None
            raise
        finally:
            self._forget(store_key(store), state)
            del store  # not kept by a traceback: its output callbacks must go now
        return 0

    def close(self) -> None:
        self._ticker.stop()
        self._ready.clear()
        self.registry.close()


#: bytes of each pooled instance's linear memory kept resident (zeroed with memset, not given
#: back to the kernel) when the instance goes: the edge classifier's memory is about 2.5 MiB,
#: and its page faults cost 0.6 ms a request without this
POOL_KEEP_RESIDENT = 16 << 20


def _use_pooling(config: wasmtime.Config, instances: int, max_memory: int | None) -> None:
    """wasmtime's pooling allocator on `config` (wasmtime-py has no wrapper: its C API)."""
    if instances < 1:
        raise ValueError(f"instance_pool must be at least 1, got {instances}")
    pool = _ffi.wasmtime_pooling_allocation_config_new()
    _ffi.wasmtime_pooling_allocation_config_total_core_instances_set(pool, instances)
    _ffi.wasmtime_pooling_allocation_config_total_memories_set(pool, instances)
    _ffi.wasmtime_pooling_allocation_config_total_tables_set(pool, instances)
    _ffi.wasmtime_pooling_allocation_config_linear_memory_keep_resident_set(
        pool, POOL_KEEP_RESIDENT)
    _ffi.wasmtime_pooling_allocation_config_table_keep_resident_set(pool, 1 << 16)
    if max_memory is not None:  # a slot reserves what a memory may grow to: no more
        _ffi.wasmtime_pooling_allocation_config_max_memory_size_set(pool, max(max_memory, 1 << 16))
    _ffi.wasmtime_pooling_allocation_strategy_set(config.ptr(), pool)
    _ffi.wasmtime_pooling_allocation_config_delete(pool)


def _bind_preinit(state: NnState, record: PreinitRecord) -> None:
    for binding in record.graphs:
        try:
            state.bind_named(binding.handle, binding.name, binding.config)
        except WasiNnError as e:
            state.close()
            raise PreinitError(f"the module was pre-initialized with model {binding.name!r} as "
                               f"graph {binding.handle}, and it cannot be bound here: {e}") from None
    state.next_graph = record.next_graph


def _set_input(wasi: wasmtime.WasiConfig, stdin: Input) -> None:
    if stdin is None:
        wasi.inherit_stdin()
    elif isinstance(stdin, (bytes, bytearray, memoryview)):
        _set_stdin_bytes(wasi, stdin)
    else:
        wasi.stdin_file = str(stdin)


def _set_stdin_bytes(wasi: wasmtime.WasiConfig, data: bytes | bytearray | memoryview) -> None:
    """The guest's stdin reads `data` (copied once into wasmtime): no file to write, open and
    remove, as WAGI bodies needed before (wasmtime-py offers only `stdin_file`)."""
    data = data if isinstance(data, bytes) else bytes(data)
    vec = _ffi.wasm_byte_vec_t()
    _ffi.wasm_byte_vec_new(ctypes.byref(vec), len(data),
                           ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_ubyte)))
    _ffi.wasi_config_set_stdin_bytes(wasi.ptr(), ctypes.byref(vec))  # takes vec's bytes


def _set_output(wasi: wasmtime.WasiConfig, stream: str, target: Output,
                held: HeldCallbacks) -> None:
    if target is None:
        getattr(wasi, f"inherit_{stream}")()
    elif callable(target):
        setattr(wasi, f"{stream}_custom", _Counted(target, held))
    else:
        setattr(wasi, f"{stream}_file", str(target))


class HeldCallbacks:
    """How many output callbacks wasmtime still holds. It drops them on its own threads a
    moment after their store goes, and one dropped while the interpreter exits aborts the
    process (measured: 1 run in 3 to 8); so whoever hands them over waits for 0 first."""

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()

    def add(self, delta: int) -> None:
        with self._changed:
            self._count += delta
            self._changed.notify_all()

    def wait(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._count == 0, timeout)


class _Counted:
    """A callable given to wasmtime, counted in `held` until wasmtime drops it."""

    def __init__(self, write: Callable[[bytes], object], held: HeldCallbacks) -> None:
        self._write = write
        self._held = held
        held.add(1)

    def __call__(self, data: bytes) -> object:
        return self._write(data)

    def __del__(self) -> None:
        self._held.add(-1)


class _EpochTicker:
    """Advances the engine's epoch while any guest runs under a deadline, and only then: from
    a thread in C where the native path is built (`use_native`), else from a Python thread."""

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine
        self._active = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._native: Ticker | None = None

    def use_native(self, fast: FastPath) -> None:
        with self._lock:
            if self._native is None and self._thread is None and not self._stopped:
                self._native = fast.ticker(self._engine, EPOCH_TICK_S)

    def deadline(self, store: wasmtime.Store, timeout: float | None) -> _Deadline:
        return _Deadline(self, store, timeout)

    def _enter(self) -> Ticker | None:
        """The native ticker that counts this guest (give it to `_leave`), or None: Python's."""
        native = self._native
        if native is not None and native.enter():
            return native
        with self._lock:
            self._active += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="wasinn-epoch",
                                                daemon=True)
                self._thread.start()
            self._wake.notify()
        return None

    def _leave(self, native: Ticker | None) -> None:
        if native is not None:
            native.leave()
            return
        with self._lock:
            self._active -= 1

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._active == 0 and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    return
            self._engine.increment_epoch()
            time.sleep(EPOCH_TICK_S)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._wake.notify()
            native, self._native = self._native, None
        if native is not None:
            native.close()


def deadline_ticks(timeout: float) -> int:
    """A timeout as epoch ticks of the host's ticker."""
    return max(1, round(timeout / EPOCH_TICK_S))


class _Deadline:
    def __init__(self, ticker: _EpochTicker, store: wasmtime.Store, timeout: float | None) -> None:
        self._ticker = ticker
        self._store = store
        self._timeout = timeout
        self._native: Ticker | None = None

    def __enter__(self) -> None:
        if self._timeout is not None:
            ticks = deadline_ticks(self._timeout)
            self._store.set_epoch_deadline(ticks)
            self._native = self._ticker._enter()

    def __exit__(self, *exc: object) -> None:
        if self._timeout is not None:
            self._ticker._leave(self._native)
