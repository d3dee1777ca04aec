"""ABI glue between guests and backends."""

from .witx import MODULE, Limits, NnState, WitxAbi

__all__ = ["MODULE", "Limits", "NnState", "WitxAbi"]
