"""predicted-latency-scorer and slo-aware-picker on their own: the shortcuts of the routing hot
path (scores straight from the TTFT column, the one-pass pick) against the general paths they
skip."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.active import ActiveSequences
from kvgate.scheduling.latency_model import LatencyModel, Predictions
from kvgate.scheduling.plugins.predicted_latency_scorer import (
    CacheChurn,
    PredictedLatencyParams,
    PredictedLatencyScorer,
)
from kvgate.scheduling.plugins.slo_aware_picker import SloAwarePicker, SloAwarePickerParams
from kvgate.scheduling.request import (
    LatencyPrediction,
    LLMRequest,
    ProfileResult,
    SchedulingResult,
    ScoredEndpoint,
)
from tests.scheduling.utils import endpoint, request

BLOCK = 16
ADDRESSES = [f"10.0.0.{i}:8000" for i in range(8)]


def predictions_for(uncached: Mapping[str, int]) -> Predictions:
    workers = list(uncached)
    return LatencyModel().predict_many(
        workers,
        uncached=[uncached[w] for w in workers],
        pending=[0] * len(workers),
        decoding=[0] * len(workers),
        usage=[0.0] * len(workers),
        usage_after=[0.0] * len(workers),
        expected_output_tokens=16,
    )


def sorted_order(
    predictions: Mapping[str, LatencyPrediction], scored: list[ScoredEndpoint]
) -> list[list[str]]:
    """The picker's ranking as groups of equals: highest score first, then lowest TTFT."""

    def key(s: ScoredEndpoint) -> tuple[float, float]:
        p = predictions.get(s.endpoint.address)
        return (-s.score, p.ttft_s if p is not None else float("inf"))

    groups: dict[tuple[float, float], list[str]] = {}
    for s in sorted(scored, key=key):
        groups.setdefault(key(s), []).append(s.endpoint.address)
    return list(groups.values())


# Few distinct values, so that ties in score and in TTFT are common.
candidates = st.lists(
    st.tuples(
        st.sampled_from(ADDRESSES),
        st.sampled_from([0.0, 0.25, 1.0]),
        st.sampled_from([100, 2000, 9000]),
    ),
    min_size=1,
    max_size=8,
    unique_by=lambda c: c[0],
)


@settings(max_examples=300)
@given(candidates, st.booleans(), st.integers(0, 1 << 30))
def test_the_one_pass_pick_is_the_first_of_the_sorted_order(
    items: list[tuple[str, float, int]], columnar: bool, seed: int
) -> None:
    made = predictions_for({a: n for a, _, n in items})
    predictions: Mapping[str, LatencyPrediction] = made if columnar else {w: made[w] for w in made}
    scored = [ScoredEndpoint(endpoint(a), score) for a, score, _ in items]
    picker = SloAwarePicker("p", rng=random.Random(seed))
    (picked,) = picker.pick(request(predictions=predictions), scored)
    assert picked.address in sorted_order(predictions, scored)[0]


def test_ties_in_score_and_ttft_are_broken_at_random() -> None:
    predictions = predictions_for({"a": 500, "b": 500, "c": 500, "d": 100})
    scored = [ScoredEndpoint(endpoint(a), s) for a, s in (("a", 1.0), ("b", 1.0), ("c", 1.0))]
    scored.append(ScoredEndpoint(endpoint("d"), 0.9))  # faster but scored lower
    picker = SloAwarePicker("p", rng=random.Random(4))
    picks = Counter(
        picker.pick(request(predictions=predictions), scored)[0].address for _ in range(3000)
    )
    assert set(picks) == {"a", "b", "c"}
    assert min(picks.values()) > 800


def test_a_score_tie_goes_to_the_lower_predicted_ttft() -> None:
    predictions = predictions_for({"a": 4000, "b": 300, "c": 100})
    scored = [ScoredEndpoint(endpoint(a), s) for a, s in (("a", 1.0), ("b", 1.0), ("c", 0.5))]
    for seed in range(20):
        picker = SloAwarePicker("p", rng=random.Random(seed))
        assert picker.pick(request(predictions=predictions), scored)[0].address == "b"


def test_fallbacks_keep_the_whole_order() -> None:
    predictions = predictions_for({"a": 4000, "b": 300, "c": 100, "d": 50})
    scored = [
        ScoredEndpoint(endpoint(a), s) for a, s in (("a", 1.0), ("b", 1.0), ("c", 0.5), ("d", 0.1))
    ]
    picker = SloAwarePicker("p", SloAwarePickerParams(max_num_of_endpoints=3))
    picked = picker.pick(request(predictions=predictions), scored)
    assert [ep.address for ep in picked] == ["b", "a", "c"]


def test_endpoints_meeting_the_objective_come_first_then_the_rest_by_ttft() -> None:
    predictions = predictions_for({"a": 4000, "b": 300, "c": 100, "d": 50})
    slo_s = (predictions["b"].ttft_s + predictions["c"].ttft_s) / 2  # c and d meet it
    scored = [
        ScoredEndpoint(endpoint(a), s) for a, s in (("a", 1.0), ("b", 1.0), ("c", 0.5), ("d", 0.1))
    ]
    picker = SloAwarePicker("p", SloAwarePickerParams(max_num_of_endpoints=4))
    picked = picker.pick(request(predictions=predictions, slo_ttft_s=slo_s), scored)
    assert [ep.address for ep in picked] == ["c", "d", "b", "a"]


def run(coroutine: object) -> None:
    try:
        coroutine.send(None)  # type: ignore[attr-defined]
    except StopIteration:
        return
    raise AssertionError("prepare awaited")


def booked_load(bookings: list[tuple[str, int, int]]) -> ActiveSequences:
    load = ActiveSequences(BLOCK)
    for i, (worker, blocks, prefill) in enumerate(bookings):
        load.add(f"r{i}", worker, range(i * 1000, i * 1000 + blocks), prefill, 0.0)
        if i % 3 == 0:
            load.mark_prefill_complete(f"r{i}")
    return load


@settings(max_examples=150)
@given(
    st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=8, unique=True),
    st.dictionaries(st.sampled_from(ADDRESSES), st.integers(0, 200)),
    st.lists(
        st.tuples(st.sampled_from(ADDRESSES), st.integers(1, 300), st.integers(0, 6000)),
        max_size=12,
    ),
    st.integers(1, 4000),
)
def test_scores_from_the_ttft_column_equal_scores_looked_up_per_endpoint(
    workers: list[str],
    overlaps: dict[str, int],
    bookings: list[tuple[str, int, int]],
    isl: int,
) -> None:
    scorer = PredictedLatencyScorer("p")
    endpoints = [endpoint(w, num_gpu_blocks=4096) for w in workers]
    llm = request(
        tokens=list(range(isl)), block_size=BLOCK, overlaps=overlaps, load=booked_load(bookings)
    )
    run(scorer.prepare(llm, endpoints))
    fast = scorer.score(llm, endpoints)
    # Another list of the same endpoints (what a filter returns): each looked up by address.
    looked_up = scorer.score(llm, [*reversed(endpoints)])
    assert fast == looked_up
    assert max(fast.values()) == 1.0


def test_a_filtered_candidate_list_is_scored_among_itself() -> None:
    scorer = PredictedLatencyScorer("p")
    endpoints = [endpoint(w, num_gpu_blocks=4096) for w in ADDRESSES[:3]]
    llm: LLMRequest = request(
        tokens=list(range(3000)),
        block_size=BLOCK,
        overlaps={ADDRESSES[0]: 150, ADDRESSES[1]: 100},
        load=ActiveSequences(BLOCK),
    )
    run(scorer.prepare(llm, endpoints))
    scores = scorer.score(llm, endpoints)
    assert scores[ADDRESSES[0]] == 1.0
    assert 0.0 < scores[ADDRESSES[1]] < 1.0
    assert scores[ADDRESSES[2]] == 0.0
    without_best: list[Endpoint] = endpoints[1:]
    assert scorer.score(llm, without_best) == {ADDRESSES[1]: 1.0, ADDRESSES[2]: 0.0}


# -- near ties ------------------------------------------------------------------------------------


def route(
    scorer: PredictedLatencyScorer,
    picker: SloAwarePicker,
    endpoints: list[Endpoint],
    *,
    isl: int,
    overlaps: Mapping[str, int],
) -> str:
    """One request through prepare, score, pick and pre_request; the worker chosen."""
    llm = request(
        tokens=list(range(isl)),
        block_size=BLOCK,
        overlaps=dict(overlaps),
        load=ActiveSequences(BLOCK),
    )
    run(scorer.prepare(llm, endpoints))
    scores = scorer.score(llm, endpoints)
    chosen = picker.pick(llm, [ScoredEndpoint(e, scores[e.address]) for e in endpoints])[0]
    scorer.pre_request(llm, SchedulingResult("p", {"p": ProfileResult("p", [chosen])}))
    return chosen.address


def idle_fleet_with_one_worker_calibrated_a_hair_faster(
    tolerance: float,
) -> tuple[PredictedLatencyScorer, list[Endpoint]]:
    scorer = PredictedLatencyScorer("p", PredictedLatencyParams(ttft_tolerance=tolerance))
    endpoints = [endpoint(a, num_gpu_blocks=4096) for a in ADDRESSES]
    for e in endpoints:
        scorer.model.fit(e.address)
    scorer.model.fit(ADDRESSES[3]).theta_token = 0.995
    return scorer, endpoints


def test_new_prompts_on_an_idle_fleet_spread_instead_of_following_calibration_noise() -> None:
    # Nothing cached, nothing queued: every worker is as good as the next but for θ noise.
    picked: dict[float, Counter[str]] = {}
    for tolerance in (0.0, 0.05):
        scorer, endpoints = idle_fleet_with_one_worker_calibrated_a_hair_faster(tolerance)
        picker = SloAwarePicker("pick", rng=random.Random(1))
        picked[tolerance] = Counter(
            route(scorer, picker, endpoints, isl=4000, overlaps={}) for _ in range(32)
        )
    assert picked[0.0] == {ADDRESSES[3]: 32}
    # Each goes where the least was added lately: round after round, one per worker.
    assert picked[0.05] == dict.fromkeys(ADDRESSES, 4)


def test_a_near_tie_goes_to_the_worker_that_holds_the_prompt() -> None:
    scorer = PredictedLatencyScorer("p")
    picker = SloAwarePicker("pick", rng=random.Random(1))
    endpoints = [endpoint(a, num_gpu_blocks=4096) for a in ADDRESSES[:2]]
    # The cached worker predicts a hair slower (its θ), within the tolerance: half the band
    # weighs that difference (~0.1% of 5%), half the harm (it adds 242 blocks, the other 250).
    scorer.model.fit(ADDRESSES[0]).theta_token = 1.03
    scorer.model.fit(ADDRESSES[0]).theta_fixed = 1.03
    llm = request(
        tokens=list(range(4000)),
        block_size=BLOCK,
        overlaps={ADDRESSES[0]: 8},
        load=ActiveSequences(BLOCK),
    )
    run(scorer.prepare(llm, endpoints))
    assert llm.predictions is not None
    ttft = {a: llm.predictions[a].ttft_s for a in ADDRESSES[:2]}
    assert ttft[ADDRESSES[1]] < ttft[ADDRESSES[0]] <= ttft[ADDRESSES[1]] * 1.05
    assert route(scorer, picker, endpoints, isl=4000, overlaps={ADDRESSES[0]: 8}) == ADDRESSES[0]


def test_costs_beyond_the_tolerance_keep_their_order() -> None:
    scorer = PredictedLatencyScorer("p")
    endpoints = [endpoint(a, num_gpu_blocks=4096) for a in ADDRESSES[:3]]
    # Worker 0 caches most of the prompt: far cheaper than the two others, which tie.
    llm = request(
        tokens=list(range(4000)),
        block_size=BLOCK,
        overlaps={ADDRESSES[0]: 200},
        load=ActiveSequences(BLOCK),
    )
    run(scorer.prepare(llm, endpoints))
    scores = scorer.score(llm, endpoints)
    assert scores[ADDRESSES[0]] == 1.0
    assert scores[ADDRESSES[1]] == scores[ADDRESSES[2]] == 0.0


def test_a_long_prompt_queues_for_a_fresher_cache_only_when_the_wait_is_noise() -> None:
    # A 40K-token prompt costs ~800 ms anywhere (5%: ~40 ms); worker 0 added 5,000 blocks to
    # its cache lately, worker 1 nothing.
    def pick(queued_on_1: int) -> str:
        scorer = PredictedLatencyScorer("p")
        scorer.churn.add(ADDRESSES[0], 5_000, scorer.clock())
        endpoints = [endpoint(a, num_gpu_blocks=32_768) for a in ADDRESSES[:2]]
        load = ActiveSequences(BLOCK)
        if queued_on_1:
            hashes = list(range(10**6, 10**6 + queued_on_1 // BLOCK))
            load.add("queued", ADDRESSES[1], hashes, queued_on_1, 0.0)
        llm = request(tokens=list(range(40_000)), block_size=BLOCK, overlaps={}, load=load)
        run(scorer.prepare(llm, endpoints))
        assert llm.predictions is not None
        ttft = [llm.predictions[a].ttft_s for a in ADDRESSES[:2]]
        assert ttft[1] < ttft[0] * 1.05
        scores = scorer.score(llm, endpoints)
        return max(scores, key=lambda a: scores[a])

    assert pick(queued_on_1=0) == ADDRESSES[1]
    # 1,000 tokens of prefill queued on worker 1: ~30 ms, most of the band, a real wait.
    assert pick(queued_on_1=1_000) == ADDRESSES[0]


def test_recent_additions_halve_every_half_life() -> None:
    churn = CacheChurn(half_life_s=10.0)
    churn.add("w", 100, now=0.0)
    assert churn.recent("w", 10.0) == pytest.approx(50.0)
    churn.add("w", 50, now=10.0)
    assert churn.recent("w", 20.0) == pytest.approx(50.0)
    assert churn.recent("other", 20.0) == 0.0
    churn.forget("w")
    assert churn.recent("w", 20.0) == 0.0


def test_a_worker_whose_cache_cannot_take_the_request_loses_its_cache_hit() -> None:
    # Worker 0 caches the request's 256-block prefix, but three other 272-block prompts run
    # there and its cache holds 1,024 blocks: the request waits for one of them to finish.
    prompt, prefix = 4352, 256
    scorer = PredictedLatencyScorer("p")
    endpoints = [endpoint(w, num_gpu_blocks=1024) for w in ADDRESSES[:2]]
    hashes = list(range(prompt // BLOCK))
    load = ActiveSequences(BLOCK)
    for i in range(3):
        load.add(f"other-{i}", ADDRESSES[0], [10_000 * (i + 1) + b for b in hashes], 0, 0.0)
        load.mark_prefill_complete(f"other-{i}")

    def pick() -> str:
        llm: LLMRequest = request(
            {"model": "m", "prompt": "x", "max_tokens": 32},
            tokens=list(range(prompt)),
            block_size=BLOCK,
            block_hashes=hashes,
            overlaps={ADDRESSES[0]: prefix},
            load=load,
        )
        run(scorer.prepare(llm, endpoints))
        scores = scorer.score(llm, endpoints)
        return max(scores, key=lambda a: scores[a])

    assert pick() == ADDRESSES[1]
    # One of the running requests shares the prefix: its blocks need no room, the hit wins.
    load.add("sibling", ADDRESSES[0], hashes[:prefix], 0, 0.0)
    load.mark_prefill_complete("sibling")
    load.free("other-2")
    assert pick() == ADDRESSES[0]
