"""The record a pre-initialized module carries: which named graphs its snapshot holds handles to.

It lives in a custom section (`wasinn-preinit`) as JSON:
    {"format": 1, "graphs": [{"handle": 0, "name": "add", "config": null}], "next_graph": 1}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ._wasm import WasmFormatError, find_custom

SECTION = "wasinn-preinit"
FORMAT = 1


class PreinitError(ValueError):
    """A module cannot be pre-initialized, or a pre-initialized module cannot start here."""


@dataclass(frozen=True)
class GraphBinding:
    """A graph handle the snapshot holds: `handle` must mean the model `name` again."""

    handle: int
    name: str
    #: load_by_name_with_config's JSON object, or None for plain load_by_name
    config: dict[str, Any] | None = None


@dataclass(frozen=True)
class PreinitRecord:
    graphs: tuple[GraphBinding, ...] = ()
    #: the handle the next load will get, as it would have in the instance that was snapshotted
    next_graph: int = 0
    format: int = FORMAT

    def to_json(self) -> bytes:
        return json.dumps({"format": self.format, "next_graph": self.next_graph,
                           "graphs": [{"handle": g.handle, "name": g.name, "config": g.config}
                                      for g in self.graphs]}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> PreinitRecord:
        try:
            data = json.loads(raw)
            if data["format"] != FORMAT:
                raise PreinitError(f"the module's {SECTION} record has format {data['format']}, "
                                   f"this wasinn reads format {FORMAT}: pre-initialize it again")
            graphs = tuple(_binding(g) for g in data["graphs"])
            next_graph = data["next_graph"]
            if not isinstance(next_graph, int) or next_graph < 0:
                raise TypeError("next_graph")
        except PreinitError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise PreinitError(f"the module's {SECTION} record is malformed ({e})") from None
        return cls(graphs, next_graph)


def _binding(entry: Any) -> GraphBinding:
    handle, name, config = entry["handle"], entry["name"], entry["config"]
    if not (isinstance(handle, int) and 0 <= handle <= 0xFFFFFFFF and isinstance(name, str)
            and (config is None or isinstance(config, dict))):
        raise TypeError(f"bad graph entry {entry!r}")
    return GraphBinding(handle, name, config)


def read_record(wasm: bytes) -> PreinitRecord | None:
    """The record of a pre-initialized module, or None for any other module. Cheap: it walks
    section headers only."""
    try:
        raw = find_custom(wasm, SECTION)
    except WasmFormatError:
        return None  # not ours to judge: compiling the module reports what is wrong
    return None if raw is None else PreinitRecord.from_json(raw)
