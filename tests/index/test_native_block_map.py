"""The compact per-worker map (`_blockmap.c`) against the dict it stands in for, and the prefix
index run on either."""

from __future__ import annotations

import gc
import random
import resource

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.events.types import BlockRemoved, BlockStored, EngineHash
from kvgate.index import prefix_index
from kvgate.index._blockmap import BlockMap
from kvgate.index.prefix_index import PrefixIndex
from tests.index.test_prefix_index import PrefixIndexMachine
from tests.index.utils import BS, tokens_of


def test_the_native_block_map_is_built() -> None:
    # `pip install -e .` builds it wherever gcc and Python's headers exist (CI included).
    assert prefix_index.NATIVE_BLOCK_MAP


keys = st.one_of(st.integers(0, 40), st.integers(0, (1 << 64) - 1))
operations = st.lists(
    st.one_of(
        st.tuples(st.just("set"), keys, st.integers(0, (1 << 64) - 1)),
        st.tuples(st.just("get"), keys, st.none()),
        st.tuples(st.just("pop"), keys, st.none()),
        st.tuples(st.just("del"), keys, st.none()),
        st.tuples(st.just("popitem"), st.none(), st.none()),
    ),
    max_size=300,
)


def apply(target: object, op: str, key: int | None, value: int | None) -> object:
    m: dict[int, int] = target  # type: ignore[assignment]  # either map, same calls
    try:
        if op == "set":
            assert key is not None and value is not None
            m[key] = value
            return None
        if op == "get":
            return (m.get(key), key in m)  # type: ignore[arg-type]
        if op == "pop":
            return m.pop(key, None)  # type: ignore[arg-type]
        if op == "del":
            del m[key]  # type: ignore[arg-type]
            return None
        return m.popitem()
    except KeyError:
        return KeyError


@settings(max_examples=300, deadline=None)
@given(operations)
def test_block_map_behaves_as_a_dict(ops: list[tuple[str, int | None, int | None]]) -> None:
    native, model = BlockMap(), {}
    for op, key, value in ops:
        assert apply(native, op, key, value) == apply(model, op, key, value), (op, key)
        assert len(native) == len(model)
    assert native.items() == list(model.items())  # insertion order, updates keep their place
    assert native.values() == list(model.values())


def test_growing_shrinking_and_tombstones_keep_order() -> None:
    rng = random.Random(5)
    native, model = BlockMap(), {}
    for round_ in range(20):
        for _ in range(2000):
            key = rng.randrange(1 << 64) if round_ % 2 else rng.randrange(5000)
            native[key] = model[key] = rng.randrange(1 << 64)
        for key in rng.sample(sorted(model), len(model) // 2):
            assert native.pop(key) == model.pop(key)
        for _ in range(300):  # the newest first, as the index's trim takes them
            if model:
                assert native.popitem() == model.popitem()
    assert native.items() == list(model.items())


def test_keys_and_values_outside_u64_are_refused_and_not_found() -> None:
    m = BlockMap()
    for bad in (-1, 1 << 64):
        with pytest.raises(OverflowError):
            m[bad] = 1
        with pytest.raises(OverflowError):
            m[1] = bad
        assert m.get(bad) is None and bad not in m and m.pop(bad, "absent") == "absent"
    with pytest.raises(TypeError):
        m["x"] = 1  # type: ignore[index]
    assert m.get("x") is None  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        m.popitem()
    with pytest.raises(TypeError):
        BlockMap(1)  # type: ignore[call-arg]


def test_no_memory_grows_over_a_long_churn() -> None:
    def churn() -> None:
        m = BlockMap()
        for i in range(200_000):
            m[i] = i
            if i >= 1000:
                m.pop(i - 1000, None)
                m.get(i - 500)
            if i % 997 == 0:
                m.popitem()
                m.items()
                m.values()
        for _ in range(100):  # maps dropped whole (~45 KiB of arrays each)
            dropped = BlockMap()
            for i in range(1000):
                dropped[i] = i

    churn()
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(5):
        churn()
    gc.collect()
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 4096, f"max RSS grew by {grown_kb} KiB over 1M more operations"


class DictMapsMachine(PrefixIndexMachine):
    """The stateful model test of the prefix index, on plain dicts (as without the extension)."""

    def __init__(self) -> None:
        super().__init__()
        self.index._native_maps = False


DictMapsMachine.TestCase.settings = PrefixIndexMachine.TestCase.settings
TestDictMapsMachine = DictMapsMachine.TestCase


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.booleans()), max_size=40))
def test_the_index_is_the_same_on_either_map(ops: list[tuple[int, int, bool]]) -> None:
    docs = [tokens_of(seed=200 + d, blocks=4) for d in range(6)]
    native, plain = PrefixIndex(BS, max_entries=12), PrefixIndex(BS, max_entries=12)
    plain._native_maps = False
    for worker, doc, remove in ops:
        # Ids out of u64 range for doc 5: that worker's map becomes a dict mid-way.
        base = -(doc + 1) * 100 if doc == 5 else doc * 100
        ids = [EngineHash(base + i) for i in range(4)]
        event = BlockRemoved(ids[2:]) if remove else BlockStored(ids, None, docs[doc], BS)
        for index in (native, plain):
            index.apply_event(f"w{worker}", event)
        assert native.entries == plain.entries
        assert native.sizes() == plain.sizes()
        for d in docs:
            hashes = list(prefix_index.sequence_hashes_of(d, BS))
            assert native.find_matches(hashes) == plain.find_matches(hashes)
        for w in native.workers():
            assert list(native.blocks_of(w)) == list(plain.blocks_of(w))
    assert native.stats == plain.stats
