"""Which workers cache which prefixes: the read side of KV-aware routing.

Layout
------
A prefix is identified by its *sequence hash* (see `kvgate.tokens.hashing`), so the index needs no
tree: one flat ``dict`` maps a sequence hash to a **bitmask of worker slots** that hold that block
(`kvgate.index.mask_index`, shared with the approximate index and the router's active blocks).
Matching a request walks its sequence hashes in order and ANDs the masks; the moment a worker's bit
drops out, its overlap is the number of blocks walked so far. One dict lookup and two integer
operations per block, whatever the number of workers — and no per-node objects, so no per-node
locks and no allocation per lookup.

Per worker slot, a second map takes the engine's opaque block id to our sequence hash: removal
events name blocks only by engine id. It is a `BlockMap` (``_blockmap.c``: an insertion-ordered
u64 → u64 table) where the extension is built, a dict otherwise or for a worker whose ids do not
fit in 64 bits; both behave alike (property tests hold them equal). The rare case of two engine
ids naming the same prefix on one worker (possible with LoRA or salted prefixes) is kept in a
sparse per-slot refcount dict, so a removal of one of them does not hide the other.

Memory: each (block, worker) entry costs one per-slot map entry (~30 bytes in a BlockMap; a dict
entry plus the engine id's int, ~80, without it), plus a share of the block dict entry (its slot
and the sequence hash's int; the mask int is shared by every block held by the same workers, see
`MaskIndex.share`). ``bytes_per_entry`` in ``kvgate microbench`` and ``benchmarks/bench_scale.py``
measure it (~63 and ~73 bytes). A cap on the number of entries bounds the whole index: when
exceeded, the largest worker forgets its newest blocks in one batch (both maps keep insertion
order; the newest are leaves, so the prefixes that remain still match), which only costs routing
quality — a missed hit — never correctness.

Thread-safety: none. The index is owned by one asyncio loop (events and lookups both run there).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kvgate.events.types import AllBlocksCleared, BlockRemoved, BlockStored, EngineHash, KvEvent
from kvgate.index.mask_index import MaskIndex, WorkerId
from kvgate.tokens.hashing import (
    BlockExtras,
    SequenceHash,
    event_extra_keys,
    lora_seed,
    sequence_hashes_of,
)

_BlockMap: Any
try:  # the compact per-worker map (`_blockmap.c`); optional, a dict behaves the same
    from kvgate.index._blockmap import BlockMap as _BlockMap
except ImportError:  # pragma: no cover - depends on the build
    _BlockMap = None

NATIVE_BLOCK_MAP = _BlockMap is not None

__all__ = ["DEFAULT_MAX_ENTRIES", "NATIVE_BLOCK_MAP", "IndexStats", "PrefixIndex", "WorkerId"]

log = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 16 * 1024 * 1024
# When the cap is hit, trim to this fraction of it so eviction runs rarely and in batches.
_TRIM_TO = 0.9


@dataclass(slots=True)
class IndexStats:
    stored_blocks: int = 0
    removed_blocks: int = 0
    cleared: int = 0
    orphan_stores: int = 0
    malformed_stores: int = 0
    unknown_removals: int = 0
    evicted_entries: int = 0
    other_tier_events: int = 0


def _block_extras(event: BlockStored) -> BlockExtras | None:
    """The event's extra keys by block (empty: none), or None when they do not name its blocks."""
    keys = event.extra_keys
    if keys is None:
        return {}
    if not isinstance(keys, list) or len(keys) != len(event.block_hashes):
        return None
    extras: dict[int, tuple[int, ...]] = {}
    for index, block_keys in enumerate(keys):
        if block_keys is not None:
            converted = event_extra_keys(block_keys, event.lora_name)
            if converted:
                extras[index] = converted
    return extras


def _routable_tier(medium: str | None) -> bool:
    """Only blocks in the engine's GPU cache are prefix hits at prefill time; blocks offloaded to
    CPU or disk tiers (vLLM's ``medium``) must first be loaded back, so they are not indexed."""
    return medium is None or medium.upper() == "GPU"


class PrefixIndex(MaskIndex):
    """Exact index fed by engine KV events (BlockStored, BlockRemoved, AllBlocksCleared)."""

    def __init__(self, block_size: int, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        super().__init__()
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self.block_size = block_size
        self.max_entries = max_entries
        self.stats = IndexStats()
        # Per slot, engine block id → sequence hash: a `BlockMap` (u64 → u64, ~30 bytes an
        # entry), or a dict once the worker used an id or hash outside [0, 2**64).
        self._by_engine: list[Any] = []
        self._native_maps = NATIVE_BLOCK_MAP
        self._dups: list[dict[int, int]] = []
        self._entries = 0

    def on_new_slot(self, slot: int) -> None:
        if slot == len(self._by_engine):
            self._by_engine.append(self._new_map())
            self._dups.append({})

    def _new_map(self) -> Any:
        return _BlockMap() if self._native_maps else {}

    def _widen(self, slot: int) -> dict[int, int]:
        """The worker's map as a dict (same entries, same order): it must hold a key or value
        outside [0, 2**64), which only a dict can."""
        by_engine = self._by_engine[slot]
        if not isinstance(by_engine, dict):
            by_engine = self._by_engine[slot] = dict(by_engine.items())
        return by_engine

    @property
    def entries(self) -> int:
        """(block, worker) pairs held."""
        return self._entries

    def size(self, worker: WorkerId) -> int:
        slot = self.slot_of(worker)
        return 0 if slot is None else len(self._by_engine[slot])

    def sizes(self) -> dict[WorkerId, int]:
        return {w: len(self._by_engine[s]) for w, s in self.slots()}

    def apply_event(self, worker: WorkerId, event: KvEvent) -> None:
        if isinstance(event, BlockStored):
            if _routable_tier(event.medium):
                self.apply_stored(worker, event)
            else:
                self.stats.other_tier_events += 1
        elif isinstance(event, BlockRemoved):
            if _routable_tier(event.medium):
                self.apply_removed(worker, event.block_hashes)
            else:
                self.stats.other_tier_events += 1
        elif isinstance(event, AllBlocksCleared):
            self.clear_worker(worker)

    def apply_stored(self, worker: WorkerId, event: BlockStored) -> int:
        """Index the blocks of one BlockStored event; returns how many were new for the worker."""
        n = len(event.block_hashes)
        block_size = self.block_size
        if n == 0:
            return 0
        if len(event.token_ids) != n * block_size:
            self.stats.malformed_stores += 1
            log.warning(
                "worker %s: BlockStored with %d block ids but %d tokens (block size %d); skipped",
                worker,
                n,
                len(event.token_ids),
                block_size,
            )
            return 0
        extras = _block_extras(event)
        if extras is None:
            # Which block carries a salt or an image is unknown: any guess could predict a hit
            # the engine would not have.
            self.stats.malformed_stores += 1
            log.warning("worker %s: BlockStored whose extra_keys do not match its blocks", worker)
            return 0
        slot = self.slot(worker)
        by_engine = self._by_engine[slot]
        parent: SequenceHash | None = None
        if event.parent_block_hash is not None:
            known = by_engine.get(event.parent_block_hash)
            if known is None:
                # Without the parent we cannot know which prefix these blocks extend.
                self.stats.orphan_stores += 1
                log.debug("worker %s: BlockStored under unknown parent; skipped", worker)
                return 0
            parent = SequenceHash(known)
        try:
            seqs = sequence_hashes_of(
                event.token_ids, block_size, lora_seed(event.lora_name), parent, extras
            )
        except (ValueError, TypeError) as err:
            self.stats.malformed_stores += 1
            log.warning("worker %s: BlockStored with bad token ids (%s); skipped", worker, err)
            return 0
        return self._insert(slot, event.block_hashes, seqs)

    def store_hashes(
        self, worker: WorkerId, engine_hashes: Sequence[int], hashes: Sequence[int]
    ) -> int:
        """Index blocks whose sequence hashes are already known (snapshots, benchmarks)."""
        return self._insert(self.slot(worker), engine_hashes, hashes)

    def _insert(self, slot: int, engine_hashes: Sequence[int], hashes: Sequence[int]) -> int:
        by_engine = self._by_engine[slot]
        masks = self.masks
        dups = self._dups[slot]
        shared = self.shared_masks
        bit = self.share(1 << slot)
        added = 0
        for engine_hash, seq in zip(engine_hashes, hashes, strict=True):
            previous = by_engine.get(engine_hash)
            if previous is not None:
                if previous == seq:
                    continue
                # The engine reused an id for other content: forget the old meaning first.
                self._unlink(slot, previous)
                self._entries -= 1
            try:
                by_engine[engine_hash] = seq
            except (OverflowError, TypeError):
                by_engine = self._widen(slot)
                by_engine[engine_hash] = seq
            mask = masks.get(seq, 0)
            if mask & bit:
                dups[seq] = dups.get(seq, 1) + 1
            elif mask:
                mask |= bit
                masks[seq] = shared.get(mask) or self.share(mask)
            else:
                masks[seq] = bit  # the common case, a new block: one shared int per slot
            added += 1
        self._entries += added
        self.stats.stored_blocks += added
        if self._entries > self.max_entries:
            self._trim()
        return added

    def apply_removed(self, worker: WorkerId, engine_hashes: Sequence[EngineHash]) -> int:
        slot = self.slot_of(worker)
        if slot is None:
            self.stats.unknown_removals += len(engine_hashes)
            return 0
        by_engine = self._by_engine[slot]
        dups = self._dups[slot]
        masks = self.masks
        shared = self.shared_masks
        keep = ~(1 << slot)
        removed = 0
        for engine_hash in engine_hashes:
            seq = by_engine.pop(engine_hash, None)
            if seq is None:
                self.stats.unknown_removals += 1
                continue
            removed += 1
            if dups and seq in dups:
                self._unlink(slot, seq)
                continue
            # `_unlink` inline (its common case: the block held once): this runs for every
            # block every engine evicts.
            mask = masks.get(seq)
            if mask is not None:
                mask &= keep
                if mask:
                    masks[seq] = shared.get(mask) or self.share(mask)
                else:
                    del masks[seq]
        self._entries -= removed
        self.stats.removed_blocks += removed
        return removed

    def _unlink(self, slot: int, seq: int) -> None:
        dups = self._dups[slot]
        count = dups.get(seq)
        if count is not None:
            if count > 2:
                dups[seq] = count - 1
            else:
                del dups[seq]
            return
        self.drop_bit(seq, 1 << slot)

    def clear_worker(self, worker: WorkerId) -> None:
        """Forget every block of ``worker`` but keep it known (AllBlocksCleared, a seq gap)."""
        slot = self.slot_of(worker)
        if slot is None:
            return
        self._clear_slot(slot)
        self.stats.cleared += 1

    def remove_worker(self, worker: WorkerId) -> None:
        """The worker left the pool: drop its blocks and free its slot."""
        slot = self.slot_of(worker)
        if slot is None:
            return
        self._clear_slot(slot)
        self.release_slot(worker)

    def _clear_slot(self, slot: int) -> None:
        by_engine = self._by_engine[slot]
        bit = 1 << slot
        drop = self.drop_bit
        for seq in set(by_engine.values()):
            drop(seq, bit)
        self._entries -= len(by_engine)
        self._by_engine[slot] = self._new_map()
        self._dups[slot] = {}

    def _trim(self) -> None:
        target = int(self.max_entries * _TRIM_TO)
        while self._entries > target:
            slot = max((s for _, s in self.slots()), key=lambda s: len(self._by_engine[s]))
            by_engine = self._by_engine[slot]
            # Newest first: they are the leaves of the newest prefixes, so what stays is still
            # whole prefixes that match. popitem() is O(1) from the end of a dict.
            excess = min(len(by_engine), self._entries - target)
            for _ in range(excess):
                _, seq = by_engine.popitem()
                self._unlink(slot, seq)
            self._entries -= excess
            self.stats.evicted_entries += excess
        log.warning(
            "prefix index over its cap of %d entries: evicted the newest blocks of the largest "
            "workers (raise the cap if engines really hold this much)",
            self.max_entries,
        )

    def blocks_of(self, worker: WorkerId) -> Iterator[int]:
        """Sequence hashes a worker holds (for tests and debugging)."""
        slot = self.slot_of(worker)
        if slot is not None:
            yield from self._by_engine[slot].values()
