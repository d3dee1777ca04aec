"""`wasi_ephemeral_nn` (witx) on a wasmtime Linker: decode guest memory, keep handles, map errors.

This layer knows memory layouts and errnos only; frameworks live behind `wasinn.backends`.
Every function validates its handles, pointers and lengths and answers an errno: a guest's
mistake never becomes a trap or a Python exception in the host.
"""

from __future__ import annotations

import ctypes
import logging
import math
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import wasmtime

from ..backends import Backends, ExecutionContext, Graph
from .._json import json_object
from ..errors import (BackendError, Errno, InvalidArgument, MissingMemory, TooLarge,
                      UnsupportedOperation, WasiNnError)
from .._native import FastPath, ReadySpec
from ..registry import Registry
from ..tensor import ExecutionTarget, Tensor, TensorType, resolve_tensor_type
from ._raw import caller_memory, define_i32_func

MODULE = "wasi_ephemeral_nn"
log = logging.getLogger("wasinn")

_U32 = struct.Struct("<I")
_BUILDER = struct.Struct("<II")
_TENSOR = struct.Struct("<IIB3xII")  # dims_ptr, dims_len, type (one byte + padding), data_ptr, data_len
_MAX_BUILDERS = 64
_MAX_DIMS = 32
_MAX_NAME = 4096
_MAX_CONFIG = 1 << 20
_MAX_GRAPHS = 1024
_MAX_CONTEXTS = 4096


@dataclass
class Limits:
    """Per-guest bounds on what the host will do for it."""

    max_tensor_bytes: int = 1 << 30
    max_graphs: int = _MAX_GRAPHS
    max_contexts: int = _MAX_CONTEXTS


class BufferPool:
    """Input buffers kept for reuse, by size and dtype, at most `keep` of each."""

    def __init__(self, keep: int = 8) -> None:
        self._keep = keep
        self._free: dict[tuple[int, str], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int, dtype: np.dtype) -> np.ndarray:
        with self._lock:
            free = self._free.get((nbytes, dtype.str))
            if free:
                return free.pop()
        return np.empty(nbytes // dtype.itemsize, dtype)

    def give(self, buffer: np.ndarray) -> None:
        with self._lock:
            free = self._free.setdefault((buffer.nbytes, buffer.dtype.str), [])
            if len(free) < self._keep:
                free.append(buffer)


#: what a set_input registered in C: dims, type code, bytes, tensor type
InputTemplate = tuple[tuple[int, ...], int, int, TensorType]


@dataclass
class ReadyContext:
    """An execution context kept from a store that is done, with what its inputs were last
    set with: a later store's first init_execution_context of the same named graph may take
    it in C, its input and output arrays registered as they were (see fastpath.c)."""

    context: ExecutionContext
    graph: Graph
    #: per input index: its array, and what its last set_input registered (as NnState keeps
    #: them in input_buffers and input_templates)
    buffers: dict[int, np.ndarray]
    templates: dict[int, InputTemplate]
    #: per output index: the array every compute rewrites
    outputs: dict[int, np.ndarray]
    spec: ReadySpec

    def close(self, buffers: BufferPool) -> None:
        self.context.close()
        for array in self.buffers.values():
            buffers.give(array)


class ReadyContexts:
    """Ready contexts by graph, at most `keep` of each, shared by a host's stores: a route's
    every request makes one context of the same graph, and making it, setting its input and
    pinning its outputs in Python cost ~0.25 ms of each (with caches cold from the last
    inference), against a few microseconds to claim a ready one in C."""

    def __init__(self, buffers: BufferPool, keep: int = 8) -> None:
        self._buffers = buffers
        self._keep = keep
        self._ready: dict[int, list[ReadyContext]] = {}  # by id(graph): each holds its graph
        # reentrant: a Store's finalizer, run by the collector inside a locked step, gives back
        self._lock = threading.RLock()

    def take(self, graph: Graph) -> ReadyContext | None:
        with self._lock:
            ready = self._ready.get(id(graph))
            return ready.pop() if ready else None

    def give(self, ready: ReadyContext) -> None:
        with self._lock:
            kept = self._ready.setdefault(id(ready.graph), [])
            if len(kept) < self._keep:
                kept.append(ready)
                return
        ready.close(self._buffers)

    def clear(self) -> None:
        with self._lock:
            kept = [ready for ready_list in self._ready.values() for ready in ready_list]
            self._ready.clear()
        for ready in kept:
            ready.close(self._buffers)


@dataclass
class NnState:
    """The wasi-nn handles of one Store. Handles count from 0 as in wasmtime and WasmEdge."""

    registry: Registry
    backends: Backends
    limits: Limits = field(default_factory=Limits)
    graphs: dict[int, Graph] = field(default_factory=dict)
    graph_by_name: dict[str, int] = field(default_factory=dict)
    #: load_by_name_with_config's JSON, per graph handle: named graphs are shared, configs not
    graph_configs: dict[int, dict[str, Any]] = field(default_factory=dict)
    contexts: dict[int, tuple[ExecutionContext, Graph]] = field(default_factory=dict)
    next_graph: int = 0
    next_context: int = 0
    #: the message behind the last errno other than success, for the embedder and the CLI
    last_error: str | None = None
    #: per context, per input index: the host array set_input copies into, kept between
    #: calls for backends that allow it (a fresh 600 KB array costs page faults every time)
    input_buffers: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)
    #: the native repeat path and this store's key in it; the outputs it may copy from are
    #: pinned here until the context computes again
    fast: FastPath | None = None
    store_key: int = 0
    #: wasmtime's id of the store, learnt from its memory on the first call C may repeat
    store_id: int = 0
    output_pins: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    #: contexts whose outputs were pinned at their first set_input, before any compute
    armed: set[int] = field(default_factory=set)
    #: per context, per input index: what its last set_input registered in C (dims, type
    #: code, bytes, tensor type), to keep the context ready for another store when this ends
    input_templates: dict[int, dict[int, InputTemplate]] = field(default_factory=dict)
    #: contexts made with a config (load_by_name_with_config): never kept ready
    configured: set[int] = field(default_factory=set)
    #: where contexts of named graphs are kept ready between stores (None: closed instead)
    ready_contexts: ReadyContexts | None = None
    #: the ready context C may give out as this store's first context, until settled
    reserved: ReadyContext | None = None
    #: contexts adopted from a ready one, unchanged since: kept ready again as they are
    adopted: dict[int, ReadyContext] = field(default_factory=dict)
    #: where input buffers come from and go back to, shared by the host's stores (a store
    #: per request would otherwise map, fault in and unmap a fresh one each time)
    buffer_pool: BufferPool = field(default_factory=BufferPool)
    #: seconds spent in the backends' compute, all contexts together (a request's inference)
    compute_s: float = 0.0
    #: set while a guest is being pre-initialized: the calls refused because a snapshot could
    #: not keep the host state they make (execution contexts, graphs loaded from bytes)
    snapshot_refusals: list[str] | None = None

    def keep_input(self, ctx: int, index: int, buffer: np.ndarray) -> None:
        """`buffer` is now the context's input `index`: the one it replaces can go back."""
        old = self.input_buffers.setdefault(ctx, {}).get(index)
        self.input_buffers[ctx][index] = buffer
        if old is not None and old is not buffer:
            self._give_back([old])

    def _give_back(self, buffers: Iterable[np.ndarray]) -> None:
        """Only once neither C nor the backend can reach them (their registrations dropped,
        their context closed)."""
        for buffer in buffers:
            self.buffer_pool.give(buffer)

    def refuse_in_snapshot(self, call: str, why: str) -> None:
        if self.snapshot_refusals is not None:
            self.snapshot_refusals.append(call)
            raise UnsupportedOperation(f"{call} cannot run during pre-initialization: {why}")

    def named_graphs(self) -> list[tuple[int, str, dict[str, Any] | None]]:
        """(handle, name, config) of every graph held, all loaded by name."""
        by_handle = {handle: name for name, handle in self.graph_by_name.items()}
        return [(handle, by_handle[handle], self.graph_configs.get(handle))
                for handle in sorted(self.graphs)]

    def bind_named(self, handle: int, name: str, config: dict[str, Any] | None = None) -> None:
        """Make `handle` the registry's model `name`, as load_by_name(_with_config) made it in
        a pre-initialized snapshot. Raises NotFound when the host offers no such model."""
        self.graphs[handle] = self.registry.get(name)
        self.graph_by_name[name] = handle
        if config is not None:
            self.graph_configs[handle] = config

    def add_graph(self, graph: Graph) -> int:
        if len(self.graphs) >= self.limits.max_graphs:
            raise TooLarge(f"a guest may hold at most {self.limits.max_graphs} graphs")
        handle = self.next_graph
        self.next_graph = (handle + 1) & 0xFFFFFFFF
        self.graphs[handle] = graph
        return handle

    def graph(self, handle: int) -> Graph:
        try:
            return self.graphs[handle]
        except KeyError:
            raise InvalidArgument(f"no graph with handle {handle}") from None

    def context(self, handle: int) -> ExecutionContext:
        try:
            return self.contexts[handle][0]
        except KeyError:
            raise InvalidArgument(f"no execution context with handle {handle}") from None

    def pin_output(self, ctx: int, index: int, output: np.ndarray | bytes | None,
                   computed: bool = True) -> bool:
        """Until the context computes again, C may answer get_output(index) with `output`
        (replacing what it answered before); `computed=False`: only once the context has
        computed (C sees it). False if it cannot."""
        if self.fast is None or not self.store_id or not _pinnable(output):
            return False
        self.fast.put_output(self.store_key, self.store_id, ctx, index, output.nbytes,
                             output.__array_interface__["data"][0], computed)
        self.output_pins[(ctx, index)] = output  # alive while C may read it
        return True

    def forget_output(self, ctx: int, index: int) -> None:
        if self.output_pins.pop((ctx, index), None) is not None and self.fast is not None:
            self.fast.drop_output(self.store_key, ctx, index)

    def arm_outputs(self, ctx: int, context: ExecutionContext) -> None:
        """Pin the arrays a context's every compute writes (`outputs_in_place`) before its
        first compute, to be served by C once it has computed: after an inference, with cold
        caches, pinning them cost ~0.1 ms of a route's request."""
        self.armed.add(ctx)
        for index, output in enumerate(context.output_arrays()):
            self.pin_output(ctx, index, output, computed=False)

    def forget_outputs(self, ctx: int) -> None:
        """Before a context's outputs go: C must no longer copy from them."""
        self.armed.discard(ctx)
        for c, index in list(self.output_pins):
            if c == ctx:
                self.forget_output(ctx, index)

    # --- contexts kept ready between stores -----------------------------------------------

    def reserve(self) -> None:
        """Offer C a ready context of a named graph held here, for this store's first
        init_execution_context: only while the store has made none (C answers handle 0)."""
        pool, fast = self.ready_contexts, self.fast
        if pool is None or fast is None or self.reserved is not None or self.next_context \
                or self.contexts or self.snapshot_refusals is not None \
                or self.limits.max_contexts < 1:
            return
        for handle in self.graph_by_name.values():
            graph = self.graphs.get(handle)
            if graph is None or handle in self.graph_configs:
                continue
            ready = pool.take(graph)
            if ready is None:
                continue
            if fast.reserve(self.store_key, handle, ready.spec):
                self.reserved = ready
            else:
                pool.give(ready)
            return

    def settle(self) -> None:
        """Before Python answers any call for this store (or closes it): adopt the reserved
        context if C gave it out, else it goes back to the pool."""
        ready, self.reserved = self.reserved, None
        assert ready is not None and self.fast is not None and self.ready_contexts is not None
        claimed, store_id, mask = self.fast.settle(self.store_key)
        if claimed != 1:
            self.ready_contexts.give(ready)
            return
        self.store_id = store_id
        self.next_context = 1
        if all(mask >> index & 1 for index in ready.buffers):
            self.contexts[0] = (ready.context, ready.graph)
            self.input_buffers[0] = dict(ready.buffers)
            self.input_templates[0] = dict(ready.templates)
            self.armed.add(0)
            self.output_pins.update(((0, index), array) for index, array in ready.outputs.items())
            self.adopted[0] = ready
            return
        # an input the ready context was fed was not set by this guest (C counts only what it
        # served): a fresh context, given only the inputs this guest set
        self.fast.drop_context(self.store_key, 0)
        try:
            context = ready.graph.init_execution_context(None)
        except BaseException:
            ready.close(self.buffer_pool)
            raise
        self.contexts[0] = (context, ready.graph)
        ready.context.close()
        for index, template in ready.templates.items():
            array = ready.buffers[index]
            if not mask >> index & 1:
                self._give_back([array])
                continue
            dims, type_code, nbytes, tensor_type = template
            context.set_input(index, Tensor(dims, tensor_type, array))
            self.keep_input(0, index, array)
            self.input_templates.setdefault(0, {})[index] = template
            self.fast.put_input(self.store_key, store_id, 0, index, dims, type_code, nbytes,
                                array.__array_interface__["data"][0])

    def _retire(self, ctx: int, context: ExecutionContext, graph: Graph) -> None:
        """A context this store is done with (its C registrations dropped): kept ready for
        another store's where it can be, else closed."""
        buffers = self.input_buffers.pop(ctx, {})
        templates = self.input_templates.pop(ctx, {})
        ready = self.adopted.pop(ctx, None)
        if self.ready_contexts is not None and ctx not in self.configured:
            if ready is None:
                ready = self._ready(context, graph, buffers, templates)
            if ready is not None:
                context.recycle()  # type: ignore[attr-defined]
                self.ready_contexts.give(ready)
                return
        self.configured.discard(ctx)
        context.close()
        self._give_back(buffers.values())

    def _ready(self, context: ExecutionContext, graph: Graph, buffers: dict[int, np.ndarray],
               templates: dict[int, InputTemplate]) -> ReadyContext | None:
        """`context` as a ReadyContext: if its backend can recycle it, its outputs are
        rewritten in place, its graph is a named one (shared by every store) and each input
        was set through C's registration."""
        if self.fast is None or not hasattr(context, "recycle") or not buffers \
                or not getattr(context, "outputs_in_place", False) \
                or buffers.keys() != templates.keys() \
                or not any(self.graphs.get(handle) is graph
                           for handle in self.graph_by_name.values()):
            return None
        if any(buffers[index].nbytes != nbytes for index, (_, _, nbytes, _) in templates.items()):
            return None
        outputs = {index: array for index, array in enumerate(context.output_arrays())  # type: ignore[attr-defined]
                   if _pinnable(array)}
        spec = ReadySpec(
            [(index, dims, type_code, nbytes, buffers[index].__array_interface__["data"][0])
             for index, (dims, type_code, nbytes, _) in templates.items()],
            [(index, array.nbytes, array.__array_interface__["data"][0])
             for index, array in outputs.items()])
        return ReadyContext(context, graph, buffers, templates, outputs, spec)

    def close(self) -> None:
        if self.reserved is not None:
            self.settle()
        if self.fast is not None:
            self.fast.drop_store(self.store_key)
        self.output_pins.clear()
        self.armed.clear()
        for ctx, (context, graph) in list(self.contexts.items()):
            self._retire(ctx, context, graph)
        self.contexts.clear()
        for buffers in self.input_buffers.values():
            self._give_back(buffers.values())
        self.input_buffers.clear()
        self.input_templates.clear()
        self.adopted.clear()
        self.configured.clear()
        self.graphs.clear()
        self.graph_configs.clear()
        self.graph_by_name.clear()


class GuestMemory:
    """Bounds-checked access to the calling instance's exported `memory`, valid for one call
    (memory may grow, and move, once the guest runs again)."""

    __slots__ = ("base", "size", "store_id")

    def __init__(self, caller: int, context: int) -> None:
        found = caller_memory(caller, context)
        if found is None:
            raise MissingMemory("the guest exports no memory named 'memory'")
        self.base, self.size, self.store_id = found

    def check(self, ptr: int, length: int) -> int:
        """The host address of guest bytes [ptr, ptr+length), or invalid_argument."""
        if ptr + length > self.size:
            raise InvalidArgument(f"guest range {ptr:#x}+{length} is outside memory "
                                  f"({self.size} bytes)")
        return self.base + ptr

    def read(self, ptr: int, length: int) -> bytes:
        """Small structures (tensor headers, dims, names); tensor data goes through `array`."""
        return ctypes.string_at(self.check(ptr, length), length)

    def read_u32s(self, ptr: int, count: int) -> tuple[int, ...]:
        return struct.unpack(f"<{count}I", self.read(ptr, 4 * count))

    def write_u32(self, ptr: int, value: int) -> None:
        ctypes.memmove(self.check(ptr, 4), _U32.pack(value), 4)

    def array(self, ptr: int, length: int, dtype: np.dtype) -> np.ndarray:
        """A numpy view of guest bytes [ptr, ptr+length): no copy, valid for this call only."""
        self.check(ptr, length)
        if length == 0:
            return np.empty(0, dtype)
        # one ctypes type per memory size (page multiples), so the type cache stays small
        whole = (ctypes.c_char * self.size).from_address(self.base)
        return np.frombuffer(whole, dtype, length // dtype.itemsize, ptr)

    def copy_in(self, ptr: int, length: int, dtype: np.dtype) -> np.ndarray:
        """One copy from guest memory into a fresh array the guest can no longer touch."""
        return self.array(ptr, length, dtype).copy()

    def copy_out(self, ptr: int, array: np.ndarray) -> None:
        """One copy of a C-contiguous array into guest memory."""
        ctypes.memmove(self.check(ptr, array.nbytes), array.ctypes.data, array.nbytes)


#: the wasi-nn state of a store, by its context address (None for a store never registered)
StateLookup = Callable[[int], "NnState | None"]


class WitxAbi:
    """The host functions of `wasi_ephemeral_nn`, each `(state, call, *u32) -> errno`."""

    def __init__(self, state_of: StateLookup, fast: FastPath | None = None) -> None:
        """`fast`: serve repeated set_input / get_output calls in C (see wasinn._native);
        each store's NnState must then carry the same FastPath and its store key."""
        self._state_of = state_of
        self.fast = fast

    # --- graphs ---------------------------------------------------------------------------

    def load(self, state: NnState, call: _Call, builders_ptr: int, builders_len: int,
             encoding: int, target: int, graph_out: int) -> int:
        state.refuse_in_snapshot("load", "a graph built from bytes lives in this host only; "
                                 "load it by name (load_by_name) instead")
        mem = call.memory()
        if builders_len == 0 or builders_len > _MAX_BUILDERS:
            raise InvalidArgument(f"load takes 1..{_MAX_BUILDERS} builders, got {builders_len}")
        mem.check(graph_out, 4)
        raw = mem.read(builders_ptr, _BUILDER.size * builders_len)
        builders = [mem.read(ptr, length) for ptr, length in _BUILDER.iter_unpack(raw)]
        backend = state.backends.get(encoding)
        graph = backend.load(builders, _target(target))
        handle = state.add_graph(graph)
        mem.write_u32(graph_out, handle)
        return 0

    def load_by_name(self, state: NnState, call: _Call, name_ptr: int, name_len: int,
                     graph_out: int) -> int:
        return self._load_by_name(state, call, name_ptr, name_len, None, graph_out)

    def load_by_name_with_config(self, state: NnState, call: _Call, name_ptr: int, name_len: int,
                                 config_ptr: int, config_len: int, graph_out: int) -> int:
        return self._load_by_name(state, call, name_ptr, name_len, (config_ptr, config_len), graph_out)

    def _load_by_name(self, state: NnState, call: _Call, name_ptr: int, name_len: int,
                      config: tuple[int, int] | None, graph_out: int) -> int:
        mem = call.memory()
        if name_len > _MAX_NAME:
            raise InvalidArgument(f"model name longer than {_MAX_NAME} bytes")
        name = _utf8(mem.read(name_ptr, name_len), "model name")
        settings = None
        if config is not None:
            config_ptr, config_len = config
            if config_len > _MAX_CONFIG:
                raise TooLarge(f"config longer than {_MAX_CONFIG} bytes")
            settings = json_object(mem.read(config_ptr, config_len), "config")
        mem.check(graph_out, 4)
        handle = state.graph_by_name.get(name)
        if handle is None or handle not in state.graphs:
            graph = state.registry.get(name)
            handle = state.add_graph(graph)
            state.graph_by_name[name] = handle
        if settings is not None:
            state.graph_configs[handle] = settings  # a later config replaces an earlier one
        mem.write_u32(graph_out, handle)
        state.reserve()
        return 0

    def unload(self, state: NnState, call: _Call, graph: int) -> int:
        state.graph(graph)
        del state.graphs[graph]
        state.graph_configs.pop(graph, None)
        for name, handle in list(state.graph_by_name.items()):
            if handle == graph:
                del state.graph_by_name[name]
        return 0

    # --- execution contexts ---------------------------------------------------------------

    def init_execution_context(self, state: NnState, call: _Call, graph: int, ctx_out: int) -> int:
        state.refuse_in_snapshot("init_execution_context", "an execution context lives in "
                                 "this host only; make it after pre-initialization (in main)")
        mem = call.memory()
        model = state.graph(graph)
        mem.check(ctx_out, 4)
        if len(state.contexts) >= state.limits.max_contexts:
            raise TooLarge(f"a guest may hold at most {state.limits.max_contexts} contexts")
        config = state.graph_configs.get(graph)
        ctx = model.init_execution_context(config)
        handle = state.next_context
        state.next_context = (handle + 1) & 0xFFFFFFFF
        state.contexts[handle] = (ctx, model)
        if config is not None:
            state.configured.add(handle)
        mem.write_u32(ctx_out, handle)
        return 0

    def finalize_execution_context(self, state: NnState, call: _Call, ctx: int) -> int:
        context = state.context(ctx)
        if state.fast is not None:
            state.fast.drop_context(state.store_key, ctx)
        state.forget_outputs(ctx)
        _, graph = state.contexts.pop(ctx)
        state._retire(ctx, context, graph)
        return 0

    def set_input(self, state: NnState, call: _Call, ctx: int, index: int, tensor_ptr: int) -> int:
        entry = state.contexts.get(ctx)
        if entry is None:
            raise InvalidArgument(f"no execution context with handle {ctx}")
        context, graph = entry
        mem = call.memory()
        dims_ptr, dims_len, type_code, data_ptr, data_len = _TENSOR.unpack(
            mem.read(tensor_ptr, _TENSOR.size))
        if dims_len > _MAX_DIMS:
            raise InvalidArgument(f"tensor has {dims_len} dims, at most {_MAX_DIMS} allowed")
        if data_len > state.limits.max_tensor_bytes:
            raise TooLarge(f"tensor of {data_len} bytes is over the limit of "
                           f"{state.limits.max_tensor_bytes}")
        dims = mem.read_u32s(dims_ptr, dims_len)
        expected = graph.input_dtype(index)
        if expected is None:
            # the graph takes the bytes as given (e.g. a prompt): only the length counts
            data = mem.copy_in(data_ptr, data_len, np.dtype(np.uint8))
            context.set_input(index, Tensor(dims, TensorType.U8, data))
            return 0
        tensor_type = resolve_tensor_type(type_code, dims, data_len, expected)
        count = math.prod(dims)
        if count * tensor_type.dtype.itemsize != data_len:
            raise InvalidArgument(f"tensor dims {list(dims)} of {tensor_type.name.lower()} need "
                                  f"{count * tensor_type.dtype.itemsize} bytes, data has {data_len}")
        if not getattr(context, "reuses_input_buffers", False):
            context.set_input(index, Tensor(dims, tensor_type,
                                            mem.copy_in(data_ptr, data_len, tensor_type.dtype)))
            return 0
        fast = state.fast
        if fast is not None and index in state.input_buffers.get(ctx, ()):
            fast.drop_input(state.store_key, ctx, index)  # its buffer is replaced below
        # registered again below only if this call is
        state.input_templates.get(ctx, {}).pop(index, None)
        state.adopted.pop(ctx, None)
        # a buffer other than the current input's: if the backend refuses this tensor, the
        # input set before stays as it was
        data = state.buffer_pool.take(data_len, tensor_type.dtype)
        address = data.__array_interface__["data"][0]
        ctypes.memmove(address, mem.check(data_ptr, data_len), data_len)
        try:
            context.set_input(index, Tensor(dims, tensor_type, data))
        except BaseException:
            state._give_back([data])
            raise
        state.keep_input(ctx, index, data)
        if fast is not None and call.context == state.store_key:
            # the same call again (dims, type code, length) may now copy straight into `data`
            state.store_id = mem.store_id
            fast.put_input(state.store_key, mem.store_id, ctx, index, dims, type_code, data_len,
                           address)
            state.input_templates.setdefault(ctx, {})[index] = (dims, type_code, data_len,
                                                                tensor_type)
            if ctx not in state.armed and getattr(context, "outputs_in_place", False):
                state.arm_outputs(ctx, context)
        return 0

    def compute(self, state: NnState, call: _Call, ctx: int) -> int:
        context = state.context(ctx)
        # the pinned outputs stay alive (so C may still read them) until replaced or dropped
        started = time.perf_counter()
        try:
            context.compute()
        except BaseException:
            state.forget_outputs(ctx)
            raise
        finally:
            state.compute_s += time.perf_counter() - started
        if ctx in state.armed:
            return 0  # its outputs were pinned before, and C saw this compute succeed
        if getattr(context, "outputs_in_place", False):
            # the same arrays every time: registrations hold, and the first get_output of a
            # fresh store (a route's every request) can be served in C too
            if state.fast is not None and state.store_id:
                names = getattr(state.contexts[ctx][1], "output_names", ())
                for index in range(len(names)):
                    if (ctx, index) not in state.output_pins:
                        state.pin_output(ctx, index, context.get_output(index))
            return 0
        if not state.output_pins:
            return 0  # nothing pinned
        # a loop reads the same outputs again: pin the new ones, so C can answer them
        for index in [index for c, index in state.output_pins if c == ctx]:
            try:
                output = context.get_output(index)
            except WasiNnError:
                output = None  # the guest's own get_output will hear why
            if not state.pin_output(ctx, index, output):
                state.forget_output(ctx, index)
        return 0

    def get_output(self, state: NnState, call: _Call, ctx: int, index: int, out_ptr: int,
                   out_max: int, written_out: int) -> int:
        context = state.context(ctx)
        output = context.get_output(index)
        mem = call.memory()
        errno = _write_output(mem, output, out_ptr, out_max, written_out)
        if call.context == state.store_key:
            state.store_id = mem.store_id
            state.pin_output(ctx, index, output)
        return errno

    def compute_single(self, state: NnState, call: _Call, ctx: int) -> int:
        state.context(ctx).compute_single()
        return 0

    def get_output_single(self, state: NnState, call: _Call, ctx: int, index: int, out_ptr: int,
                          out_max: int, written_out: int) -> int:
        context = state.context(ctx)
        return _write_output(call.memory(), context.get_output_single(index), out_ptr,
                             out_max, written_out)

    def fini_single(self, state: NnState, call: _Call, ctx: int) -> int:
        state.context(ctx).fini_single()
        return 0

    # --- wiring ---------------------------------------------------------------------------

    FUNCTIONS: dict[str, int] = {
        "load": 5,
        "load_by_name": 3,
        "load_by_name_with_config": 5,
        "init_execution_context": 2,
        "set_input": 3,
        "compute": 1,
        "get_output": 5,
        "compute_single": 1,
        "get_output_single": 5,
        "fini_single": 1,
        "unload": 1,
        "finalize_execution_context": 1,
    }

    def add_to_linker(self, linker: wasmtime.Linker) -> None:
        for name, arity in self.FUNCTIONS.items():
            define_i32_func(linker, MODULE, name, arity, self._guarded(name), self.fast)

    def _guarded(self, name: str) -> Callable[..., int]:
        """Wrap one host function: unsigned arguments in, an errno out, whatever happens."""
        method = getattr(self, name)
        state_of = self._state_of

        def guarded(caller: int, context: int, *args: int) -> int:
            state = state_of(context)
            try:
                if state is None:
                    raise BackendError("this Store was not given to Host.add_to_store")
                if state.reserved is not None:
                    state.settle()
                return method(state, _Call(caller, context), *args)
            except Exception as e:  # a backend's bug must not take the host down either
                errno = e.errno if isinstance(e, WasiNnError) else Errno.RUNTIME_ERROR
                message = f"{name}: {e} (errno {int(errno)} {errno.name.lower()})"
                if state is not None:
                    state.last_error = message
                log.info("%s", message)
                return int(errno)

        guarded.__name__ = name
        return guarded


class _Call:
    """What one host call knows of its caller; guest memory is looked up only when needed."""

    __slots__ = ("caller", "context")

    def __init__(self, caller: int, context: int) -> None:
        self.caller = caller
        self.context = context

    def memory(self) -> GuestMemory:
        return GuestMemory(self.caller, self.context)


def _pinnable(output: object) -> bool:
    """C may copy `output` as it is: a plain array, in one piece, of bytes that are not
    host pointers."""
    return isinstance(output, np.ndarray) and output.nbytes > 0 and \
        output.flags.c_contiguous and not output.dtype.hasobject


def _write_output(mem: GuestMemory, output: np.ndarray | bytes, out_ptr: int, out_max: int,
                  written_out: int) -> int:
    """Copy an output to the guest; when it does not fit, still say how many bytes it needs."""
    mem.check(written_out, 4)
    if isinstance(output, bytes):
        needed = len(output)
    elif output.dtype.hasobject:  # e.g. ONNX string tensors: host pointers must never cross
        raise BackendError(f"an output of dtype {output.dtype} cannot be handed to a guest")
    else:
        needed = output.nbytes
    if needed > out_max:
        mem.write_u32(written_out, needed)
        raise TooLarge(f"output of {needed} bytes does not fit the guest's {out_max}")
    if isinstance(output, bytes):
        ctypes.memmove(mem.check(out_ptr, needed), output, needed)
    elif needed:
        mem.copy_out(out_ptr, output)
    mem.write_u32(written_out, needed)
    return 0


def _target(code: int) -> ExecutionTarget:
    try:
        return ExecutionTarget(code)
    except ValueError:
        raise InvalidArgument(f"unknown execution target {code}") from None


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(f"{what} is not UTF-8") from None
