"""A small WebAssembly binary reader and writer: just what a snapshot rewrites.

A module is a list of sections kept as raw bytes; the global, export, memory, data, data
count, start and custom sections can be decoded and encoded again. Writing back what was read
gives the same bytes, so only the sections a snapshot changes are re-encoded.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

MAGIC = b"\0asm\x01\0\0\0"
PAGE = 65536

CUSTOM, TYPE, IMPORT, FUNCTION, TABLE, MEMORY, GLOBAL, EXPORT, START, ELEMENT, CODE, DATA, \
    DATACOUNT = range(13)

# external kinds, in imports and exports
FUNC_KIND, TABLE_KIND, MEMORY_KIND, GLOBAL_KIND = range(4)

I32, I64, F32, F64, V128 = 0x7F, 0x7E, 0x7D, 0x7C, 0x7B

_END = 0x0B


class WasmFormatError(ValueError):
    """The bytes are not a WebAssembly module this reader understands."""


# --- LEB128 -------------------------------------------------------------------------------

def uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def sleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        done = (value == 0 and not byte & 0x40) or (value == -1 and byte & 0x40)
        out.append(byte if done else byte | 0x80)
        if done:
            return bytes(out)


def name(text: str) -> bytes:
    raw = text.encode()
    return uleb(len(raw)) + raw


class Reader:
    """A cursor over bytes; every read checks the end."""

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def at_end(self) -> bool:
        return self.pos >= self.end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise WasmFormatError("unexpected end of module")
        self.pos += 1
        return self.data[self.pos - 1]

    def bytes(self, count: int) -> bytes:
        if self.pos + count > self.end:
            raise WasmFormatError("unexpected end of module")
        self.pos += count
        return bytes(self.data[self.pos - count:self.pos])

    def uleb(self) -> int:
        result = shift = 0
        while True:
            byte = self.byte()
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result
            if shift > 63:
                raise WasmFormatError("LEB128 number too long")

    def sleb(self) -> int:
        result = shift = 0
        while True:
            byte = self.byte()
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result - (1 << shift) if byte & 0x40 else result
            if shift > 70:
                raise WasmFormatError("LEB128 number too long")

    def name(self) -> str:
        raw = self.bytes(self.uleb())
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise WasmFormatError("a name is not UTF-8") from None

    def const_expr(self) -> bytes:
        """A constant expression up to and including its `end`, as raw bytes."""
        start = self.pos
        while True:
            op = self.byte()
            if op == _END:
                return bytes(self.data[start:self.pos])
            if op in (0x41, 0x42):  # i32.const, i64.const
                self.sleb()
            elif op == 0x43:
                self.bytes(4)
            elif op == 0x44:
                self.bytes(8)
            elif op in (0x23, 0xD2):  # global.get, ref.func
                self.uleb()
            elif op == 0xD0:  # ref.null heaptype
                self.sleb()
            elif op == 0xFD:  # v128.const
                if self.uleb() != 12:
                    raise WasmFormatError("unsupported SIMD op in a constant expression")
                self.bytes(16)
            elif op in (0x6A, 0x6B, 0x6C, 0x7C, 0x7D, 0x7E):  # extended-const arithmetic
                pass
            else:
                raise WasmFormatError(f"unsupported op {op:#x} in a constant expression")


# --- sections -----------------------------------------------------------------------------

@dataclass
class Section:
    id: int
    payload: bytes

    @property
    def custom_name(self) -> str | None:
        return Reader(self.payload).name() if self.id == CUSTOM else None

    def encode(self) -> bytes:
        return bytes([self.id]) + uleb(len(self.payload)) + self.payload


@dataclass
class Import:
    module: str
    name: str
    kind: int


@dataclass
class Export:
    name: str
    kind: int
    index: int


@dataclass
class Global:
    valtype: int
    mutable: bool
    init: bytes  # the constant expression, `end` included


@dataclass
class Limits:
    flags: int
    minimum: int
    maximum: int | None

    def encode(self) -> bytes:
        out = bytes([self.flags]) + uleb(self.minimum)
        return out + uleb(self.maximum) if self.maximum is not None else out


@dataclass
class DataSegment:
    """flags 0: active in memory 0; 1: passive; 2: active in memory `memory`."""

    flags: int
    data: bytes
    offset: bytes = b""  # the constant expression, for active segments
    memory: int = 0

    @property
    def passive(self) -> bool:
        return self.flags == 1

    def encode(self) -> bytes:
        if self.flags == 0:
            head = uleb(0) + self.offset
        elif self.flags == 1:
            head = uleb(1)
        else:
            head = uleb(2) + uleb(self.memory) + self.offset
        return head + uleb(len(self.data)) + self.data


def i32_const(value: int) -> bytes:
    return b"\x41" + sleb(value) + bytes([_END])


def const_of(valtype: int, value: int | float) -> bytes:
    """The constant expression that yields `value` of a numeric type."""
    if valtype == I32:
        value = int(value) & 0xFFFFFFFF
        return b"\x41" + sleb(value - (1 << 32) if value >= 1 << 31 else value) + bytes([_END])
    if valtype == I64:
        value = int(value) & 0xFFFFFFFFFFFFFFFF
        return b"\x42" + sleb(value - (1 << 64) if value >= 1 << 63 else value) + bytes([_END])
    if valtype == F32:
        return b"\x43" + struct.pack("<f", value) + bytes([_END])
    if valtype == F64:
        return b"\x44" + struct.pack("<d", value) + bytes([_END])
    raise WasmFormatError(f"no constant for value type {valtype:#x}")


class Module:
    """A module as sections. Decode one with the typed accessors; replace it with `set`."""

    def __init__(self, sections: list[Section]) -> None:
        self.sections = sections

    @classmethod
    def parse(cls, wasm: bytes) -> Module:
        if wasm[:8] != MAGIC:
            raise WasmFormatError("not a WebAssembly core module (bad magic or version)")
        reader = Reader(wasm, 8)
        sections = []
        while not reader.at_end():
            section_id = reader.byte()
            size = reader.uleb()
            sections.append(Section(section_id, reader.bytes(size)))
        return cls(sections)

    def encode(self) -> bytes:
        return MAGIC + b"".join(s.encode() for s in self.sections)

    # --- finding and replacing ------------------------------------------------------------

    def find(self, section_id: int) -> Section | None:
        return next((s for s in self.sections if s.id == section_id), None)

    def custom(self, section_name: str) -> bytes | None:
        """The payload (after its name) of the first custom section called `section_name`."""
        for section in self.sections:
            if section.id == CUSTOM:
                reader = Reader(section.payload)
                if reader.name() == section_name:
                    return section.payload[reader.pos:]
        return None

    def set(self, section_id: int, payload: bytes | None) -> None:
        """Replace a known section's payload, add it in its place, or (None) remove it."""
        for i, section in enumerate(self.sections):
            if section.id == section_id:
                if payload is None:
                    del self.sections[i]
                else:
                    section.payload = payload
                return
        if payload is None:
            return
        order = _ORDER[section_id]
        at = len(self.sections)
        for i, section in enumerate(self.sections):
            if section.id != CUSTOM and _ORDER[section.id] > order:
                at = i
                break
        self.sections.insert(at, Section(section_id, payload))

    def set_custom(self, section_name: str, payload: bytes) -> None:
        self.sections = [s for s in self.sections if s.custom_name != section_name]
        self.sections.append(Section(CUSTOM, name(section_name) + payload))

    # --- typed sections -------------------------------------------------------------------

    def imports(self) -> list[Import]:
        section = self.find(IMPORT)
        if section is None:
            return []
        reader = Reader(section.payload)
        out = []
        for _ in range(reader.uleb()):
            module, field, kind = reader.name(), reader.name(), reader.byte()
            if kind == FUNC_KIND:
                reader.uleb()
            elif kind == TABLE_KIND:
                reader.byte()
                _limits(reader)
            elif kind == MEMORY_KIND:
                _limits(reader)
            elif kind == GLOBAL_KIND:
                reader.byte()
                reader.byte()
            else:
                raise WasmFormatError(f"unsupported import kind {kind:#x} ({module}.{field})")
            out.append(Import(module, field, kind))
        return out

    def globals(self) -> list[Global]:
        section = self.find(GLOBAL)
        if section is None:
            return []
        reader = Reader(section.payload)
        out = []
        for _ in range(reader.uleb()):
            valtype = reader.byte()
            if valtype in (0x63, 0x64):  # (ref null? ht): GC-era types
                raise WasmFormatError("globals of typed reference types are not supported")
            mutable = reader.byte() == 1
            out.append(Global(valtype, mutable, reader.const_expr()))
        return out

    def set_globals(self, globals_: list[Global]) -> None:
        body = b"".join(bytes([g.valtype, int(g.mutable)]) + g.init for g in globals_)
        self.set(GLOBAL, uleb(len(globals_)) + body)

    def exports(self) -> list[Export]:
        section = self.find(EXPORT)
        if section is None:
            return []
        reader = Reader(section.payload)
        return [Export(reader.name(), reader.byte(), reader.uleb())
                for _ in range(reader.uleb())]

    def set_exports(self, exports: list[Export]) -> None:
        body = b"".join(name(e.name) + bytes([e.kind]) + uleb(e.index) for e in exports)
        self.set(EXPORT, uleb(len(exports)) + body)

    def memories(self) -> list[Limits]:
        section = self.find(MEMORY)
        if section is None:
            return []
        reader = Reader(section.payload)
        return [_limits(reader) for _ in range(reader.uleb())]

    def set_memories(self, memories: list[Limits]) -> None:
        self.set(MEMORY, uleb(len(memories)) + b"".join(m.encode() for m in memories))

    def data(self) -> list[DataSegment]:
        section = self.find(DATA)
        if section is None:
            return []
        reader = Reader(section.payload)
        out = []
        for _ in range(reader.uleb()):
            flags = reader.uleb()
            if flags == 0:
                segment = DataSegment(0, b"", reader.const_expr())
            elif flags == 1:
                segment = DataSegment(1, b"")
            elif flags == 2:
                memory = reader.uleb()
                segment = DataSegment(2, b"", reader.const_expr(), memory)
            else:
                raise WasmFormatError(f"unknown data segment flags {flags}")
            segment.data = reader.bytes(reader.uleb())
            out.append(segment)
        return out

    def set_data(self, segments: list[DataSegment]) -> None:
        self.set(DATA, uleb(len(segments)) + b"".join(s.encode() for s in segments))
        if self.find(DATACOUNT) is not None:
            self.set(DATACOUNT, uleb(len(segments)))

    def start(self) -> int | None:
        section = self.find(START)
        return None if section is None else Reader(section.payload).uleb()

    def imported_count(self, kind: int) -> int:
        return sum(1 for i in self.imports() if i.kind == kind)


def section_spans(wasm: bytes) -> Iterator[tuple[int, int, int]]:
    """(id, start, end) of each section's payload, reading only section headers."""
    if wasm[:8] != MAGIC:
        raise WasmFormatError("not a WebAssembly core module (bad magic or version)")
    reader = Reader(wasm, 8)
    while not reader.at_end():
        section_id = reader.byte()
        size = reader.uleb()
        end = reader.pos + size
        if end > len(wasm):
            raise WasmFormatError("unexpected end of module")
        yield section_id, reader.pos, end
        reader.pos = end


def find_custom(wasm: bytes, section_name: str) -> bytes | None:
    """The payload of the first custom section called `section_name`, reading only section
    headers (no copy of the others)."""
    for section_id, start, end in section_spans(wasm):
        if section_id == CUSTOM:
            inner = Reader(wasm, start, end)
            if inner.name() == section_name:
                return bytes(wasm[inner.pos:end])
    return None


def has_start(wasm: bytes) -> bool:
    """Whether the module has a start function (guest code that runs as it is instantiated)."""
    return any(section_id == START for section_id, _, _ in section_spans(wasm))


def _limits(reader: Reader) -> Limits:
    flags = reader.byte()
    if flags not in (0, 1, 2, 3):  # memory64 (4..7) and custom page sizes are not supported
        raise WasmFormatError(f"unsupported limits flags {flags:#x}")
    minimum = reader.uleb()
    return Limits(flags, minimum, reader.uleb() if flags & 1 else None)


# where each known section goes (custom sections may go anywhere)
_ORDER = {TYPE: 1, IMPORT: 2, FUNCTION: 3, TABLE: 4, MEMORY: 5, 13: 6, GLOBAL: 7, EXPORT: 8,
          START: 9, ELEMENT: 10, DATACOUNT: 11, CODE: 12, DATA: 13}
