"""The native matcher (`_leading.c`) against the Python loop it replaces."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.index import mask_index
from kvgate.index._leading import leading_runs
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
