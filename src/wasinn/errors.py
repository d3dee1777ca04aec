"""One exception hierarchy shared by every layer; each class carries its witx errno."""

from __future__ import annotations

from enum import IntEnum


class Errno(IntEnum):
    """`wasi_ephemeral_nn` errno values (witx), plus WasmEdge's GGML extensions."""

    SUCCESS = 0
    INVALID_ARGUMENT = 1
    INVALID_ENCODING = 2
    MISSING_MEMORY = 3
    BUSY = 4
    RUNTIME_ERROR = 5
    UNSUPPORTED_OPERATION = 6
    TOO_LARGE = 7
    NOT_FOUND = 8
    END_OF_SEQUENCE = 100
    CONTEXT_FULL = 101
    PROMPT_TOO_LONG = 102
    MODEL_NOT_FOUND = 103


class WasiNnError(Exception):
    """Base class: a failed wasi-nn operation. The ABI glue answers the guest with `errno`."""

    errno: Errno = Errno.RUNTIME_ERROR


class InvalidArgument(WasiNnError):
    errno = Errno.INVALID_ARGUMENT


class InvalidEncoding(WasiNnError):
    errno = Errno.INVALID_ENCODING


class MissingMemory(WasiNnError):
    errno = Errno.MISSING_MEMORY


class Busy(WasiNnError):
    errno = Errno.BUSY


class BackendError(WasiNnError):
    """A framework failed: the catch-all, mapped to runtime_error."""

    errno = Errno.RUNTIME_ERROR


class UnsupportedOperation(WasiNnError):
    errno = Errno.UNSUPPORTED_OPERATION


class TooLarge(WasiNnError):
    errno = Errno.TOO_LARGE


class NotFound(WasiNnError):
    errno = Errno.NOT_FOUND


class ConfigError(ValueError):
    """Bad host configuration (CLI flags, config file, preload specs): the user's mistake, not a guest's."""


class EndOfSequence(WasiNnError):
    """WasmEdge GGML: the stream has ended (compute_single)."""

    errno = Errno.END_OF_SEQUENCE


class ContextFull(WasiNnError):
    errno = Errno.CONTEXT_FULL


class PromptTooLong(WasiNnError):
    errno = Errno.PROMPT_TOO_LONG


class ModelNotFound(WasiNnError):
    """WasmEdge GGML: a registered model whose file cannot be opened."""

    errno = Errno.MODEL_NOT_FOUND
