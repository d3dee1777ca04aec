"""Reading a backend's execution context from tests."""

from __future__ import annotations

import numpy as np

from wasinn.errors import InvalidArgument


def outputs_of(ctx) -> list[np.ndarray]:
    """Every output of a computed context, by index until the backend says there is no more."""
    outputs = []
    while True:
        try:
            outputs.append(ctx.get_output(len(outputs)))
        except InvalidArgument:
            return outputs
