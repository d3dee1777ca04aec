"""The JSON settings guests hand over (load_by_name_with_config, GGML metadata)."""

from __future__ import annotations

import json
from typing import Any

from .errors import InvalidArgument


def json_object(raw: bytes | memoryview, what: str) -> dict[str, Any]:
    """A JSON object from guest bytes; empty (or NUL padding only) is `{}`. Anything else
    that is not UTF-8 JSON for an object is invalid_argument, naming `what`."""
    try:
        text = bytes(raw).decode("utf-8").strip().rstrip("\x00")
    except UnicodeDecodeError:
        raise InvalidArgument(f"{what} is not UTF-8") from None
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{what} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value
