"""PrefixIndex: engine events in, leading overlap per worker out."""

from __future__ import annotations

import json

import pytest
from dynamo.llm import RadixTree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
)

from kvgate.events.types import AllBlocksCleared, BlockRemoved, BlockStored, EngineHash
from kvgate.index.prefix_index import PrefixIndex
from kvgate.tokens.hashing import block_hashes
from tests.index.utils import (
    BS,
    engine_id,
    engine_ids,
    leading,
    ref_chain,
    ref_local,
    ref_seq,
    stored,
    tokens_of,
)

DOC = tokens_of(seed=1, blocks=6)
DOC_SEQ = ref_seq(DOC)
DOC_IDS = engine_ids(DOC_SEQ)
OTHER = tokens_of(seed=2, blocks=6)
OTHER_SEQ = ref_seq(OTHER)


def index_with(*stores: tuple[str, BlockStored], max_entries: int | None = None) -> PrefixIndex:
    index = PrefixIndex(BS) if max_entries is None else PrefixIndex(BS, max_entries=max_entries)
    for worker, event in stores:
        index.apply_event(worker, event)
    return index


def assert_consistent(index: PrefixIndex) -> None:
    sizes = index.sizes()
    assert index.entries == sum(sizes.values())
    for worker, size in sizes.items():
        assert index.size(worker) == size == len(list(index.blocks_of(worker)))


# ---------------------------------------------------------------------------------------------
# Stored / removed / cleared


def test_sequence_hashes_of_the_test_builders_are_kvgates() -> None:
    # The builders hash independently; they must agree with what requests are hashed with.
    assert block_hashes(DOC, BS)[1] == DOC_SEQ


def test_stored_blocks_match_per_worker() -> None:
    index = index_with(("a", stored(DOC, 0, 4)), ("b", stored(DOC, 0, 2)))
    assert index.find_matches(DOC_SEQ) == {"a": 4, "b": 2}
    assert index.find_matches(DOC_SEQ[:3]) == {"a": 3, "b": 2}
    assert index.find_matches(OTHER_SEQ) == {}
    assert index.find_matches([]) == {}
    assert index.sizes() == {"a": 4, "b": 2}
    assert index.entries == 6
    assert index.num_blocks == 4
    assert index.stats.stored_blocks == 6
    assert sorted(index.workers()) == ["a", "b"]
    assert "a" in index
    assert "c" not in index


def test_removal_is_by_engine_hash_not_our_hash() -> None:
    index = index_with(("a", stored(DOC, 0, 4)), ("b", stored(DOC, 0, 4)))
    # Our own hash names nothing the engine knows about.
    assert index.apply_removed("a", [EngineHash(DOC_SEQ[2])]) == 0
    assert index.stats.unknown_removals == 1
    assert index.find_matches(DOC_SEQ) == {"a": 4, "b": 4}

    index.apply_event("a", BlockRemoved([DOC_IDS[2]]))
    assert index.find_matches(DOC_SEQ) == {"a": 2, "b": 4}
    assert index.sizes() == {"a": 3, "b": 4}
    assert index.stats.removed_blocks == 1
    assert_consistent(index)


def test_removal_from_unknown_worker_is_counted_and_harmless() -> None:
    index = index_with(("a", stored(DOC, 0, 2)))
    assert index.apply_removed("ghost", DOC_IDS[:2]) == 0
    assert index.stats.unknown_removals == 2
    assert index.find_matches(DOC_SEQ) == {"a": 2}
    assert "ghost" not in index


def test_cleared_drops_blocks_but_keeps_worker() -> None:
    index = index_with(("a", stored(DOC, 0, 4)), ("b", stored(DOC, 0, 3)))
    index.apply_event("a", AllBlocksCleared())
    assert index.find_matches(DOC_SEQ) == {"b": 3}
    assert index.sizes() == {"a": 0, "b": 3}
    assert "a" in index
    assert index.stats.cleared == 1
    assert_consistent(index)
    # A cleared worker stores afresh with no stale parents.
    index.apply_event("a", stored(DOC, 3, 4))
    assert index.stats.orphan_stores == 1
    index.apply_event("a", stored(DOC, 0, 1))
    assert index.find_matches(DOC_SEQ) == {"a": 1, "b": 3}


def test_clear_unknown_worker_is_a_no_op() -> None:
    index = index_with(("a", stored(DOC, 0, 2)))
    index.clear_worker("ghost")
    index.remove_worker("ghost")
    assert index.find_matches(DOC_SEQ) == {"a": 2}
    assert index.stats.cleared == 0


# ---------------------------------------------------------------------------------------------
# Chaining, orphans, malformed events, duplicates


def test_second_event_chains_on_first_events_last_engine_hash() -> None:
    first = stored(DOC, 0, 2)
    second = stored(DOC, 2, 5)
    assert second.parent_block_hash == first.block_hashes[-1]
    index = index_with(("a", first), ("a", second))
    assert index.find_matches(DOC_SEQ) == {"a": 5}
    assert sorted(index.blocks_of("a")) == sorted(DOC_SEQ[:5])


def test_chained_blocks_hash_as_one_sequence() -> None:
    # Continuing from the parent's hash, not restarting: the tail alone is a different prefix.
    index = index_with(("a", stored(DOC, 0, 2)), ("a", stored(DOC, 2, 4)))
    tail_as_root = ref_seq(DOC[2 * BS : 4 * BS])
    assert index.find_matches(tail_as_root) == {}
    assert index.find_matches(DOC_SEQ[:4]) == {"a": 4}


@pytest.mark.parametrize(
    "parent",
    [
        pytest.param(EngineHash(12345), id="never-seen"),
        pytest.param(DOC_IDS[0], id="held-by-another-worker-only"),
        pytest.param(EngineHash(DOC_SEQ[0]), id="our-hash-not-an-engine-id"),
    ],
)
def test_store_under_unknown_parent_is_skipped_and_counted(parent: EngineHash) -> None:
    index = index_with(("b", stored(DOC, 0, 1)))
    event = stored(DOC, 1, 3)
    event.parent_block_hash = parent
    assert index.apply_stored("a", event) == 0
    assert index.stats.orphan_stores == 1
    assert index.size("a") == 0
    assert index.find_matches(DOC_SEQ) == {"b": 1}
    assert_consistent(index)


def test_store_under_removed_parent_is_an_orphan() -> None:
    index = index_with(("a", stored(DOC, 0, 2)))
    index.apply_removed("a", [DOC_IDS[1]])
    assert index.apply_stored("a", stored(DOC, 2, 3)) == 0
    assert index.stats.orphan_stores == 1


@pytest.mark.parametrize(
    ("blocks", "tokens"),
    [
        pytest.param(2, 2 * BS - 1, id="one-token-short"),
        pytest.param(2, 2 * BS + 1, id="one-token-extra"),
        pytest.param(2, 0, id="no-tokens"),
        pytest.param(1, 2 * BS, id="engine-block-size-twice-ours"),
        pytest.param(2, BS, id="engine-block-size-half-ours"),
    ],
)
def test_malformed_store_is_skipped_and_counted(blocks: int, tokens: int) -> None:
    index = PrefixIndex(BS)
    event = BlockStored(
        block_hashes=DOC_IDS[:blocks],
        parent_block_hash=None,
        token_ids=DOC[:tokens],
        block_size=BS,
    )
    assert index.apply_stored("a", event) == 0
    assert index.stats.malformed_stores == 1
    assert index.entries == 0
    assert index.find_matches(DOC_SEQ) == {}
    assert index.num_blocks == 0


def test_salted_store_is_indexed_under_the_salted_hashes() -> None:
    index = PrefixIndex(BS)
    blocks = len(DOC) // BS
    event = BlockStored(
        DOC_IDS[:blocks], None, DOC[: blocks * BS], BS, extra_keys=[["s"], *[None] * (blocks - 1)]
    )
    assert index.apply_stored("a", event) == blocks
    assert index.find_matches(DOC_SEQ) == {}
    assert index.find_matches(block_hashes(DOC, BS, cache_salt="s")[1]) == {"a": blocks}
    assert index.find_matches(block_hashes(DOC, BS, cache_salt="t")[1]) == {}


@pytest.mark.parametrize(
    "keys", [[["s"]], "s", [None] * 99], ids=["too-few", "not-a-list", "too-many"]
)
def test_store_whose_extra_keys_do_not_name_its_blocks_is_skipped(keys: object) -> None:
    index = PrefixIndex(BS)
    event = BlockStored(DOC_IDS[:2], None, DOC[: 2 * BS], BS, extra_keys=keys)  # type: ignore[arg-type]
    assert index.apply_stored("a", event) == 0
    assert index.stats.malformed_stores == 1
    assert index.entries == 0


def test_empty_store_is_ignored() -> None:
    index = PrefixIndex(BS)
    assert index.apply_stored("a", BlockStored([], None, [], BS)) == 0
    assert index.stats.malformed_stores == 0
    assert index.entries == 0


def test_duplicate_store_is_idempotent() -> None:
    index = index_with(("a", stored(DOC, 0, 3)))
    assert index.apply_stored("a", stored(DOC, 0, 3)) == 0
    assert index.apply_stored("a", stored(DOC, 1, 4)) == 1
    assert index.entries == 4
    assert index.stats.stored_blocks == 4
    assert index.find_matches(DOC_SEQ) == {"a": 4}
    # One removal undoes one stored block, however often it was re-announced.
    index.apply_removed("a", [DOC_IDS[0]])
    assert index.find_matches(DOC_SEQ) == {}
    assert_consistent(index)


def test_same_prefix_under_two_engine_ids_survives_removal_of_one() -> None:
    index = index_with(("a", stored(DOC, 0, 3, salt=0)), ("a", stored(DOC, 0, 3, salt=1)))
    assert index.entries == 6
    assert index.size("a") == 6
    assert index.num_blocks == 3
    assert index.find_matches(DOC_SEQ) == {"a": 3}

    index.apply_removed("a", engine_ids(DOC_SEQ[:3], salt=0))
    assert index.find_matches(DOC_SEQ) == {"a": 3}
    assert index.entries == 3

    index.apply_removed("a", engine_ids(DOC_SEQ[:3], salt=1))
    assert index.find_matches(DOC_SEQ) == {}
    assert index.entries == 0
    assert index.num_blocks == 0


def test_same_prefix_under_three_engine_ids_needs_three_removals() -> None:
    index = index_with(*[("a", stored(DOC, 0, 1, salt=s)) for s in range(3)])
    for salt, still_there in [(2, True), (0, True), (1, False)]:
        index.apply_removed("a", [engine_id(DOC_SEQ[0], salt)])
        assert (index.find_matches(DOC_SEQ) == {"a": 1}) is still_there
    assert_consistent(index)


def test_engine_id_reused_for_other_content() -> None:
    index = index_with(("a", stored(DOC, 0, 2)))
    reused = BlockStored([DOC_IDS[0]], None, OTHER[:BS], BS)
    assert index.apply_stored("a", reused) == 1
    assert index.find_matches(DOC_SEQ) == {}
    assert index.find_matches(OTHER_SEQ) == {"a": 1}
    assert index.entries == 2
    assert_consistent(index)
    index.apply_removed("a", [DOC_IDS[0]])
    assert index.find_matches(OTHER_SEQ) == {}
    assert index.entries == 1
    assert_consistent(index)


def test_engine_id_reused_while_content_also_held_under_another_id() -> None:
    index = index_with(("a", stored(DOC, 0, 1, salt=0)), ("a", stored(DOC, 0, 1, salt=1)))
    index.apply_stored("a", BlockStored([engine_id(DOC_SEQ[0], 0)], None, OTHER[:BS], BS))
    # DOC's block is still held under the salt-1 id.
    assert index.find_matches(DOC_SEQ) == {"a": 1}
    assert index.find_matches(OTHER_SEQ) == {"a": 1}
    index.apply_removed("a", [engine_id(DOC_SEQ[0], 1)])
    assert index.find_matches(DOC_SEQ) == {}
    assert_consistent(index)


def test_lora_blocks_only_match_lora_requests() -> None:
    index = index_with(("base", stored(DOC, 0, 3)), ("lora", stored(DOC, 0, 3, lora_name="sql")))
    assert index.find_matches(DOC_SEQ) == {"base": 3}
    assert index.find_matches(ref_seq(DOC, lora_name="sql")) == {"lora": 3}
    assert index.find_matches(block_hashes(DOC, BS, "sql")[1]) == {"lora": 3}


# ---------------------------------------------------------------------------------------------
# Matching


@pytest.mark.parametrize(
    ("removed", "overlap"),
    [
        pytest.param([2], 2, id="holds-0-1-3"),
        pytest.param([0], 0, id="missing-first-block"),
        pytest.param([3], 3, id="holds-0-1-2"),
        pytest.param([1, 2], 1, id="holds-0-3"),
        pytest.param([], 4, id="holds-all"),
    ],
)
def test_overlap_counts_leading_blocks_only(removed: list[int], overlap: int) -> None:
    index = index_with(("a", stored(DOC, 0, 4)), ("b", stored(DOC, 0, 1)))
    index.apply_removed("a", [DOC_IDS[i] for i in removed])
    expected = {"a": overlap, "b": 1} if overlap else {"b": 1}
    assert index.find_matches(DOC_SEQ[:4]) == expected


def test_request_diverging_after_shared_prefix() -> None:
    # Two docs with the same first two blocks; the index knows both branches.
    branch = DOC[: 2 * BS] + OTHER[2 * BS :]
    index = index_with(("a", stored(DOC, 0, 4)), ("b", stored(branch, 0, 5)))
    assert index.find_matches(DOC_SEQ) == {"a": 4, "b": 2}
    assert index.find_matches(ref_seq(branch)) == {"a": 2, "b": 5}


def test_many_workers_beyond_one_machine_word() -> None:
    workers = [f"w{i:03d}" for i in range(200)]
    index = PrefixIndex(BS)
    for i, w in enumerate(workers):
        index.apply_event(w, stored(DOC, 0, i % 6 + 1))
    expected = {w: i % 6 + 1 for i, w in enumerate(workers)}
    assert index.find_matches(DOC_SEQ) == expected
    assert index.entries == sum(expected.values())
    # Slots 63, 64, 127, 128 and the last: each worker's own bit.
    for i in (63, 64, 127, 128, 199):
        index.remove_worker(workers[i])
        del expected[workers[i]]
    assert index.find_matches(DOC_SEQ) == expected
    index.apply_removed(workers[130], [DOC_IDS[0]])
    del expected[workers[130]]
    assert index.find_matches(DOC_SEQ) == expected
    assert_consistent(index)


def test_remove_worker_frees_slot_and_new_worker_inherits_nothing() -> None:
    index = index_with(("a", stored(DOC, 0, 4)), ("b", stored(DOC, 0, 2)))
    index.remove_worker("a")
    assert "a" not in index
    assert index.workers() == ["b"]
    assert index.find_matches(DOC_SEQ) == {"b": 2}
    assert index.entries == 2

    index.apply_event("c", stored(OTHER, 0, 1))  # takes a's freed slot
    assert index.find_matches(DOC_SEQ) == {"b": 2}
    assert index.find_matches(OTHER_SEQ) == {"c": 1}
    assert index.sizes() == {"b": 2, "c": 1}
    # Engine ids of the departed worker mean nothing for the newcomer.
    assert index.apply_removed("c", DOC_IDS[:4]) == 0
    assert index.apply_stored("c", stored(DOC, 4, 5)) == 0
    assert index.stats.orphan_stores == 1
    assert_consistent(index)


def test_removed_worker_rejoining_starts_empty() -> None:
    index = index_with(("a", stored(DOC, 0, 4)))
    index.remove_worker("a")
    index.apply_event("a", stored(OTHER, 0, 1))
    assert index.find_matches(DOC_SEQ) == {}
    assert index.sizes() == {"a": 1}


# ---------------------------------------------------------------------------------------------
# Cap


def test_cap_evicts_newest_blocks_of_largest_worker() -> None:
    index = index_with(("b", stored(OTHER, 0, 3)), ("a", stored(DOC, 0, 6)), max_entries=10)
    index.apply_event("b", stored(OTHER, 3, 4))
    assert index.entries == 10  # at the cap, not over it
    assert index.stats.evicted_entries == 0
    index.apply_event("b", stored(OTHER, 4, 5))
    # 11 > 10: trim to int(10 * 0.9) = 9, taking the 2 newest blocks of the largest worker (a).
    assert index.entries == 9
    assert index.stats.evicted_entries == 2
    assert index.sizes() == {"b": 5, "a": 4}
    assert list(index.blocks_of("a")) == DOC_SEQ[:4]
    assert index.find_matches(OTHER_SEQ) == {"b": 5}
    # Newest-first trims a's leaves, so the prefix it keeps still matches.
    assert index.find_matches(DOC_SEQ) == {"a": 4}
    assert_consistent(index)


def test_cap_trims_the_largest_worker_each_time() -> None:
    stores = [(w, stored(tokens_of(seed=i + 10, blocks=4), 0, 4)) for i, w in enumerate("abcd")]
    index = index_with(*stores, max_entries=10)
    # a,b,c: 12 > 10 → trim to 9 from a (first of the largest); + d: 13 → trim to 9 from b.
    assert index.sizes() == {"a": 1, "b": 0, "c": 4, "d": 4}
    assert index.stats.evicted_entries == 7
    assert index.entries == 9
    assert_consistent(index)


@pytest.mark.parametrize(("kwargs"), [{"block_size": 0}, {"block_size": 16, "max_entries": 0}])
def test_invalid_construction(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        PrefixIndex(**kwargs)


# ---------------------------------------------------------------------------------------------
# Stateful model test

DOCS = [
    tokens_of(seed=100, blocks=5),
    tokens_of(seed=100, blocks=3) + tokens_of(seed=101, blocks=3),  # shares 3 blocks with doc 0
    tokens_of(seed=100, blocks=1) + tokens_of(seed=102, blocks=4),  # shares 1 block with doc 0
    tokens_of(seed=103, blocks=4),
]
DOC_SEQS = [ref_seq(d) for d in DOCS]
WORKERS = ["w0", "w1", "w2", "w3"]


class PrefixIndexMachine(RuleBasedStateMachine):
    """Random store/remove/clear/remove_worker against a model: per worker, engine id → our
    sequence hash, hashes computed by the test's own implementation."""

    held = Bundle("held")

    def __init__(self) -> None:
        super().__init__()
        self.index = PrefixIndex(BS)
        self.model: dict[str, dict[int, int]] = {}

    def _store(
        self, worker: str, doc: int, start: int | str, count: int, salt: int
    ) -> list[object]:
        blocks = len(DOC_SEQS[doc])
        if start == "extend":  # continue the prefix the worker holds, as engines mostly do
            start = leading(set(self.model.get(worker, {}).values()), DOC_SEQS[doc])
        assert isinstance(start, int)
        first = min(start, blocks - 1)
        event = stored(DOCS[doc], first, min(first + count, blocks), salt=salt)
        known = self.model.get(worker, {})
        orphans_before = self.index.stats.orphan_stores
        added = self.index.apply_stored(worker, event)
        if event.parent_block_hash is not None and event.parent_block_hash not in known:
            assert added == 0
            assert self.index.stats.orphan_stores == orphans_before + 1
            return []
        # Chained on whatever the parent id means *now* (it may have been reused).
        parent = None if event.parent_block_hash is None else known[event.parent_block_hash]
        seqs = ref_chain(parent, ref_local(event.token_ids))
        pairs = list(zip(event.block_hashes, seqs, strict=True))
        assert added == sum(1 for e, s in pairs if known.get(e) != s)
        self.model.setdefault(worker, {}).update(pairs)
        return [(worker, e) for e in event.block_hashes]

    @rule(
        target=held,
        worker=st.sampled_from(WORKERS),
        doc=st.integers(0, len(DOCS) - 1),
        start=st.integers(0, 5) | st.just("extend"),
        count=st.integers(1, 3),
        salt=st.integers(0, 2),
    )
    def store(self, worker: str, doc: int, start: int | str, count: int, salt: int) -> object:
        return multiple(*self._store(worker, doc, start, count, salt))

    @rule(
        target=held,
        worker=st.sampled_from(WORKERS),
        doc=st.integers(0, len(DOCS) - 1),
        count=st.integers(1, 3),
    )
    def store_under_three_ids(self, worker: str, doc: int, count: int) -> object:
        """The same prefix under several engine ids on one worker (LoRA/salted caches)."""
        return multiple(*[h for salt in range(3) for h in self._store(worker, doc, 0, count, salt)])

    @rule(
        worker=st.sampled_from(WORKERS),
        doc=st.integers(0, len(DOCS) - 1),
        block=st.integers(0, 5),
    )
    def reuse_engine_id(self, worker: str, doc: int, block: int) -> None:
        """The engine names other content with an id the worker already holds."""
        ids = self.model.get(worker)
        if not ids:
            return
        victim = sorted(ids)[block % len(ids)]
        seqs = DOC_SEQS[doc]
        self.index.apply_stored(worker, BlockStored([EngineHash(victim)], None, DOCS[doc][:BS], BS))
        ids[victim] = seqs[0]

    @rule(item=consumes(held))
    def remove(self, item: tuple[str, int]) -> None:
        worker, engine = item
        removed = self.index.apply_removed(worker, [EngineHash(engine)])
        was_held = engine in self.model.get(worker, {})
        assert removed == int(was_held)
        self.model.get(worker, {}).pop(engine, None)

    @rule(worker=st.sampled_from(WORKERS))
    def clear(self, worker: str) -> None:
        self.index.clear_worker(worker)
        if worker in self.model:
            self.model[worker] = {}

    @rule(worker=st.sampled_from(WORKERS))
    def remove_worker(self, worker: str) -> None:
        self.index.remove_worker(worker)
        self.model.pop(worker, None)
        assert worker not in self.index

    @precondition(lambda self: bool(self.model))
    @rule(worker=st.sampled_from(WORKERS), doc=st.integers(0, len(DOCS) - 1))
    def unknown_removal(self, worker: str, doc: int) -> None:
        ids = self.model.get(worker, {})
        bogus = [e for e in engine_ids(DOC_SEQS[doc], salt=7) if e not in ids]
        assert self.index.apply_removed(worker, bogus) == 0

    @invariant()
    def matches_agree_with_model(self) -> None:
        for seqs in DOC_SEQS:
            for length in (1, 3, len(seqs)):
                expected = {
                    w: n
                    for w, ids in self.model.items()
                    if (n := leading(set(ids.values()), seqs[:length]))
                }
                assert self.index.find_matches(seqs[:length]) == expected

    @invariant()
    def entries_agree_with_model(self) -> None:
        assert self.index.entries == sum(len(ids) for ids in self.model.values())
        assert {w: n for w, n in self.index.sizes().items() if n} == {
            w: len(ids) for w, ids in self.model.items() if ids
        }
        held_anywhere = {s for ids in self.model.values() for s in ids.values()}
        assert self.index.num_blocks == len(held_anywhere)


PrefixIndexMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    # Rules drawing from an empty bundle are retried; generation is slow on a loaded box.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestPrefixIndexMachine = PrefixIndexMachine.TestCase


# ---------------------------------------------------------------------------------------------
# Cross-check with the reference router's RadixTree


def _radix_event(event_id: int, data: object) -> bytes:
    return json.dumps({"event_id": event_id, "data": data}).encode()


PARENT_OF = {seqs[i]: seqs[i - 1] if i else None for seqs in DOC_SEQS for i in range(len(seqs))}


def _depth(seq: int) -> int:
    depth = 0
    while (parent := PARENT_OF[seq]) is not None:
        seq, depth = parent, depth + 1
    return depth


def _subtree(root: int, held: set[int]) -> list[int]:
    """``root`` and every held descendant of it, deepest first (how engines evict: leaves first;
    the reference tree drops a worker's descendants with their parent, so evicting a parent
    under a held child would make the two indexes disagree by design)."""

    def under(seq: int | None) -> bool:
        while seq is not None:
            if seq == root:
                return True
            seq = PARENT_OF[seq]
        return False

    return sorted((s for s in held if under(s)), key=_depth, reverse=True)


@settings(max_examples=25, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["store", "extend", "extend", "remove", "clear"]),
            st.integers(0, 2),  # worker
            st.integers(0, len(DOCS) - 1),  # doc
            st.integers(0, 5),  # first block (store) / which held block (remove)
            st.integers(1, 4),  # block count
        ),
        max_size=40,
    ),
)
def test_matches_agree_with_dynamo_radix_tree(ops: list[tuple[str, int, int, int, int]]) -> None:
    tree = RadixTree()
    index = PrefixIndex(BS)
    event_ids = [0, 0, 0]
    held: list[set[int]] = [set(), set(), set()]  # sequence hashes per worker

    def send(worker: int, data: object) -> bool:
        event_ids[worker] += 1
        try:
            tree.apply_event(worker, _radix_event(event_ids[worker], data))
        except RuntimeError:  # the reference refuses orphans; we count them
            return False
        return True

    for kind, worker, doc, block, count in ops:
        name = str(worker)
        seqs = DOC_SEQS[doc]
        if kind in {"store", "extend"}:
            first = leading(held[worker], seqs) if kind == "extend" else block
            first = min(first, len(seqs) - 1)
            last = min(first + count, len(seqs))
            event = stored(DOCS[doc], first, last)
            local = ref_local(event.token_ids)
            blocks = [
                {"block_hash": e, "tokens_hash": t}
                for e, t in zip(event.block_hashes, local, strict=True)
            ]
            accepted = send(
                worker, {"stored": {"parent_hash": event.parent_block_hash, "blocks": blocks}}
            )
            orphans = index.stats.orphan_stores
            index.apply_stored(name, event)
            assert accepted == (index.stats.orphan_stores == orphans)
            if accepted:
                held[worker].update(seqs[first:last])
        elif kind == "remove" and held[worker]:
            root = sorted(held[worker])[block % len(held[worker])]
            victims = _subtree(root, held[worker])
            held[worker] -= set(victims)
            assert send(worker, {"removed": {"block_hashes": engine_ids(victims)}})
            assert index.apply_removed(name, engine_ids(victims)) == len(victims)
        elif kind == "clear":
            assert send(worker, "cleared")
            index.clear_worker(name)
            held[worker] = set()

    for d, seqs in enumerate(DOC_SEQS):
        local = ref_local(DOCS[d])
        for length in range(1, len(seqs) + 1):
            theirs = tree.find_matches(local[:length]).scores
            expected = {str(w): n for (w, _rank), n in theirs.items() if n}
            assert index.find_matches(seqs[:length]) == expected
    assert index.entries == sum(len(h) for h in held)
