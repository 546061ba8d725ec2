from __future__ import annotations

import pytest

from kvgate.bench.policies import (
    POLICIES,
    LeastLoadedScorer,
    SglangCacheAwareParams,
    SglangCacheAwareScorer,
    bench_registry,
)
from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import PluginContext
from kvgate.scheduling.picker_config import load_epp_config
from kvgate.scheduling.request import LLMRequest, ProfileResult, ResponseInfo, SchedulingResult

EPS = [Endpoint(f"10.0.0.{i}:8000") for i in (1, 2, 3)]
BLOCK = 16


def req(request_id: str, hashes: list[int]) -> LLMRequest:
    tokens = list(range(len(hashes) * BLOCK))
    return LLMRequest(
        request_id,
        "m",
        None,
        {},
        {},
        tokens=tokens,
        block_hashes=hashes,
        block_size=BLOCK,
    )


def picked(endpoint: Endpoint) -> SchedulingResult:
    return SchedulingResult("default", {"default": ProfileResult("default", [endpoint])})


def route(scorer: SglangCacheAwareScorer | LeastLoadedScorer, request: LLMRequest) -> Endpoint:
    scores = scorer.score(request, EPS)
    best = max(EPS, key=lambda ep: (scores.get(ep.address, 0.0), -EPS.index(ep)))
    scorer.pre_request(request, picked(best))
    return best


def sglang(**params: float) -> SglangCacheAwareScorer:
    now = [0.0]
    context = PluginContext(now=lambda: now[0])
    return SglangCacheAwareScorer("s", SglangCacheAwareParams(**params), context)  # type: ignore[arg-type]


def test_every_policy_builds_through_the_epp_config_loader() -> None:
    for name, text in POLICIES.items():
        context = PluginContext(
            env={"DYNAMO_KV_BLOCK_SIZE": "16"}, rng_seed=1, requests_carry_tokens=True
        )
        plugins = load_epp_config(text, registry=bench_registry(), context=context)
        assert plugins.scheduler().plugins, name


def test_sglang_follows_a_long_match() -> None:
    scorer = sglang()
    first = route(scorer, req("a", [1, 2, 3, 4]))
    assert route(scorer, req("b", [1, 2, 3, 9])) is first, "3 of 4 blocks match: above 0.3"


def test_sglang_goes_to_the_least_loaded_below_the_threshold() -> None:
    scorer = sglang()
    first = route(scorer, req("a", [1, 2, 3, 4]))
    # One block of four (0.25) is not above 0.3: the least loaded (not `first`) wins.
    assert route(scorer, req("b", [1, 7, 8, 9])) is not first


def test_sglang_balances_when_imbalanced() -> None:
    scorer = sglang(balance_abs_threshold=1, balance_rel_threshold=1.0)
    first = route(scorer, req("a", [1, 2]))
    second = route(scorer, req("b", [1, 2]))
    assert second is first, "loads 1,0,0: the gap is not above 1 yet"
    # Loads 2,0,0: imbalanced, so the cache match no longer counts.
    assert route(scorer, req("c", [1, 2])) is not first
    scorer.response_complete(req("a", []), picked(first), ResponseInfo())


def test_sglang_trims_trees_at_the_eviction_interval() -> None:
    now = [0.0]
    params = SglangCacheAwareParams(eviction_interval_s=10.0, max_tree_size=2 * BLOCK)
    scorer = SglangCacheAwareScorer("s", params, PluginContext(now=lambda: now[0]))
    first = route(scorer, req("a", [1, 2, 3, 4]))
    now[0] = 11.0
    # The tree keeps the 2 most recent blocks (the leading ones): a 4-block match is gone.
    assert route(scorer, req("b", [1, 2, 3, 4])) is first
    scorer.response_complete(req("a", []), picked(first), ResponseInfo())
    scorer.response_complete(req("b", []), picked(first), ResponseInfo())


@pytest.mark.parametrize(
    ("loads", "expected"),
    [
        pytest.param([2, 0, 1], {"10.0.0.2:8000"}, id="single-least-loaded"),
        pytest.param([1, 1, 2], {"10.0.0.1:8000", "10.0.0.2:8000"}, id="ties-all-score-one"),
    ],
)
def test_least_loaded_scores_the_fewest_in_flight(loads: list[int], expected: set[str]) -> None:
    scorer = LeastLoadedScorer("ll")
    n = 0
    for ep, load in zip(EPS, loads, strict=True):
        for _ in range(load):
            scorer.pre_request(req(f"r{n}", []), picked(ep))
            n += 1
    assert set(scorer.score(req("x", []), EPS)) == expected
    scorer.response_complete(req("r0", []), picked(EPS[0]), ResponseInfo())
