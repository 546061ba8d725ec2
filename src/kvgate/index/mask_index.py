"""Sequence hash → bitmask of worker slots: the structure every prefix matcher here shares.

The exact index (`PrefixIndex`), the approximate one (`ApproxPrefixIndex`) and the router's
active-block tracker (`kvgate.scheduling.active.ActiveBlocks`) all answer one question: how many
leading blocks of a request does each worker hold? Each keeps one flat dict from a block's
sequence hash to the bitmask of the worker slots holding it, and matching ANDs masks along the
request (see `find_matches`). What differs is only how bits are set and cleared, so that is left
to subclasses, under this contract:

- ``masks`` is the dict itself, public so that a subclass's hot loops set bits inline
  (``masks[h] = masks.get(h, 0) | bit``); a stored mask is never 0: clear bits with `drop_bit`,
  which deletes an entry once its last bit goes.
- `slot` gives a worker its slot, on first use a released one if any (else a new one), and
  then calls `on_new_slot`, the hook where a subclass sizes its per-slot state.
  `release_slot` frees the slot for reuse; the subclass must have dropped the worker's bits
  first.
- Slot bookkeeping (which worker has which slot) is private to this class: read it through
  `slot_of`, `slots`, `workers` and ``in``.

Thread-safety: none; owned by one asyncio loop, like its subclasses.
"""

from __future__ import annotations

from collections.abc import Callable, ItemsView, Sequence
from itertools import islice

_leading_runs: Callable[[dict[int, int], Sequence[int]], list[tuple[int, int]]] | None
_count_in: Callable[[dict[int, int], dict[int, int], Sequence[int], int], None] | None
_count_out: (
    Callable[
        [dict[int, int], dict[int, int], dict[int, int], Callable[[int], int], Sequence[int], int],
        None,
    ]
    | None
)
try:  # the native loops (`_leading.c`); optional, the Python loops give the same answers
    from kvgate.index._leading import count_in as _count_in
    from kvgate.index._leading import count_out as _count_out
    from kvgate.index._leading import leading_runs as _leading_runs
except ImportError:  # pragma: no cover - depends on the build
    _leading_runs = _count_in = _count_out = None

NATIVE_MATCHING = _leading_runs is not None
_SHARED_MASKS = 1 << 16

WorkerId = str

__all__ = ["NATIVE_MATCHING", "MaskIndex", "WorkerId"]


class MaskIndex:
    """Sequence hash → worker bitmask, with slot bookkeeping (see the module docstring)."""

    def __init__(self) -> None:
        # 64 workers fit in one machine word, but Python ints grow as needed: slots beyond 63
        # just make the masks two words long.
        self.masks: dict[int, int] = {}
        """Sequence hash → bitmask of the slots holding that block; never 0."""
        self.shared_masks: dict[int, int] = {}
        """Mask → the one int object used for it (see `share`); hot loops may read it inline."""
        self._slot_of: dict[WorkerId, int] = {}
        self._worker_at: list[WorkerId | None] = []
        self._free_slots: list[int] = []

    def slot(self, worker: WorkerId) -> int:
        """The worker's slot (its bit is ``1 << slot``), allocated on first use."""
        slot = self._slot_of.get(worker)
        if slot is None:
            if self._free_slots:
                slot = self._free_slots.pop()
                self._worker_at[slot] = worker
            else:
                slot = len(self._worker_at)
                self._worker_at.append(worker)
            self._slot_of[worker] = slot
            self.on_new_slot(slot)
        return slot

    def on_new_slot(self, slot: int) -> None:
        """Called when `slot` is handed to a worker (fresh, or reused after `release_slot`)."""

    def slot_of(self, worker: WorkerId) -> int | None:
        """The worker's slot, or None when it has none (never allocates)."""
        return self._slot_of.get(worker)

    def slots(self) -> ItemsView[WorkerId, int]:
        """(worker, slot) of every worker holding a slot."""
        return self._slot_of.items()

    def release_slot(self, worker: WorkerId) -> int | None:
        """Free the worker's slot for reuse; returns it (None when the worker had none)."""
        slot = self._slot_of.pop(worker, None)
        if slot is not None:
            self._worker_at[slot] = None
            self._free_slots.append(slot)
        return slot

    def share(self, mask: int) -> int:
        """An int equal to ``mask``, the same object for every block with the same workers.

        Workers holding the same prefixes give many blocks equal masks; one object for them all
        saves the 28-60 bytes of an int per block (a mask over 256 slots is 60). The table of
        shared masks is bounded: past ``_SHARED_MASKS`` distinct ones it starts again (the masks
        already stored stay valid, they just are not shared with later ones).
        """
        shared = self.shared_masks
        found = shared.get(mask)
        if found is not None:
            return found
        if len(shared) >= _SHARED_MASKS:
            shared.clear()
        shared[mask] = mask
        return mask

    def drop_bit(self, seq: int, bit: int) -> None:
        """Clear ``bit`` from the mask of ``seq``, deleting the entry when no bit is left."""
        masks = self.masks
        mask = masks.get(seq)
        if mask is None:
            return
        mask &= ~bit
        if mask:
            masks[seq] = self.shared_masks.get(mask) or self.share(mask)
        else:
            del masks[seq]

    def add_counted(self, counts: dict[int, int], hashes: Sequence[int], bit: int) -> None:
        """One holder more of each of ``hashes`` in ``counts`` (a subclass's per-slot reference
        counts); a block's first holder sets ``bit`` in its mask."""
        if _count_in is not None:
            _count_in(counts, self.masks, hashes, bit)
        else:
            self.add_counted_python(counts, hashes, bit)

    def add_counted_python(self, counts: dict[int, int], hashes: Sequence[int], bit: int) -> None:
        """The specification of `add_counted` (used when the native loops are not built)."""
        masks = self.masks
        for h in hashes:
            n = counts.get(h)
            if n is None:
                counts[h] = 1
                masks[h] = masks.get(h, 0) | bit
            else:
                counts[h] = n + 1

    def release_counted(self, counts: dict[int, int], hashes: Sequence[int], bit: int) -> None:
        """One holder less of each of ``hashes`` counted in ``counts``; a block's last holder
        clears ``bit`` (see `drop_bit`). Blocks not counted are skipped."""
        if _count_out is not None:
            _count_out(counts, self.masks, self.shared_masks, self.share, hashes, bit)
        else:
            self.release_counted_python(counts, hashes, bit)

    def release_counted_python(
        self, counts: dict[int, int], hashes: Sequence[int], bit: int
    ) -> None:
        """The specification of `release_counted` (used when the native loops are not built)."""
        for h in hashes:
            n = counts.get(h)
            if n is None:
                continue
            if n > 1:
                counts[h] = n - 1
            else:
                del counts[h]
                self.drop_bit(h, bit)

    def workers(self) -> list[WorkerId]:
        return list(self._slot_of)

    def __contains__(self, worker: object) -> bool:
        return worker in self._slot_of

    @property
    def num_blocks(self) -> int:
        """Distinct prefixes held by at least one worker."""
        return len(self.masks)

    def find_matches(self, hashes: Sequence[int]) -> dict[WorkerId, int]:
        """Overlap per worker: how many *leading* blocks of ``hashes`` it holds (absent = 0)."""
        if _leading_runs is not None:
            overlaps: dict[WorkerId, int] = {}
            for bits, depth in _leading_runs(self.masks, hashes):
                self._assign(overlaps, bits, depth)
            return overlaps
        return self.find_matches_python(hashes)

    def find_matches_python(self, hashes: Sequence[int]) -> dict[WorkerId, int]:
        """The specification of `find_matches` (used when the native matcher is not built)."""
        if not hashes:
            return {}
        get = self.masks.get
        mask = get(hashes[0], 0)
        if not mask:
            return {}
        overlaps: dict[WorkerId, int] = {}
        depth = 1
        for h in islice(hashes, 1, None):
            still = mask & get(h, 0)
            if still != mask:
                self._assign(overlaps, mask ^ still, depth)
                if not still:
                    return overlaps
                mask = still
            depth += 1
        self._assign(overlaps, mask, depth)
        return overlaps

    def _assign(self, overlaps: dict[WorkerId, int], bits: int, depth: int) -> None:
        worker_at = self._worker_at
        while bits:
            low = bits & -bits
            worker = worker_at[low.bit_length() - 1]
            if worker is not None:
                overlaps[worker] = depth
            bits ^= low
