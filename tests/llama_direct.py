"""llama-cpp-python called directly, as the tests' reference, with the host's model params."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import llama_cpp.llama_cpp as llama_raw  # the module llama_cpp/llama.py calls its C API through


@contextlib.contextmanager
def host_model_params() -> Iterator[None]:
    """Give a `Llama` made inside this block the model params the host uses: no extra buffer
    types (llama.cpp's AMX kernels segfault on these machines, see backends/ggml.py)."""
    original = llama_raw.llama_model_default_params

    def params():  # type: ignore[no-untyped-def]
        p = original()
        p.use_extra_bufts = False
        return p

    llama_raw.llama_model_default_params = params
    try:
        yield
    finally:
        llama_raw.llama_model_default_params = original
