"""Small TorchScript modules (torch.jit.script, saved with torch.jit.save), outputs known exactly.

torch.jit.script reads a module's source, so the modules live in this file."""

from __future__ import annotations

import io
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor


class Add(torch.nn.Module):
    """z = x + y (any shapes that broadcast)."""

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return x + y


class Identity(torch.nn.Module):
    """The input back, any dtype: the bytes come back unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class Nested(torch.nn.Module):
    """Two inputs, three outputs in nested containers: (2x, [-y, x + y]) flattens to 2x, -y, x+y."""

    def forward(self, x: Tensor, y: Tensor) -> Tuple[Tensor, List[Tensor]]:
        return x * 2, [-y, x + y]


class Scaled(torch.nn.Module):
    """x * scale, with scale optional (1 when left unset)."""

    def forward(self, x: Tensor, scale: Optional[Tensor] = None) -> Tensor:
        if scale is None:
            return x
        return x * scale


class Repeat(torch.nn.Module):
    """forward takes an int: no tensor a guest can pass."""

    def forward(self, x: Tensor, times: int) -> Tensor:
        return x.repeat(times)


class BFloat16(torch.nn.Module):
    """An output of a dtype no witx type holds."""

    def forward(self, x: Tensor) -> Tensor:
        return x.to(torch.bfloat16)


class Named(torch.nn.Module):
    """A dict result: not a tensor, tuple or list."""

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        return {"x": x}


MODULES = {"add": Add, "identity": Identity, "nested": Nested, "scaled": Scaled,
           "repeat": Repeat, "bfloat16": BFloat16, "named": Named}


def torchscript_bytes(module: type[torch.nn.Module]) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module()), buffer)
    return buffer.getvalue()


def make_all() -> dict[str, bytes]:
    return {name: torchscript_bytes(module) for name, module in MODULES.items()}


def checkpoint_bytes() -> bytes:
    """A torch.save of weights: a torch zip archive, but no TorchScript."""
    buffer = io.BytesIO()
    torch.save({"weight": torch.ones(2)}, buffer)
    return buffer.getvalue()
