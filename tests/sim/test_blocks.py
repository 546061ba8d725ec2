"""Block manager: storage events, exact eviction order, leaves before parents, ref counts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.events.types import AllBlocksCleared, BlockRemoved, BlockStored, EngineHash
from kvgate.sim.blocks import BlockTable, PrefixCache, block_id

BS = 4


def tokens(*blocks: int) -> list[int]:
    """Tokens whose i-th block is four copies of ``blocks[i]``: block content is easy to name."""
    return [b for b in blocks for _ in range(BS)]


def ids(*blocks: int) -> list[EngineHash]:
    out: list[EngineHash] = []
    parent: EngineHash | None = None
    for b in blocks:
        parent = block_id(parent, [b] * BS)
        out.append(parent)
    return out


def run(cache: PrefixCache, toks: list[int]) -> BlockTable:
    """Admit a request for ``toks`` using whatever prefix is cached, compute it, commit it."""
    table = BlockTable()
    hits = cache.match_prefix(table, toks, len(toks) // BS)
    assert cache.admit(table, hits, len(toks), reserve=0)
    cache.commit(table, toks, len(toks))
    return table


def test_store_emits_parent_chained_event_with_tokens() -> None:
    cache = PrefixCache(num_blocks=8, block_size=BS)
    run(cache, tokens(1, 2, 3))
    [event] = cache.take_events()
    assert event == BlockStored(
        block_hashes=ids(1, 2, 3),
        parent_block_hash=None,
        token_ids=tokens(1, 2, 3),
        block_size=BS,
        medium="GPU",
    )


def test_block_ids_are_content_addressed_and_chained() -> None:
    assert ids(1, 2) == ids(1, 2)
    assert ids(1, 2)[1] != ids(3, 2)[1], "same tokens after a different parent"
    assert block_id(None, [1, 2]) != block_id(None, [2, 1])


def test_extension_names_the_cached_parent() -> None:
    cache = PrefixCache(num_blocks=8, block_size=BS)
    cache.release(run(cache, tokens(1, 2)))
    cache.take_events()
    run(cache, tokens(1, 2, 3, 4))
    [event] = cache.take_events()
    assert isinstance(event, BlockStored)
    assert event.parent_block_hash == ids(1, 2)[1]
    assert event.block_hashes == ids(1, 2, 3, 4)[2:]
    assert event.token_ids == tokens(3, 4)


def test_partial_block_is_private_and_never_stored() -> None:
    cache = PrefixCache(num_blocks=8, block_size=BS)
    table = run(cache, [*tokens(1), 9, 9])
    assert (table.num_held, table.num_committed) == (2, 1)
    assert cache.num_cached_blocks == 1
    cache.release(table)
    assert cache.num_free_blocks == 8


def test_eviction_takes_least_recently_released_leaf_first() -> None:
    cache = PrefixCache(num_blocks=5, block_size=BS)
    a = run(cache, tokens(1, 2, 3))
    b = run(cache, tokens(4, 5))
    cache.release(a)
    cache.release(b)
    a1, a2, a3 = ids(1, 2, 3)
    b1, b2 = ids(4, 5)
    assert cache.eviction_order() == [a3, a2, a1, b2, b1]
    cache.take_events()

    run(cache, tokens(7, 8))
    removed, stored = cache.take_events()
    assert removed == BlockRemoved(block_hashes=[a3, a2], medium="GPU")
    assert isinstance(stored, BlockStored)
    assert not cache.contains(a3) and not cache.contains(a2) and cache.contains(a1)


def test_shared_parent_outlives_its_children() -> None:
    cache = PrefixCache(num_blocks=4, block_size=BS)
    x = run(cache, tokens(1, 2))
    y = run(cache, tokens(1, 3))
    p, c1 = ids(1, 2)
    c2 = ids(1, 3)[1]
    assert cache.ref_count(p) == 2
    cache.release(x)
    assert cache.ref_count(p) == 1 and cache.eviction_order() == [c1]
    cache.release(y)
    assert cache.eviction_order() == [c1, c2, p]


def test_reused_parent_moves_behind_its_cached_children() -> None:
    cache = PrefixCache(num_blocks=4, block_size=BS)
    cache.release(run(cache, tokens(1, 2, 3)))
    # A shorter request re-uses (touches) the first block only.
    cache.release(run(cache, [*tokens(1), 5]))
    p, c, g = ids(1, 2, 3)
    assert cache.eviction_order() == [g, c, p]


def test_prefix_hit_reactivates_without_events() -> None:
    cache = PrefixCache(num_blocks=4, block_size=BS)
    cache.release(run(cache, tokens(1, 2)))
    cache.take_events()
    table = BlockTable()
    assert cache.match_prefix(table, tokens(1, 2, 3), 3) == 2
    assert cache.admit(table, 2, 12, reserve=0)
    assert cache.eviction_order() == []
    assert cache.ref_count(ids(1)[0]) == 1
    assert cache.take_events() == []


def test_same_content_computed_twice_is_stored_once() -> None:
    cache = PrefixCache(num_blocks=6, block_size=BS)
    first, second = BlockTable(), BlockTable()
    # Both admitted before either computed anything: neither sees a cached prefix.
    assert cache.admit(first, 0, 8, reserve=0)
    assert cache.admit(second, 0, 8, reserve=0)
    assert cache.num_free_blocks == 2
    cache.commit(first, tokens(1, 2), 8)
    cache.commit(second, tokens(1, 2), 8)
    assert len(cache.take_events()) == 1
    assert cache.num_free_blocks == 4, "the duplicate blocks went back to the pool"
    assert [cache.ref_count(h) for h in ids(1, 2)] == [2, 2]


def test_admit_refuses_without_side_effects() -> None:
    cache = PrefixCache(num_blocks=4, block_size=BS)
    cache.release(run(cache, tokens(1, 2)))
    cache.take_events()
    table = BlockTable()
    hits = cache.match_prefix(table, tokens(1, 2, 3, 4, 5), 5)
    assert not cache.admit(table, hits, 20, reserve=0), "needs 5 blocks, has 4"
    assert cache.eviction_order() == ids(1, 2)[::-1]
    assert cache.take_events() == []
    assert not cache.admit(BlockTable(), 0, 12, reserve=2), "3 + watermark 2 > 4"


def test_grow_allocates_per_block_boundary() -> None:
    cache = PrefixCache(num_blocks=2, block_size=BS)
    table = BlockTable()
    assert cache.admit(table, 0, 3, reserve=0)
    assert cache.grow(table, 4) and table.num_held == 1
    assert cache.grow(table, 5) and table.num_held == 2
    assert not cache.grow(table, 9) and table.num_held == 2


def test_reset_only_when_idle() -> None:
    cache = PrefixCache(num_blocks=4, block_size=BS)
    table = run(cache, tokens(1))
    cache.take_events()
    assert not cache.reset()
    cache.release(table)
    assert cache.reset()
    assert cache.take_events() == [AllBlocksCleared()]
    assert cache.num_cached_blocks == 0 and cache.num_free_blocks == 4


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.lists(st.integers(0, 2), min_size=1, max_size=5)),
        min_size=1,
        max_size=40,
    )
)
def test_random_workloads_keep_accounting_and_never_orphan_a_child(
    ops: list[tuple[bool, list[int]]],
) -> None:
    """Requests over a tiny alphabet share prefixes heavily; some stay active, most finish."""
    cache = PrefixCache(num_blocks=6, block_size=BS)
    active: list[BlockTable] = []
    parent_of: dict[EngineHash, EngineHash | None] = {}
    for keep, blocks in ops:
        toks = tokens(*blocks)
        table = BlockTable()
        hits = cache.match_prefix(table, toks, len(blocks))
        if not cache.admit(table, hits, len(toks), reserve=0):
            if active:
                cache.release(active.pop(0))
            continue
        cache.commit(table, toks, len(toks))
        if keep:
            active.append(table)
        else:
            cache.release(table)
        for event in cache.take_events():
            if isinstance(event, BlockStored):
                parent = event.parent_block_hash
                for h in event.block_hashes:
                    parent_of[h] = parent
                    parent = h
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    assert not any(p == h and cache.contains(c) for c, p in parent_of.items()), (
                        "a parent was evicted while a child stayed cached"
                    )
                    del parent_of[h]
        assert set(parent_of) == {h for h in parent_of if cache.contains(h)}
        assert len(parent_of) == cache.num_cached_blocks
        private = sum(t.num_held - t.num_committed for t in active)
        in_use = cache.num_blocks - cache.num_free_blocks
        active_cached = sum(1 for h in parent_of if cache.ref_count(h) > 0)
        assert in_use == private + active_cached
