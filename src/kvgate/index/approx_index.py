"""Approximate prefix index for engines that publish no KV events.

The router assumes the worker it picked will cache the request's blocks for ``ttl`` seconds
(120 s, as the reference router does); routing the same prefix again refreshes them. The index is
capped (2^20 block entries by default) and, when full, pruned to 0.8 of the cap, earliest-expiring
first.

When a worker's KV capacity is known (``record(..., capacity=)``, from its metrics), the guess
also follows the engine's eviction: a worker holds at most that many blocks, least recently
routed evicted first, and a prompt's blocks are touched back to front (as vLLM frees them) so
its tail goes before its head. A TTL alone claims blocks long evicted from a busy worker's cache
and keeps routing to them.

Expiry order comes for free: every entry lives in one dict keyed by ``(sequence hash, slot)``
packed into one int, and because the TTL is constant and time only moves forward, re-inserting on
refresh keeps that dict sorted by expiry. Expiring and pruning therefore pop from the front in
batches; nothing is ever sorted or scanned.

Time is passed in by the caller (wall clock in the EPP, virtual clock in the simulator).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice

from kvgate.index.mask_index import MaskIndex, WorkerId

DEFAULT_TTL_S = 120.0
DEFAULT_MAX_BLOCKS = 1 << 20
PRUNE_TO = 0.8
# Expired entries are swept at most this often; a lookup in between may still count an entry up
# to this much past its TTL, which is far below the precision of the TTL guess itself.
_SWEEP_INTERVAL_S = 1.0
_SLOT_BITS = 16


class ApproxPrefixIndex(MaskIndex):
    def __init__(
        self,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
    ) -> None:
        super().__init__()
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        if max_blocks <= 0:
            raise ValueError(f"max_blocks must be positive, got {max_blocks}")
        self.ttl_s = ttl_s
        self.max_blocks = max_blocks
        self._expiry: dict[int, float] = {}
        # Per slot: its block hashes, least recently routed first (dict order).
        self._recency: list[dict[int, None]] = []
        self._capacity: list[int | None] = []
        self._next_sweep = 0.0

    def on_new_slot(self, slot: int) -> None:
        if slot >= 1 << _SLOT_BITS:
            raise ValueError(f"approximate index supports at most {1 << _SLOT_BITS} workers")
        if slot == len(self._recency):
            self._recency.append({})
            self._capacity.append(None)

    @property
    def entries(self) -> int:
        return len(self._expiry)

    def size(self, worker: WorkerId) -> int:
        slot = self.slot_of(worker)
        return 0 if slot is None else len(self._recency[slot])

    def sizes(self) -> dict[WorkerId, int]:
        return {w: len(self._recency[s]) for w, s in self.slots()}

    def record(
        self, worker: WorkerId, hashes: Sequence[int], now: float, capacity: int | None = None
    ) -> None:
        """The request with these block hashes was routed to ``worker`` at ``now``;
        ``capacity``: the worker's KV cache size in blocks, if known (kept until told again)."""
        self.expire(now)
        slot = self.slot(worker)
        if capacity is not None and capacity > 0:
            self._capacity[slot] = capacity
        bit = 1 << slot
        expires = now + self.ttl_s
        expiry = self._expiry
        recency = self._recency[slot]
        masks = self.masks
        for h in reversed(hashes):
            key = (h << _SLOT_BITS) | slot
            if expiry.pop(key, None) is None:
                masks[h] = masks.get(h, 0) | bit
            else:
                del recency[h]
            expiry[key] = expires
            recency[h] = None
        limit = self._capacity[slot]
        if limit is not None and len(recency) > limit:
            self._evict(slot, len(recency) - limit)
        if len(expiry) > self.max_blocks:
            self._pop_oldest(len(expiry) - int(self.max_blocks * PRUNE_TO))

    def _evict(self, slot: int, count: int) -> None:
        """Drop ``slot``'s ``count`` least recently routed blocks (its cache is full)."""
        recency = self._recency[slot]
        expiry = self._expiry
        bit = 1 << slot
        for h in list(islice(recency, count)):
            del recency[h]
            del expiry[(h << _SLOT_BITS) | slot]
            self.drop_bit(h, bit)

    def expire(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_INTERVAL_S
        expired = 0
        for deadline in self._expiry.values():
            if deadline > now:
                break
            expired += 1
        if expired:
            self._pop_oldest(expired)

    def _pop_oldest(self, count: int) -> None:
        expiry = self._expiry
        mask_low = (1 << _SLOT_BITS) - 1
        recency = self._recency
        for key in list(islice(expiry, count)):
            del expiry[key]
            slot = key & mask_low
            h = key >> _SLOT_BITS
            del recency[slot][h]
            self.drop_bit(h, 1 << slot)

    def find_matches_at(self, hashes: Sequence[int], now: float) -> dict[WorkerId, int]:
        self.expire(now)
        return self.find_matches(hashes)

    def remove_worker(self, worker: WorkerId) -> None:
        slot = self.slot_of(worker)
        self.clear_worker(worker)
        if slot is not None:
            self._capacity[slot] = None
        self.release_slot(worker)

    def clear_worker(self, worker: WorkerId) -> None:
        slot = self.slot_of(worker)
        if slot is None:
            return
        bit = 1 << slot
        expiry = self._expiry
        recency = self._recency[slot]
        for h in recency:
            del expiry[(h << _SLOT_BITS) | slot]
            self.drop_bit(h, bit)
        recency.clear()
