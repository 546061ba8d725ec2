"""Approximate prefix index for engines that publish no KV events.

The router assumes the worker it picked will cache the request's blocks for ``ttl`` seconds
(120 s, as the reference router does); routing the same prefix again refreshes them. The index is
capped (2^20 block entries by default) and, when full, pruned to 0.8 of the cap, earliest-expiring
first.

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
        self._per_slot: list[int] = []
        self._next_sweep = 0.0

    def on_new_slot(self, slot: int) -> None:
        if slot >= 1 << _SLOT_BITS:
            raise ValueError(f"approximate index supports at most {1 << _SLOT_BITS} workers")
        if slot == len(self._per_slot):
            self._per_slot.append(0)

    @property
    def entries(self) -> int:
        return len(self._expiry)

    def size(self, worker: WorkerId) -> int:
        slot = self.slot_of(worker)
        return 0 if slot is None else self._per_slot[slot]

    def sizes(self) -> dict[WorkerId, int]:
        return {w: self._per_slot[s] for w, s in self.slots()}

    def record(self, worker: WorkerId, hashes: Sequence[int], now: float) -> None:
        """The request with these block hashes was routed to ``worker`` at ``now``."""
        self.expire(now)
        slot = self.slot(worker)
        bit = 1 << slot
        expires = now + self.ttl_s
        expiry = self._expiry
        masks = self.masks
        fresh = 0
        for h in hashes:
            key = (h << _SLOT_BITS) | slot
            if expiry.pop(key, None) is None:
                masks[h] = masks.get(h, 0) | bit
                fresh += 1
            expiry[key] = expires
        self._per_slot[slot] += fresh
        if len(expiry) > self.max_blocks:
            self._pop_oldest(len(expiry) - int(self.max_blocks * PRUNE_TO))

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
        for key in list(islice(expiry, count)):
            del expiry[key]
            slot = key & mask_low
            self._per_slot[slot] -= 1
            self.drop_bit(key >> _SLOT_BITS, 1 << slot)

    def find_matches_at(self, hashes: Sequence[int], now: float) -> dict[WorkerId, int]:
        self.expire(now)
        return self.find_matches(hashes)

    def remove_worker(self, worker: WorkerId) -> None:
        self.clear_worker(worker)
        self.release_slot(worker)

    def clear_worker(self, worker: WorkerId) -> None:
        slot = self.slot_of(worker)
        if slot is None:
            return
        mask_low = (1 << _SLOT_BITS) - 1
        bit = 1 << slot
        expiry = self._expiry
        # Rare (a worker leaves): one pass over the entries is acceptable here.
        for key in [k for k in expiry if k & mask_low == slot]:
            del expiry[key]
            self.drop_bit(key >> _SLOT_BITS, bit)
        self._per_slot[slot] = 0
