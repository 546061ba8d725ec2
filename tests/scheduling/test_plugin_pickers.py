from __future__ import annotations

import random
from collections import Counter

import pytest

from kvgate.scheduling.framework import Picker
from kvgate.scheduling.plugins.max_score_picker import MaxScorePicker
from kvgate.scheduling.plugins.random_picker import RandomPicker
from kvgate.scheduling.plugins.round_robin_picker import RoundRobinPicker
from kvgate.scheduling.plugins.weighted_random_picker import WeightedRandomPicker
from tests.scheduling.utils import request, scored


def addresses(picker: Picker, items: list[tuple[str, float]]) -> list[str]:
    return [ep.address for ep in picker.pick(request(), scored(*items))]


@pytest.mark.parametrize(
    ("items", "k", "expected"),
    [
        pytest.param([("a", 0.1), ("b", 0.9), ("c", 0.5)], 1, ["b"], id="highest-wins"),
        pytest.param([("a", 0.1), ("b", 0.9), ("c", 0.5)], 2, ["b", "c"], id="fallbacks-by-score"),
        pytest.param([("a", 0.1), ("b", 0.9)], 5, ["b", "a"], id="k-above-candidates-returns-all"),
        pytest.param([("a", 3.0)], 1, ["a"], id="single-candidate"),
        pytest.param([], 1, [], id="no-candidates-no-pick"),
        pytest.param([], 3, [], id="no-candidates-no-fallbacks"),
    ],
)
def test_max_score_picker(items: list[tuple[str, float]], k: int, expected: list[str]) -> None:
    picker = MaxScorePicker("p", max_num_of_endpoints=k, rng=random.Random(1))
    assert addresses(picker, items) == expected


@pytest.mark.parametrize("k", [1, 2], ids=["single-pick", "with-fallbacks"])
def test_max_score_picker_breaks_ties_at_random(k: int) -> None:
    picker = MaxScorePicker("p", max_num_of_endpoints=k, rng=random.Random(3))
    items = [("a", 0.5), ("b", 0.9), ("c", 0.9), ("d", 0.9)]
    firsts = Counter(addresses(picker, items)[0] for _ in range(3000))
    assert set(firsts) == {"b", "c", "d"}
    assert all(800 < n < 1200 for n in firsts.values()), firsts


def test_max_score_picker_ties_behind_the_best_are_shuffled() -> None:
    picker = MaxScorePicker("p", max_num_of_endpoints=3, rng=random.Random(5))
    seen = {tuple(addresses(picker, [("a", 1.0), ("b", 0.5), ("c", 0.5)])) for _ in range(50)}
    assert seen == {("a", "b", "c"), ("a", "c", "b")}


def test_random_picker_returns_distinct_candidates() -> None:
    picker = RandomPicker("p", max_num_of_endpoints=3, rng=random.Random(1))
    items = [(f"e{i}", 0.0) for i in range(5)]
    for _ in range(50):
        picked = addresses(picker, items)
        assert len(picked) == 3 == len(set(picked))
        assert set(picked) <= {a for a, _ in items}


def test_random_picker_ignores_scores() -> None:
    picker = RandomPicker("p", rng=random.Random(2))
    counts = Counter(addresses(picker, [("low", 0.0), ("high", 9.0)])[0] for _ in range(2000))
    assert 800 < counts["low"] < 1200


@pytest.mark.parametrize("picker_type", [RandomPicker, WeightedRandomPicker, MaxScorePicker])
def test_random_pickers_are_reproducible_with_a_seed(picker_type: type[MaxScorePicker]) -> None:
    items = [(f"e{i}", 0.5) for i in range(6)]
    runs = [
        addresses(picker_type("p", max_num_of_endpoints=2, rng=random.Random(9)), items)
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_weighted_random_picker_follows_the_scores() -> None:
    picker = WeightedRandomPicker("p", rng=random.Random(4))
    counts = Counter(addresses(picker, [("a", 3.0), ("b", 1.0)])[0] for _ in range(4000))
    assert 0.70 < counts["a"] / 4000 < 0.80, counts


def test_weighted_random_picker_never_prefers_a_zero_score() -> None:
    picker = WeightedRandomPicker("p", max_num_of_endpoints=2, rng=random.Random(4))
    for _ in range(200):
        assert "zero" not in addresses(picker, [("zero", 0.0), ("a", 0.01), ("b", 2.0)])


def test_weighted_random_picker_is_uniform_when_all_scores_are_zero() -> None:
    picker = WeightedRandomPicker("p", rng=random.Random(6))
    counts = Counter(addresses(picker, [("a", 0.0), ("b", 0.0)])[0] for _ in range(2000))
    assert 800 < counts["a"] < 1200


def test_weighted_random_picker_fallbacks_are_distinct() -> None:
    picker = WeightedRandomPicker("p", max_num_of_endpoints=4, rng=random.Random(8))
    picked = addresses(picker, [("a", 1.0), ("b", 0.0), ("c", 0.3), ("d", 0.7)])
    assert sorted(picked) == ["a", "b", "c", "d"]
    assert picked[-1] == "b"


def test_round_robin_picker_rotates_in_address_order_whatever_the_input_order() -> None:
    picker = RoundRobinPicker("rr")
    orders = [[("c", 1.0), ("a", 0.0), ("b", 0.5)], [("b", 0.0), ("c", 0.0), ("a", 9.0)]]
    picked = [addresses(picker, orders[i % 2])[0] for i in range(6)]
    assert picked == ["a", "b", "c", "a", "b", "c"]


def test_round_robin_picker_fallbacks_follow_the_rotation() -> None:
    picker = RoundRobinPicker("rr", max_num_of_endpoints=2)
    items = [("a", 0.0), ("b", 0.0), ("c", 0.0)]
    assert [addresses(picker, items) for _ in range(3)] == [["a", "b"], ["b", "c"], ["c", "a"]]


def test_round_robin_picker_survives_a_shrinking_candidate_set() -> None:
    picker = RoundRobinPicker("rr")
    addresses(picker, [("a", 0), ("b", 0), ("c", 0)])
    addresses(picker, [("a", 0), ("b", 0), ("c", 0)])
    assert addresses(picker, [("a", 0)]) == ["a"]
    assert addresses(picker, []) == []
