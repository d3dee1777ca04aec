"""Autodetect (encoding 5): the backend is chosen from the model's own bytes, then asked for
by its encoding through the host's Backends, so a framework that is not installed still says
which extra to install. Only the format is read here: no framework is imported."""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from ..errors import InvalidArgument, InvalidEncoding, NotFound
from ..tensor import ExecutionTarget, GraphEncoding

if TYPE_CHECKING:
    from . import Backends, Graph

_HEAD = 4096  # enough for every magic number and an XML prolog
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a first entry, or an empty archive
#: `<net` as the root element, after an optional BOM, XML declaration and comments
_OPENVINO_IR = re.compile(rb"^(\xef\xbb\xbf)?\s*(<\?xml[^>]*\?>\s*)?(<!--.*?-->\s*)*<net[\s>/]",
                          re.DOTALL)
#: ModelProto's fields (onnx.proto) and their wire types: 0 varint, 2 length-delimited
_ONNX_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_ONNX_IR_VERSION, _ONNX_GRAPH = 1, 7
#: a real ModelProto has a few dozen top-level fields; this bounds the walk over random bytes
_ONNX_MAX_FIELDS = 10_000


def detect_encoding(builders: Sequence[bytes | bytearray | memoryview]) -> GraphEncoding:
    """The encoding of a model given as load's builders (builder 0 decides)."""
    if not builders:
        raise InvalidArgument("autodetect needs at least one builder (the model's bytes)")
    return _detect(_BufferReader(builders[0]), len(builders))


def detect_encoding_of_files(paths: Sequence[Path]) -> GraphEncoding:
    """The encoding of a model given as files (the first decides); only what is needed is read."""
    if not paths:
        raise InvalidArgument("autodetect needs the model's file(s); a graph directory has no "
                              "fixed names for it: name the encoding (e.g. onnx::DIR)")
    with open(paths[0], "rb") as first:
        return _detect(first, len(paths))


def torch_zip_kind(file: BinaryIO) -> Literal["torchscript", "checkpoint"] | None:
    """A torch zip archive's kind from its entry names: TorchScript (torch.jit.save: code/ and
    constants.pkl), a checkpoint (torch.save: data.pkl alone), or None (no torch zip)."""
    file.seek(0)
    if file.read(4) not in _ZIP_MAGIC:
        return None
    try:
        with zipfile.ZipFile(file) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    # torch puts every entry under one top folder: archive/data.pkl, archive/code/__torch__.py
    tails = {name.partition("/")[2] for name in names}
    if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
        return "torchscript"
    if "data.pkl" in tails:
        return "checkpoint"
    return None


def _detect(file: BinaryIO, count: int) -> GraphEncoding:
    file.seek(0)
    head = file.read(_HEAD)
    if head[:4] == b"GGUF":
        return GraphEncoding.GGML
    if head[4:8] == b"TFL3":  # the FlatBuffer file identifier after the root table offset
        return GraphEncoding.TENSORFLOWLITE
    zip_kind = torch_zip_kind(file)
    if zip_kind == "torchscript":
        return GraphEncoding.PYTORCH
    if zip_kind == "checkpoint":
        raise InvalidEncoding("autodetect: a torch.save checkpoint, not TorchScript: save the "
                              "model with torch.jit.save(torch.jit.trace(model, example))")
    if _OPENVINO_IR.match(head):
        if count != 2:
            raise InvalidArgument(f"autodetect: an OpenVINO IR takes two builders (the .xml "
                                  f"and the .bin), got {count}")
        return GraphEncoding.OPENVINO
    if _is_onnx(file):
        return GraphEncoding.ONNX
    raise InvalidEncoding(
        "autodetect: the model is none of GGUF, TFLite, TorchScript, OpenVINO IR or ONNX "
        f"(it starts {head[:16].hex(' ')})")


def _is_onnx(file: BinaryIO) -> bool:
    """The whole input is one protobuf ModelProto at the top level: every field well-formed,
    ModelProto's own fields with their wire types, ir_version and graph present. Nested
    messages are skipped, not parsed."""
    file.seek(0, io.SEEK_END)
    end = file.tell()
    file.seek(0)
    seen: set[int] = set()
    for _ in range(_ONNX_MAX_FIELDS):
        position = file.tell()
        if position == end:
            return _ONNX_IR_VERSION in seen and _ONNX_GRAPH in seen
        key = _varint(file)
        if key is None:
            return False
        number, wire_type = key >> 3, key & 7
        if number == 0 or _ONNX_FIELDS.get(number, wire_type) != wire_type:
            return False
        if wire_type == 0:
            if _varint(file) is None:
                return False
        elif wire_type == 2:
            length = _varint(file)
            if length is None or file.tell() + length > end:
                return False
            file.seek(length, io.SEEK_CUR)
        elif wire_type in (1, 5):  # fixed 64 / 32 bits (unknown fields only)
            size = 8 if wire_type == 1 else 4
            if file.tell() + size > end:
                return False
            file.seek(size, io.SEEK_CUR)
        else:  # groups (3, 4) are long gone from protobuf; 6 and 7 do not exist
            return False
        seen.add(number)
    return False


def _varint(file: BinaryIO) -> int | None:
    value = shift = 0
    for _ in range(10):
        byte = file.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
    return None


class _BufferReader(io.RawIOBase):
    """A seekable read-only file over a bytes-like object, without copying it (io.BytesIO
    copies a bytearray or memoryview)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._view[self._position:self._position + len(buffer)]
        memoryview(buffer).cast("B")[:len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position


class AutodetectBackend:
    """Encoding 5: detects the format, then hands the model to that encoding's backend."""

    encoding = GraphEncoding.AUTODETECT
    #: no fixed names: a graph directory cannot say which format it holds
    graph_files: tuple[str, ...] = ()

    def __init__(self, backends: Backends) -> None:
        self._backends = backends

    def load(self, builders: Sequence[bytes | memoryview], target: ExecutionTarget) -> Graph:
        return self._backends.get(detect_encoding(builders)).load(builders, target)

    def load_paths(self, paths: Sequence[Path], target: ExecutionTarget,
                   progress: Callable[[float], None] | None = None) -> Graph:
        """Files: detected from what they begin with (and a zip's directory), then opened by
        the backend itself where it can (llama.cpp maps a GGUF), else read for it."""
        from . import PathLoader

        try:
            backend = self._backends.get(detect_encoding_of_files(paths))
            if isinstance(backend, PathLoader):
                return backend.load_paths(paths, target, progress)
            builders = [path.read_bytes() for path in paths]
        except OSError as e:
            raise NotFound(f"the model cannot be read: {e}") from None
        if progress:
            progress(1.0)
        return backend.load(builders, target)
