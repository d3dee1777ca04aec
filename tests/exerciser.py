"""Drive guests/abi_exerciser.wasm from tests: raw ex_* calls plus typed helpers.

The exerciser is a WASI reactor whose `ex_<name>` exports forward their u32 arguments unchanged
to the `wasi_ephemeral_nn` import `<name>` and return its errno, so every call here goes through
a real guest, the real Linker and the real host functions.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import wasmtime

from wasinn.abi import NnState, WitxAbi
from wasinn.host import Host

U32_MAX = 0xFFFFFFFF

#: the witx `tensor` struct: dims_ptr, dims_len, type (one byte + 3 bytes padding), data_ptr,
#: data_len
TENSOR = struct.Struct("<IIB3xII")
BUILDER = struct.Struct("<II")

#: every ex_* export and its arity: the same as the import it forwards to (the guest's own
#: import declarations are the independent check: linking fails if an arity differs)
FUNCTIONS: dict[str, int] = WitxAbi.FUNCTIONS

ENCODING_ONNX = 1
TARGET_CPU = 0

#: tensor_type codes
CURRENT = {"f16": 0, "f32": 1, "f64": 2, "u8": 3, "i32": 4, "i64": 5}
LEGACY = {"f16": 0, "f32": 1, "u8": 2, "i32": 3, "i64": 4}


class Exerciser:
    """One instance of the exerciser in its own Store (given to `host.add_to_store`)."""

    def __init__(self, host: Host, module: wasmtime.Module, *, store: wasmtime.Store | None = None,
                 register: bool = True) -> None:
        self.host = host
        if store is None:
            store = wasmtime.Store(host.engine)
            if register:
                self.state: NnState | None = host.add_to_store(store)
            else:
                self.state = None
                # the Host's engine runs with epoch interruption: without a deadline the guest
                # would be interrupted at its first instruction, before reaching wasi-nn
                store.set_epoch_deadline(1 << 62)
        else:
            self.state = None
        self.store = store
        self.linker = host.linker(wasi=False)
        self.instance = self.linker.instantiate(store, module)
        self.exports = self.instance.exports(store)
        self.memory: wasmtime.Memory = self.exports["memory"]
        self.exports["_initialize"](store)
        self._allocated: list[int] = []

    # --- raw access -----------------------------------------------------------------------

    def raw(self, name: str, *args: int) -> int:
        """Call ex_<name> with the given values taken as u32; return the errno (a Python int)."""
        assert len(args) == FUNCTIONS[name], (name, args)
        result = self.exports[f"ex_{name}"](self.store, *[a & U32_MAX for a in args])
        assert isinstance(result, int), result
        return result

    @property
    def mem_size(self) -> int:
        size = self.exports["ex_mem_size"](self.store) & U32_MAX
        assert size == self.memory.data_len(self.store)
        return size

    @property
    def last_error(self) -> str | None:
        return None if self.state is None else self.state.last_error

    def alloc(self, size: int) -> int:
        ptr = self.exports["ex_alloc"](self.store, max(size, 1)) & U32_MAX
        assert ptr != 0, f"guest malloc({size}) failed"
        self._allocated.append(ptr)
        return ptr

    def free_all(self) -> None:
        for ptr in self._allocated:
            self.exports["ex_free"](self.store, ptr)
        self._allocated.clear()

    def write(self, ptr: int, data: bytes) -> None:
        if data:
            self.memory.write(self.store, data, ptr)

    def read(self, ptr: int, length: int) -> bytes:
        return bytes(self.memory.read(self.store, ptr, ptr + length))

    def put(self, data: bytes) -> int:
        """Copy `data` into freshly malloc'd guest memory; return its address."""
        ptr = self.alloc(len(data))
        self.write(ptr, data)
        return ptr

    def write_u32(self, ptr: int, value: int) -> None:
        self.write(ptr, struct.pack("<I", value & U32_MAX))

    def read_u32(self, ptr: int) -> int:
        return struct.unpack("<I", self.read(ptr, 4))[0]

    def out_slot(self, fill: int = 0xDEADBEEF) -> int:
        """A 4-byte slot for a handle or a size, pre-filled so that writes are visible."""
        ptr = self.alloc(4)
        self.write_u32(ptr, fill)
        return ptr

    def put_tensor(self, dims: Sequence[int], type_code: int, data: bytes, *,
                   padding: bytes = b"\0\0\0", dims_len: int | None = None,
                   data_len: int | None = None) -> int:
        """Write dims, data and the 20-byte tensor struct; return the struct's address."""
        dims_ptr = self.put(struct.pack(f"<{len(dims)}I", *dims))
        data_ptr = self.put(data)
        raw = bytearray(TENSOR.pack(dims_ptr, len(dims) if dims_len is None else dims_len,
                                    type_code, data_ptr,
                                    len(data) if data_len is None else data_len))
        raw[9:12] = padding
        return self.put(bytes(raw))

    # --- typed helpers --------------------------------------------------------------------

    def load(self, model: bytes, encoding: int = ENCODING_ONNX,
             target: int = TARGET_CPU) -> tuple[int, int | None]:
        builders = self.put(BUILDER.pack(self.put(model), len(model)))
        out = self.out_slot()
        errno = self.raw("load", builders, 1, encoding, target, out)
        return errno, (self.read_u32(out) if errno == 0 else None)

    def load_by_name(self, name: str | bytes) -> tuple[int, int | None]:
        raw = name.encode() if isinstance(name, str) else name
        out = self.out_slot()
        errno = self.raw("load_by_name", self.put(raw), len(raw), out)
        return errno, (self.read_u32(out) if errno == 0 else None)

    def load_by_name_with_config(self, name: str, config: bytes) -> tuple[int, int | None]:
        raw = name.encode()
        out = self.out_slot()
        errno = self.raw("load_by_name_with_config", self.put(raw), len(raw), self.put(config),
                         len(config), out)
        return errno, (self.read_u32(out) if errno == 0 else None)

    def init(self, graph: int) -> tuple[int, int | None]:
        out = self.out_slot()
        errno = self.raw("init_execution_context", graph, out)
        return errno, (self.read_u32(out) if errno == 0 else None)

    def set_input(self, ctx: int, index: int, type_code: int, array: np.ndarray, **kw) -> int:
        array = np.ascontiguousarray(array)
        dims = kw.pop("dims", array.shape)
        return self.raw("set_input", ctx, index,
                        self.put_tensor(dims, type_code, array.tobytes(), **kw))

    def get_output(self, ctx: int, index: int, out_max: int,
                   single: bool = False) -> tuple[int, bytes | None, int]:
        """(errno, the bytes written or None, the value left in written_out)."""
        out = self.alloc(out_max) if out_max else self.alloc(1)
        written = self.out_slot()
        errno = self.raw("get_output_single" if single else "get_output", ctx, index, out,
                         out_max, written)
        size = self.read_u32(written)
        return errno, (self.read(out, size) if errno == 0 else None), size

    def infer(self, graph: int, inputs: Sequence[tuple[int, np.ndarray]],
              outputs: Sequence[int]) -> list[bytes]:
        """A full valid round: context, every input, compute, each output by its exact size."""
        errno, ctx = self.init(graph)
        assert errno == 0, self.last_error
        for index, (type_code, array) in enumerate(inputs):
            assert self.set_input(ctx, index, type_code, array) == 0, self.last_error
        assert self.raw("compute", ctx) == 0, self.last_error
        results = []
        for index, nbytes in enumerate(outputs):
            errno, data, written = self.get_output(ctx, index, nbytes)
            assert errno == 0, self.last_error
            assert written == nbytes
            results.append(data)
        assert self.raw("finalize_execution_context", ctx) == 0, self.last_error
        return results


def add_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, y and the exact x + y for the `add` model (float32 [2, 3])."""
    x = np.array([[1.5, -2.0, 3.25], [0.0, 1e6, -7.5]], dtype=np.float32)
    y = np.array([[0.5, 4.0, -1.25], [2.0, 1.0, 7.5]], dtype=np.float32)
    return x, y, x + y


def check_add(ex: Exerciser, graph: int) -> None:
    """A known-good inference: `add` gives exactly x + y."""
    x, y, z = add_inputs()
    (out,) = ex.infer(graph, [(CURRENT["f32"], x), (CURRENT["f32"], y)], [z.nbytes])
    assert out == z.tobytes()
