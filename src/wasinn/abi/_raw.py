"""A lean path for host functions whose parameters and result are all i32.

wasmtime-py's `Linker.define_func` wraps every call in a Caller object and converts each value
through `Val` (about 8 us a call). The wasi-nn imports are all `(i32...) -> i32`, so they are
defined here with wasmtime's unchecked C API: arguments arrive as raw u32, the caller as a
plain address, and guest memory is reached with three C calls.
"""

from __future__ import annotations

import ctypes
import itertools
import struct
from collections.abc import Callable

import wasmtime
from wasmtime import _ffi as ffi

from .._native import HANDLER, FastPath

# Raw host function: (caller address, store context address, *u32 args) -> i32 result.
# It must not raise.
RawHandler = Callable[..., int]

_VAL_RAW_SIZE = ctypes.sizeof(ffi.wasmtime_val_raw_t)
_UNPACK = {n: struct.Struct("<" + f"I{_VAL_RAW_SIZE - 4}x" * n).unpack for n in range(1, 9)}
_RESULT = struct.Struct("<i")

_dll = ffi.dll
_c = ctypes.c_void_p
_caller_context = ctypes.CFUNCTYPE(_c, _c)(("wasmtime_caller_context", _dll))
_caller_export_get = ctypes.CFUNCTYPE(ctypes.c_bool, _c, ctypes.c_char_p, ctypes.c_size_t, _c)(
    ("wasmtime_caller_export_get", _dll))
_memory_data = ctypes.CFUNCTYPE(_c, _c, _c)(("wasmtime_memory_data", _dll))
_memory_data_size = ctypes.CFUNCTYPE(ctypes.c_size_t, _c, _c)(("wasmtime_memory_data_size", _dll))

_MEMORY_NAME = b"memory"
_EXTERN_MEMORY = ffi.WASMTIME_EXTERN_MEMORY.value

# Handlers by the id wasmtime hands back to the trampoline; an entry lives as long as the
# functions defined with it (wasmtime calls the finalizer when the last one is dropped).
_handlers: dict[int, RawHandler] = {}
_ids = itertools.count(1)


@ctypes.CFUNCTYPE(ctypes.c_size_t, _c, _c, _c, ctypes.c_size_t)
def _trampoline(env: int, caller: int, values: int, count: int) -> int:
    result = _handlers[env](caller, _caller_context(caller) or 0,
                            *_UNPACK[count](ctypes.string_at(values, count * _VAL_RAW_SIZE)))
    ctypes.memmove(values, _RESULT.pack(result), 4)
    return 0  # no trap


@ctypes.CFUNCTYPE(None, _c)
def _finalize(env: int) -> None:
    _handlers.pop(env, None)
    _native_handlers.pop(env, None)


# The C-callable forms of handlers defined through the native path, alive as long as theirs.
_native_handlers: dict[int, object] = {}


def define_i32_func(linker: wasmtime.Linker, module: str, name: str, arity: int,
                    handler: RawHandler, fast: FastPath | None = None) -> None:
    """Define `module.name: (i32 x arity) -> i32` on `linker`, served by `handler`, or first
    by `fast`'s C code where it serves `name` (its misses still go to `handler`)."""
    if arity not in _UNPACK:
        raise ValueError(f"arity {arity} is not supported")
    i32 = wasmtime.ValType.i32()
    ty = wasmtime.FuncType([i32] * arity, [i32])
    handle = next(_ids)
    _handlers[handle] = handler
    callback = ctypes.cast(_trampoline, ffi.wasmtime_func_unchecked_callback_t)
    env, finalizer = handle, ctypes.cast(_finalize, ctypes.CFUNCTYPE(None, _c))
    native = None
    if fast is not None:
        def from_c(caller: int | None, context: int | None, *args: int) -> int:
            return handler(caller or 0, context or 0, *args[:arity])

        _native_handlers[handle] = c_handler = HANDLER(from_c)
        native = fast.handler(name, c_handler, handle, _finalize)
        if native is None:
            _native_handlers.pop(handle, None)
    if native is not None:
        callback, env, finalizer = native
    module_bytes, name_bytes = module.encode(), name.encode()
    error = ffi.wasmtime_linker_define_func_unchecked(
        linker.ptr(), module_bytes, len(module_bytes), name_bytes, len(name_bytes), ty.ptr(),
        callback, env, finalizer)
    if error:
        if native is not None:
            finalizer(env)  # type: ignore[operator]  # C's, which also drops the handler
        _handlers.pop(handle, None)
        raise wasmtime.WasmtimeError._from_ptr(error)


def caller_context(caller: int) -> int:
    """The address of the caller's store context: stable for the Store's life, so it keys
    per-store state (see `store_key`)."""
    return _caller_context(caller) or 0


def caller_memory(caller: int, context: int) -> tuple[int, int, int] | None:
    """(base address, size in bytes, wasmtime's id of its store) of the caller's exported
    `memory`, or None."""
    item = ffi.wasmtime_extern_t()
    if not _caller_export_get(caller, _MEMORY_NAME, len(_MEMORY_NAME), ctypes.addressof(item)):
        return None
    if item.kind != _EXTERN_MEMORY:
        return None
    memory = ctypes.addressof(item.of.memory)
    return (_memory_data(context, memory) or 0, _memory_data_size(context, memory),
            item.of.memory._anon_1.store_id)


def store_key(store: wasmtime.Store) -> int:
    """The same key as `caller_context` gives inside a call from this store."""
    return ctypes.cast(store._context(), _c).value or 0
