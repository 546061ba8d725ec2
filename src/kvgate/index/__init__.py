"""Prefix index: which workers cache which prefixes. No gateway imports live here."""

from kvgate.index.approx_index import ApproxPrefixIndex
from kvgate.index.mask_index import MaskIndex
from kvgate.index.prefix_index import IndexStats, PrefixIndex, WorkerId

__all__ = ["ApproxPrefixIndex", "IndexStats", "MaskIndex", "PrefixIndex", "WorkerId"]
