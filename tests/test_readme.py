"""The README's Python example runs as written, from the repository root."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_python_example(guests: dict[str, Path], example_assets: Path) -> None:
    readme = (REPO / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr
    first, *rest = result.stdout.splitlines()
    assert first == "0 1: Egyptian cat (class 285, p=0.4267)"
    assert rest[:1] == ["1: Egyptian cat (class 285, p=0.4267)"]
    assert rest[-1] == "None"
