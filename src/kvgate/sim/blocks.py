"""Paged KV cache with prefix caching, as the simulated engine's memory.

The cache has ``num_blocks`` physical blocks of ``block_size`` tokens. A physical block is

- *free*: holds nothing;
- *active*: referenced by at least one running request. A full block whose content is known is
  *committed*: it enters the prefix cache under its hash and may be shared (ref-counted); the
  request's trailing, partly filled block is private and never shared;
- *cached-inactive*: committed, no longer referenced, kept for a later prefix hit, evictable.

Only counts of free and private blocks are kept (the simulator stores no KV data), so every
operation is O(1) per block touched.

Eviction order. Inactive blocks sit in an ``OrderedDict`` in the order they were released (least
recently used first): evicting is ``popitem(last=False)`` and releasing an append, both O(1) and
in C, unlike a heap or a scan. Every request holding a block also holds its parent, and releases
its blocks leaf first, so a parent's last reference is never dropped before a cached child's.
Hence, in release order, every block comes after all of its cached descendants, and LRU eviction
removes leaves before parents without tracking children (`tests/sim/test_blocks.py` checks this
on random workloads).

Block ids. Engines name blocks with their own opaque 64-bit ids (vLLM uses SHA-256 of the parent
hash, the tokens and the block's extra keys, e.g. a request's ``cache_salt`` on its first block).
Here: CPython's hash of the tuple (parent id, *tokens), which for integers is unsalted
(independent of PYTHONHASHSEED), so ids are deterministic and content addressed (a block stored
again after eviction gets the same id, as in vLLM) yet share nothing with the router's xxh3
hashes; a salted first block adds the salt's xxh3 to the tuple. It costs 0.5 µs per block against
3.4 µs for BLAKE2b, and ids only need to be unique within one engine: ~3e-6 chance of any
collision among 10 million blocks.

Thread-safety: none; one engine, one thread (its event loop or the virtual driver).
"""

from __future__ import annotations

from collections import OrderedDict

import xxhash

from kvgate.events.types import AllBlocksCleared, BlockRemoved, BlockStored, EngineHash, KvEvent

_U64 = (1 << 64) - 1
# Parent of a first block: any constant works; this one spells "kvgsim".
_ROOT = 0x6B7667_73696D
MEDIUM_GPU = "GPU"


def block_id(parent: EngineHash | None, tokens: list[int], salt: int | None = None) -> EngineHash:
    """The engine's id for a full block of ``tokens`` following the block ``parent``; a first
    block of a request with a ``cache_salt`` is keyed with it too (``salt``: the salt's xxh3),
    as vLLM keys it, so it is another block than the unsalted one."""
    if salt is None:
        return EngineHash(hash((_ROOT if parent is None else parent, *tokens)) & _U64)
    return EngineHash(hash((_ROOT if parent is None else parent, salt, *tokens)) & _U64)


class BlockTable:
    """One request's view of the cache: which of its blocks it holds and which are committed.

    ``hashes[i]`` is the id of the request's i-th full block, computed lazily and kept across
    preemption (the content does not change). The request holds ``num_held`` blocks; the first
    ``num_committed`` of them are shared prefix-cache blocks, the rest are private.
    """

    __slots__ = ("_salt_key", "cache_salt", "hashes", "num_committed", "num_held")

    def __init__(self, cache_salt: str | None = None) -> None:
        self.cache_salt = cache_salt
        """The request's ``cache_salt``: part of its first block's id, and of that block's
        ``extra_keys`` in KV events."""
        self._salt_key = xxhash.xxh3_64_intdigest(cache_salt.encode()) if cache_salt else None
        self.hashes: list[EngineHash] = []
        self.num_held = 0
        self.num_committed = 0

    def hash_at(self, index: int, tokens: list[int], block_size: int) -> EngineHash:
        """Id of full block ``index`` of ``tokens`` (all earlier blocks must be full too)."""
        hashes = self.hashes
        while len(hashes) <= index:
            i = len(hashes)
            block = tokens[i * block_size : (i + 1) * block_size]
            if i:
                hashes.append(block_id(hashes[i - 1], block))
            else:
                hashes.append(block_id(None, block, self._salt_key))
        return hashes[index]

    def extra_keys(self, start: int, stop: int) -> list[list[str] | None] | None:
        """The ``extra_keys`` of blocks ``start..stop`` in a BlockStored event (vLLM's form)."""
        if self.cache_salt is None or start:
            return None
        return [[self.cache_salt], *[None] * (stop - 1)]


class PrefixCache:
    """Block allocator + prefix cache of one engine; emits KV events into a queue."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = num_blocks
        self._refs: dict[EngineHash, int] = {}
        self._inactive: OrderedDict[EngineHash, None] = OrderedDict()
        self._events: list[KvEvent] = []

    # -- state -----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can get: free plus evictable."""
        return self._free + len(self._inactive)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks in the prefix cache, active or not."""
        return len(self._refs)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by requests (vLLM's ``kv_cache_usage_perc``)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def contains(self, block: EngineHash) -> bool:
        return block in self._refs

    def ref_count(self, block: EngineHash) -> int:
        return self._refs.get(block, 0)

    def eviction_order(self) -> list[EngineHash]:
        """Inactive blocks, next victim first (for tests and debugging; O(n))."""
        return list(self._inactive)

    def take_events(self) -> list[KvEvent]:
        events, self._events = self._events, []
        return events

    # -- operations ------------------------------------------------------------------------

    def match_prefix(self, table: BlockTable, tokens: list[int], max_blocks: int) -> int:
        """How many leading full blocks of ``tokens`` (at most ``max_blocks``) are cached."""
        bs = self.block_size
        refs = self._refs
        n = 0
        while n < max_blocks and table.hash_at(n, tokens, bs) in refs:
            n += 1
        return n

    def admit(self, table: BlockTable, hit_blocks: int, num_tokens: int, reserve: int) -> bool:
        """Reference the request's ``hit_blocks`` cached blocks and allocate the rest.

        Succeeds only if blocks for ``num_tokens`` tokens fit while leaving ``reserve`` blocks
        (the watermark) allocatable; otherwise changes nothing.
        """
        need = -(-num_tokens // self.block_size) - hit_blocks
        hits = table.hashes[:hit_blocks]
        inactive = self._inactive
        reactivated = sum(1 for h in hits if h in inactive)
        if need + reserve > self._free + len(inactive) - reactivated:
            return False
        refs = self._refs
        for h in hits:
            if refs[h] == 0:
                del inactive[h]
            refs[h] += 1
        self._take(need)
        table.num_held = hit_blocks + need
        table.num_committed = hit_blocks
        return True

    def grow(self, table: BlockTable, num_tokens: int) -> bool:
        """Make the request's blocks cover ``num_tokens`` tokens; False (no change) if full."""
        need = -(-num_tokens // self.block_size) - table.num_held
        if need <= 0:
            return True
        if need > self._free + len(self._inactive):
            return False
        self._take(need)
        table.num_held += need
        return True

    def commit(self, table: BlockTable, tokens: list[int], num_computed: int) -> None:
        """Enter the request's newly completed blocks into the prefix cache.

        A block whose id is already cached (another request computed the same content) is
        shared instead and the request's private copy is freed, so the cache never holds two
        copies and a later eviction names the one id that routers know.
        """
        bs = self.block_size
        full = num_computed // bs
        refs = self._refs
        run_start = -1
        while table.num_committed < full:
            i = table.num_committed
            h = table.hash_at(i, tokens, bs)
            count = refs.get(h)
            if count is None:
                refs[h] = 1
                if run_start < 0:
                    run_start = i
            else:
                if count == 0:
                    del self._inactive[h]
                refs[h] = count + 1
                self._free += 1
                if run_start >= 0:
                    self._stored(table, tokens, run_start, i)
                    run_start = -1
            table.num_committed += 1
        if run_start >= 0:
            self._stored(table, tokens, run_start, full)

    def release(self, table: BlockTable) -> None:
        """Drop the request's references, leaf first; private blocks become free."""
        refs = self._refs
        inactive = self._inactive
        for h in reversed(table.hashes[: table.num_committed]):
            count = refs[h] - 1
            refs[h] = count
            if count == 0:
                inactive[h] = None
        self._free += table.num_held - table.num_committed
        table.num_held = 0
        table.num_committed = 0

    def reset(self) -> bool:
        """Forget every cached block (vLLM's reset_prefix_cache); refused while any is in use."""
        if self._free + len(self._inactive) != self.num_blocks:
            return False
        self._refs.clear()
        self._inactive.clear()
        self._free = self.num_blocks
        self._events.append(AllBlocksCleared())
        return True

    # -- internals -------------------------------------------------------------------------

    def _take(self, count: int) -> None:
        if self._free < count:
            inactive = self._inactive
            refs = self._refs
            evicted: list[EngineHash] = []
            for _ in range(count - self._free):
                h, _none = inactive.popitem(last=False)
                del refs[h]
                evicted.append(h)
            self._free += len(evicted)
            self._removed(evicted)
        self._free -= count

    def _removed(self, evicted: list[EngineHash]) -> None:
        events = self._events
        last = events[-1] if events else None
        # Evictions for several allocations of one step read as one event, like a burst in vLLM.
        if isinstance(last, BlockRemoved):
            last.block_hashes.extend(evicted)
        else:
            events.append(BlockRemoved(block_hashes=evicted, medium=MEDIUM_GPU))

    def _stored(self, table: BlockTable, tokens: list[int], start: int, stop: int) -> None:
        bs = self.block_size
        self._events.append(
            BlockStored(
                block_hashes=table.hashes[start:stop],
                parent_block_hash=table.hashes[start - 1] if start else None,
                token_ids=tokens[start * bs : stop * bs],
                block_size=bs,
                medium=MEDIUM_GPU,
                extra_keys=table.extra_keys(start, stop),
            )
        )
