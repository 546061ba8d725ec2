"""Properties of the scheduler and the config loader over generated inputs."""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import (
    Filter,
    Picker,
    PluginContext,
    SchedulerProfile,
    Scorer,
    WeightedScorer,
)
from kvgate.scheduling.picker_config import (
    API_VERSION,
    KIND,
    EppConfigError,
    build_epp_config,
    epp_config_from_dict,
    parse_epp_config,
)
from kvgate.scheduling.plugins.max_score_picker import MaxScorePicker
from kvgate.scheduling.plugins.random_picker import RandomPicker
from kvgate.scheduling.plugins.round_robin_picker import RoundRobinPicker
from kvgate.scheduling.plugins.single_profile_handler import SingleProfileHandler
from kvgate.scheduling.plugins.weighted_random_picker import WeightedRandomPicker
from kvgate.scheduling.registry import BUILTIN_PLUGINS
from kvgate.scheduling.request import LLMRequest, SchedulingError, ScoredEndpoint
from kvgate.scheduling.scheduler import Scheduler
from tests.scheduling.utils import endpoint, request

ADDRESSES = [f"10.0.0.{i}:8000" for i in range(1, 9)]
RAW_SCORES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=1),
)


class Keep(Filter):
    type_name = "keep"

    def __init__(self, name: str, keep: set[str]) -> None:
        super().__init__(name)
        self.keep = keep

    def filter(self, request: LLMRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        return [ep for ep in endpoints if ep.address in self.keep]


class Given(Scorer):
    type_name = "given"

    def __init__(self, name: str, scores: dict[str, float]) -> None:
        super().__init__(name)
        self.scores = scores

    def score(self, request: LLMRequest, endpoints: list[Endpoint]) -> dict[str, float]:
        return self.scores


def clamp(s: float) -> float:
    return 0.0 if not s >= 0 else min(s, 1.0)


PICKERS = [MaxScorePicker, RandomPicker, WeightedRandomPicker]


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    present = draw(st.lists(st.sampled_from(ADDRESSES), unique=True, max_size=8))
    keeps = draw(st.lists(st.sets(st.sampled_from(ADDRESSES)), max_size=3))
    scorers = draw(
        st.lists(
            st.tuples(
                st.dictionaries(st.sampled_from([*ADDRESSES, "stray:1"]), RAW_SCORES),
                st.floats(min_value=0, max_value=10),
            ),
            max_size=4,
        )
    )
    k = draw(st.integers(1, 5))
    picker_index = draw(st.integers(0, len(PICKERS)))
    return {"present": present, "keeps": keeps, "scorers": scorers, "k": k, "picker": picker_index}


def scheduler_for(case: dict[str, Any], seed: int) -> Scheduler:
    picker: Picker
    if case["picker"] == len(PICKERS):
        picker = RoundRobinPicker("pick", max_num_of_endpoints=case["k"])
    else:
        picker = PICKERS[case["picker"]](
            "pick", max_num_of_endpoints=case["k"], rng=random.Random(seed)
        )
    profile = SchedulerProfile(
        "p",
        [Keep(f"f{i}", keep) for i, keep in enumerate(case["keeps"])],
        [WeightedScorer(Given(f"s{i}", s), w) for i, (s, w) in enumerate(case["scorers"])],
        picker,
    )
    return Scheduler(SingleProfileHandler("h"), {"p": profile}, [])


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(scenarios(), st.integers(0, 2**32))
def test_scheduler_picks_only_survivors_distinct_within_k(case: dict[str, Any], seed: int) -> None:
    scheduler = scheduler_for(case, seed)
    eps = [endpoint(a) for a in case["present"]]
    survivors = set(case["present"])
    for keep in case["keeps"]:
        survivors &= keep
    try:
        result = scheduler.schedule(request(), eps)
    except SchedulingError as err:
        assert err.status == (503 if not eps else 429)
        assert not survivors
        return
    picked = [ep.address for ep in result.primary.endpoints]
    assert picked and set(picked) <= survivors
    assert len(picked) == len(set(picked)) == min(case["k"], len(survivors))


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(scenarios(), st.integers(0, 2**32))
def test_totals_are_clamped_weighted_sums(case: dict[str, Any], seed: int) -> None:
    case["keeps"] = []
    scheduler = scheduler_for(case, seed)
    eps = [endpoint(a) for a in case["present"]]
    if not eps:
        return
    totals = scheduler.schedule(request(), eps).primary.scores
    assert set(totals) == set(case["present"])
    ceiling = sum(w for _, w in case["scorers"])
    for address, total in totals.items():
        expected = sum(w * clamp(s.get(address, 0.0)) for s, w in case["scorers"])
        assert 0.0 <= total <= ceiling + 1e-9
        assert math.isclose(total, expected, rel_tol=1e-9, abs_tol=1e-9)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(ADDRESSES), st.floats(0, 3), min_size=1),
    st.integers(1, 9),
    st.integers(0, 2**32),
)
def test_max_score_fallbacks_are_distinct_best_first(
    scores: dict[str, float], k: int, seed: int
) -> None:
    picker = MaxScorePicker("p", max_num_of_endpoints=k, rng=random.Random(seed))
    picked = picker.pick(request(), [ScoredEndpoint(endpoint(a), s) for a, s in scores.items()])
    got = [scores[ep.address] for ep in picked]
    assert len({ep.address for ep in picked}) == len(picked) == min(k, len(scores))
    assert got == sorted(scores.values(), reverse=True)[: len(got)]


# -- config dicts ----------------------------------------------------------------------------

# The KV plugins need services (tokenizer, DYNAMO_* environment) this test does not provide.
SERVICE_FREE = [
    t for t, _ in BUILTIN_PLUGINS if t not in {"kv-aware-scorer", "dynamo-response-complete"}
]
TYPES = [*SERVICE_FREE, "nope", ""]
PARAM_KEYS = [
    "maxNumOfEndpoints",
    "threshold",
    "autoTune",
    "blockSizeTokens",
    "maxPrefixBlocksToMatch",
    "lruCapacityPerServer",
    "queueDepthThreshold",
    "kvCacheUtilThreshold",
    "metricsStalenessThreshold",
    "decodeProfile",
    "prefillProfile",
    "bogus",
]
NAMES = ["a", "b", "decode", "prefill", "default", *TYPES[:6]]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([*NAMES, "200ms", "2s", "x", "fast"]),
)
ANY = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from([*PARAM_KEYS, "name", "type", "pluginRef"]), inner, max_size=3
        ),
    ),
    max_leaves=6,
)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the well-typed value, sometimes anything."""
    return st.one_of(strategy, strategy, strategy, ANY)


plugin_entries = st.fixed_dictionaries(
    {"type": maybe(st.sampled_from(TYPES))},
    optional={
        "name": maybe(st.sampled_from(NAMES)),
        "parameters": maybe(st.dictionaries(st.sampled_from(PARAM_KEYS), SCALARS, max_size=3)),
    },
)
refs = st.fixed_dictionaries(
    {"pluginRef": maybe(st.sampled_from(NAMES))},
    optional={"weight": maybe(st.one_of(st.integers(-1, 5), st.floats(-1, 5)))},
)
profile_entries = st.fixed_dictionaries(
    {"name": maybe(st.sampled_from(NAMES))},
    optional={"plugins": maybe(st.lists(refs, max_size=4))},
)
configs = st.fixed_dictionaries(
    {
        "apiVersion": st.sampled_from([API_VERSION] * 9 + ["v1"]),
        "kind": st.sampled_from([KIND] * 9 + ["Other"]),
        "plugins": maybe(st.lists(plugin_entries, max_size=5)),
    },
    optional={
        "schedulingProfiles": maybe(st.lists(profile_entries, max_size=3)),
        "featureGates": maybe(st.lists(st.text(max_size=5), max_size=2)),
        "saturationDetector": maybe(
            st.dictionaries(
                st.sampled_from(
                    [
                        "pluginRef",
                        "queueDepthThreshold",
                        "kvCacheUtilThreshold",
                        "metricsStalenessThreshold",
                        "other",
                    ]
                ),
                SCALARS,
                max_size=3,
            )
        ),
    },
)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(configs, configs, configs, ANY))
def test_random_config_dicts_raise_only_config_errors(raw: Any) -> None:
    try:
        loaded = build_epp_config(epp_config_from_dict(raw), context=PluginContext(rng_seed=1))
    except EppConfigError as err:
        assert str(err).split(":", 1)[0] == err.path
        return
    assert loaded.profiles
    for profile in loaded.profiles.values():
        assert profile.picker is not None


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
def test_random_text_raises_only_config_errors(text: str) -> None:
    with contextlib.suppress(EppConfigError):
        parse_epp_config(text)
