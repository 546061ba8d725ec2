"""ApproxPrefixIndex: the router's own picks as a TTL'd guess of what each worker caches."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.index.approx_index import DEFAULT_MAX_BLOCKS, DEFAULT_TTL_S, ApproxPrefixIndex
from tests.index.utils import leading

# Sequence hashes are opaque ints to the index; small readable ones make the cases clear.
REQ = [101, 102, 103, 104]


def test_defaults_follow_the_reference() -> None:
    assert DEFAULT_TTL_S == 120.0
    assert DEFAULT_MAX_BLOCKS == 1 << 20
    index = ApproxPrefixIndex()
    assert (index.ttl_s, index.max_blocks) == (120.0, 1 << 20)


def test_record_then_match_leading_blocks() -> None:
    index = ApproxPrefixIndex()
    index.record("a", REQ[:3], now=0.0)
    index.record("b", REQ[:1], now=0.0)
    assert index.find_matches_at(REQ, now=1.0) == {"a": 3, "b": 1}
    assert index.find_matches_at([101, 999, 103], now=1.0) == {"a": 1, "b": 1}
    assert index.find_matches_at([999, 101, 102], now=1.0) == {}
    assert index.sizes() == {"a": 3, "b": 1}
    assert index.entries == 4
    assert index.num_blocks == 3


@pytest.mark.parametrize(
    ("lookup_at", "matched"),
    [
        pytest.param(60.0, True, id="half-ttl"),
        pytest.param(119.0, True, id="just-before-ttl"),
        pytest.param(120.0, False, id="at-ttl"),
        pytest.param(121.0, False, id="past-ttl"),
        pytest.param(10_000.0, False, id="long-after"),
    ],
)
def test_entries_expire_after_ttl(lookup_at: float, matched: bool) -> None:
    index = ApproxPrefixIndex()
    index.record("a", REQ, now=0.0)
    assert index.find_matches_at(REQ, now=lookup_at) == ({"a": 4} if matched else {})
    assert index.entries == (4 if matched else 0)
    assert index.sizes() == {"a": 4 if matched else 0}
    assert index.num_blocks == (4 if matched else 0)


def test_custom_ttl() -> None:
    index = ApproxPrefixIndex(ttl_s=5.0)
    index.record("a", REQ, now=100.0)
    assert index.find_matches_at(REQ, now=104.0) == {"a": 4}
    assert index.find_matches_at(REQ, now=106.0) == {}


def test_re_record_refreshes_ttl() -> None:
    index = ApproxPrefixIndex()
    index.record("a", REQ, now=0.0)
    index.record("a", REQ[:2], now=100.0)  # the first two blocks were routed again
    assert index.find_matches_at(REQ, now=150.0) == {"a": 2}
    assert index.entries == 2
    assert index.find_matches_at(REQ, now=219.0) == {"a": 2}
    assert index.find_matches_at(REQ, now=221.0) == {}


def test_refresh_on_one_worker_does_not_refresh_another() -> None:
    index = ApproxPrefixIndex()
    index.record("a", REQ, now=0.0)
    index.record("b", REQ, now=0.0)
    index.record("b", REQ, now=100.0)
    assert index.find_matches_at(REQ, now=150.0) == {"b": 4}
    assert index.sizes() == {"a": 0, "b": 4}


def test_cap_prunes_to_80_percent_earliest_expiring_first() -> None:
    index = ApproxPrefixIndex(max_blocks=10)
    index.record("a", [1, 2, 3, 4, 5], now=0.0)
    index.record("b", [6, 7, 8, 9, 10], now=1.0)
    index.record("a", [1], now=2.0)  # refreshed: now expires after b's blocks
    assert index.entries == 10
    index.record("b", [11], now=3.0)
    # 11 > 10 → prune to 8: drop the 3 earliest-expiring entries, a's 2..5 expiring together,
    # tail first (a prompt's blocks are touched back to front): 5, 4, 3.
    assert index.entries == 8
    assert index.sizes() == {"a": 2, "b": 6}
    for h, holder in [(1, {"a": 1}), (2, {"a": 1}), (3, {}), (5, {}), (6, {"b": 1})]:
        assert index.find_matches_at([h], now=3.0) == holder
    assert index.find_matches_at([1, 2, 3], now=3.0) == {"a": 2}
    assert index.find_matches_at([6, 7, 8, 9, 10, 11], now=3.0) == {"b": 6}


def test_cap_counts_block_worker_pairs() -> None:
    index = ApproxPrefixIndex(max_blocks=4)
    index.record("a", [1, 2], now=0.0)
    index.record("b", [1, 2], now=1.0)
    assert index.entries == 4
    index.record("c", [1], now=2.0)
    # 5 > 4 → prune to int(3.2) = 3: a's two entries go.
    assert index.find_matches_at([1, 2], now=2.0) == {"b": 2, "c": 1}


def test_clear_worker_keeps_others_and_worker_known() -> None:
    index = ApproxPrefixIndex()
    index.record("a", REQ, now=0.0)
    index.record("b", REQ[:2], now=0.0)
    index.clear_worker("a")
    assert index.find_matches_at(REQ, now=1.0) == {"b": 2}
    assert "a" in index
    assert index.sizes() == {"a": 0, "b": 2}
    assert index.entries == 2


def test_remove_worker_frees_slot_and_newcomer_inherits_nothing() -> None:
    index = ApproxPrefixIndex()
    index.record("a", REQ, now=0.0)
    index.record("b", REQ[:1], now=0.0)
    index.remove_worker("a")
    assert "a" not in index
    assert index.workers() == ["b"]
    index.record("c", [500], now=1.0)  # reuses a's slot
    assert index.find_matches_at(REQ, now=2.0) == {"b": 1}
    assert index.find_matches_at([500], now=2.0) == {"c": 1}
    index.clear_worker("ghost")
    index.remove_worker("ghost")
    assert index.entries == 2


@pytest.mark.parametrize("kwargs", [{"ttl_s": 0.0}, {"ttl_s": -1.0}, {"max_blocks": 0}])
def test_invalid_construction(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ApproxPrefixIndex(**kwargs)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.lists(st.integers(1, 12), min_size=1, max_size=5, unique=True),
            st.floats(0.0, 200.0),  # time step
        ),
        max_size=25,
    ),
    max_blocks=st.integers(4, 40),
    capacities=st.fixed_dictionaries(
        {w: st.one_of(st.none(), st.integers(1, 8)) for w in ("a", "b", "c")}
    ),
)
def test_matches_a_simple_model(
    ops: list[tuple[str, list[int], float]],
    max_blocks: int,
    capacities: dict[str, int | None],
) -> None:
    """Model: (worker, hash) → expiry, in the order last routed (a prompt back to front);
    expired entries dropped at each step; over a worker's capacity (when given), its least
    recently routed; then, over the cap, the earliest-expiring down to int(0.8 * cap). Time
    steps of >= 1 s keep the index's 1 s sweep throttle out of the comparison."""
    index = ApproxPrefixIndex(ttl_s=120.0, max_blocks=max_blocks)
    model: dict[tuple[str, int], float] = {}
    now = 0.0
    for worker, hashes, step in ops:
        now += max(step, 1.0)
        model = {k: t for k, t in model.items() if t > now}
        for h in reversed(hashes):
            model.pop((worker, h), None)
            model[(worker, h)] = now + 120.0
        capacity = capacities[worker]
        held = [k for k in model if k[0] == worker]
        if capacity is not None and len(held) > capacity:
            for k in held[: len(held) - capacity]:
                del model[k]
        if len(model) > max_blocks:
            keep = sorted(model.items(), key=lambda kv: kv[1])[len(model) - int(max_blocks * 0.8) :]
            # Equal expiries are pruned in insertion order; the dict keeps it, sorted() is stable.
            model = dict(keep)
        index.record(worker, hashes, now, capacity)
        assert index.entries == len(model)
        for probe in ([1, 2, 3, 4], hashes, [5, 6, 7, 8, 9, 10, 11, 12]):
            expected = {
                w: n
                for w in ("a", "b", "c")
                if (n := leading({h for (mw, h) in model if mw == w}, probe))
            }
            assert index.find_matches(probe) == expected


def test_a_known_capacity_evicts_the_least_recently_routed_tail_first() -> None:
    index = ApproxPrefixIndex()
    index.record("a", [1, 2, 3], now=0.0, capacity=5)
    index.record("b", [1, 2, 3], now=0.0)  # capacity unknown: the TTL alone
    index.record("a", [7, 8, 9], now=1.0)  # 6 > 5: a's least recent block, 3 (a tail), goes
    assert index.find_matches_at([1, 2, 3], now=2.0) == {"a": 2, "b": 3}
    assert index.sizes() == {"a": 5, "b": 3}
    index.record("a", [1, 2], now=3.0)  # refreshed: now more recent than 7, 8, 9
    index.record("a", [4], now=4.0)  # evicts 9, the least recent
    assert index.find_matches_at([7, 8, 9], now=5.0) == {"a": 2}
    assert index.find_matches_at([1, 2], now=5.0) == {"a": 2, "b": 2}
    # The capacity is kept until told again, and forgotten with the worker.
    index.record("a", [20, 21, 22, 23, 24, 25], now=6.0)
    assert index.sizes()["a"] == 5
    index.remove_worker("a")
    index.record("a", [30, 31, 32, 33, 34, 35], now=7.0)
    assert index.sizes()["a"] == 6
