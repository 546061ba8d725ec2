"""The native loops (`_leading.c`) against the Python loops they replace."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.index import mask_index
from kvgate.index._leading import count_in, count_out, leading_runs
from kvgate.index.mask_index import MaskIndex
from kvgate.index.prefix_index import PrefixIndex


def test_the_native_matcher_is_built() -> None:
    # `pip install -e .` builds it wherever gcc and Python's headers exist (CI included).
    assert mask_index.NATIVE_MATCHING


def python_runs(blocks: dict[int, int], hashes: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    if not hashes or not blocks.get(hashes[0], 0):
        return runs
    mask = blocks[hashes[0]]
    for depth, h in enumerate(hashes[1:], start=1):
        still = mask & blocks.get(h, 0)
        if still != mask:
            runs.append((mask ^ still, depth))
            if not still:
                return runs
            mask = still
    runs.append((mask, len(hashes)))
    return runs


masks = st.one_of(
    st.integers(0, (1 << 8) - 1),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, (1 << 200) - 1),  # more than 64 worker slots
)


@settings(max_examples=400)
@given(
    st.dictionaries(st.integers(0, 40), masks, max_size=30),
    st.lists(st.integers(0, 40), max_size=40),
)
def test_leading_runs_equal_the_python_loop(blocks: dict[int, int], hashes: list[int]) -> None:
    assert leading_runs is not None
    assert leading_runs(blocks, hashes) == python_runs(blocks, hashes)


@settings(max_examples=100)
@given(st.data())
def test_masks_narrowing_then_widening_across_the_64_bit_edge(data: st.DataObject) -> None:
    # A run that starts within 64 bits and meets a wider mask later (and the reverse).
    chain = list(range(20))
    blocks = {
        h: data.draw(masks) | data.draw(st.sampled_from([0, 1 << 70, 1 << 63])) for h in chain
    }
    assert leading_runs is not None
    assert leading_runs(blocks, chain) == python_runs(blocks, chain)


def test_find_matches_native_and_python_agree_on_a_real_index() -> None:
    rng = random.Random(3)
    index = PrefixIndex(16)
    chain = [rng.getrandbits(64) for _ in range(64)]
    workers = [f"10.0.0.{i}:8000" for i in range(130)]  # slots beyond 64: wide masks
    for i, worker in enumerate(workers):
        depth = 1 + (i * 7) % len(chain)
        index.store_hashes(worker, range(i * 100, i * 100 + depth), chain[:depth])
    for request in (chain, chain[:10], [*chain[:5], 1, 2, 3], [], [rng.getrandbits(64)]):
        assert index.find_matches(request) == index.find_matches_python(request)
    assert max(index.find_matches(chain).values()) == len(chain)


def test_bad_arguments_raise_instead_of_crashing() -> None:
    assert leading_runs is not None
    for args in (({}, 5), ([], [1]), ({1: "x"}, [1, 1])):
        try:
            leading_runs(*args)  # type: ignore[arg-type]
        except TypeError:
            continue
        raise AssertionError(f"accepted {args!r}")


def test_the_native_counting_loops_are_built() -> None:
    assert mask_index._count_in is not None and mask_index._count_out is not None


# (add?, slot, hashes): slots beyond 63 make masks wider than a machine word.
count_ops = st.lists(
    st.tuples(
        st.booleans(),
        st.sampled_from([0, 1, 5, 63, 64, 130]),
        st.lists(st.integers(0, 30), max_size=12),
    ),
    max_size=40,
)


@settings(max_examples=300)
@given(count_ops)
def test_counted_add_and_release_equal_the_python_loops(
    ops: list[tuple[bool, int, list[int]]],
) -> None:
    native, python = MaskIndex(), MaskIndex()
    native_counts: dict[int, dict[int, int]] = {}
    python_counts: dict[int, dict[int, int]] = {}
    for add, slot, hashes in ops:
        bit = 1 << slot
        mine = native_counts.setdefault(slot, {})
        reference = python_counts.setdefault(slot, {})
        if add:
            native.add_counted(mine, hashes, bit)
            python.add_counted_python(reference, hashes, bit)
        else:
            native.release_counted(mine, hashes, bit)
            python.release_counted_python(reference, hashes, bit)
        assert native_counts == python_counts
        assert native.masks == python.masks
        assert 0 not in native.masks.values()


def test_counting_bad_arguments_raise_instead_of_crashing() -> None:
    for fn, args in (
        (count_in, ({}, {}, 5, 1)),
        (count_in, ([], {}, [1], 1)),
        (count_in, ({}, {}, [1], "x")),
        (count_out, ({1: "x"}, {}, {}, int, [1], 1)),
        (count_out, ({1: 1}, {1: 3}, {}, None, [1], 1)),
    ):
        try:
            fn(*args)  # type: ignore[operator]
        except TypeError:
            continue
        raise AssertionError(f"{fn.__name__} accepted {args!r}")
