from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence

import pytest

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import (
    Filter,
    Picker,
    Plugin,
    Product,
    ProfileHandler,
    SchedulerProfile,
    Scorer,
    WeightedScorer,
)
from kvgate.scheduling.plugins.max_score_picker import MaxScorePicker
from kvgate.scheduling.plugins.single_profile_handler import SingleProfileHandler
from kvgate.scheduling.request import (
    LLMRequest,
    ProfileResult,
    ResponseInfo,
    SchedulingError,
    SchedulingResult,
    ScoredEndpoint,
)
from kvgate.scheduling.scheduler import (
    FILTER,
    PICKER,
    PRE_REQUEST,
    PREPARE_DATA,
    PROFILE_HANDLER,
    RESPONSE_COMPLETE,
    SCORER,
    PluginTimings,
    Scheduler,
)
from tests.scheduling.utils import endpoints, request


class Fixed(Scorer):
    type_name = "fixed"

    def __init__(self, name: str, scores: Mapping[str, float]) -> None:
        super().__init__(name)
        self.scores = dict(scores)

    def score(self, request: LLMRequest, endpoints: list[Endpoint]) -> dict[str, float]:
        return self.scores


class Drop(Filter):
    type_name = "drop"

    def __init__(self, name: str, *addresses: str) -> None:
        super().__init__(name)
        self.addresses = set(addresses)

    def filter(self, request: LLMRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        return [ep for ep in endpoints if ep.address not in self.addresses]


class Nothing(Picker):
    type_name = "nothing"

    def pick(self, request: LLMRequest, scored: list[ScoredEndpoint]) -> list[Endpoint]:
        return []


class Maker(Plugin):
    """Produces what it is told to, after what it consumes, recording the order."""

    type_name = "maker"

    def __init__(
        self,
        name: str,
        calls: list[str],
        produces: frozenset[Product],
        consumes: frozenset[Product] = frozenset(),
        *,
        fail: bool = False,
    ) -> None:
        super().__init__(name)
        self.calls = calls
        self.produces = produces  # type: ignore[misc]
        self.consumes = consumes  # type: ignore[misc]
        self.fail = fail

    async def prepare(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> None:
        self.calls.append(f"{self.name}.prepare({len(endpoints)})")
        if self.fail:
            raise RuntimeError(f"{self.name} broke")


class Recorder(Plugin):
    """Overrides every request-control hook and records the calls."""

    type_name = "recorder"

    def __init__(self, name: str, calls: list[str], *, fail: bool = False) -> None:
        super().__init__(name)
        self.calls = calls
        self.fail = fail

    def _log(self, hook: str) -> None:
        self.calls.append(f"{self.name}.{hook}")
        if self.fail:
            raise RuntimeError(f"{self.name} broke")

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        self._log("pre_request")

    def response_received(
        self, request: LLMRequest, result: SchedulingResult, headers: Mapping[str, str]
    ) -> None:
        self._log("response_received")

    def response_streaming(
        self, request: LLMRequest, result: SchedulingResult, first_chunk: bool
    ) -> None:
        self._log("response_streaming")

    def response_complete(
        self, request: LLMRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        self._log("response_complete")

    def on_endpoints_changed(self, joined: list[Endpoint], left: list[Endpoint]) -> None:
        self._log("on_endpoints_changed")


def make(
    *,
    filters: Sequence[Filter] = (),
    scorers: Sequence[tuple[Scorer, float]] = (),
    picker: Picker | None = None,
    plugins: Sequence[Plugin] = (),
    timings: PluginTimings | None = None,
) -> Scheduler:
    profile = SchedulerProfile(
        "default",
        list(filters),
        [WeightedScorer(s, w) for s, w in scorers],
        picker or MaxScorePicker("picker", rng=random.Random(0)),
    )
    return Scheduler(
        SingleProfileHandler("single"), {"default": profile}, plugins, observer=timings
    )


EPS = endpoints(3)
A, B, C = (ep.address for ep in EPS)


def test_no_endpoints_is_503() -> None:
    with pytest.raises(SchedulingError) as err:
        make().schedule(request(), [])
    assert err.value.status == 503


def test_everything_filtered_is_429_naming_the_filter() -> None:
    with pytest.raises(SchedulingError) as err:
        make(filters=[Drop("keep-b", A, C), Drop("no-b", B)]).schedule(request(), EPS)
    assert err.value.status == 429
    assert "'no-b'" in str(err.value) and "3 endpoints" in str(err.value)


def test_a_picker_that_picks_nothing_is_429() -> None:
    with pytest.raises(SchedulingError) as err:
        make(picker=Nothing("none")).schedule(request(), EPS)
    assert err.value.status == 429


def test_filters_run_in_order_and_the_pick_is_a_survivor() -> None:
    result = make(filters=[Drop("a", A), Drop("c", C)]).schedule(request(), EPS)
    assert result.endpoint.address == B
    assert list(result.primary.scores) == [B]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(0.25, 0.5, id="in-range-times-weight"),
        pytest.param(7.0, 2.0, id="above-one-clamped"),
        pytest.param(-3.0, 0.0, id="negative-clamped"),
        pytest.param(math.nan, 0.0, id="nan-counts-zero"),
        pytest.param(math.inf, 2.0, id="infinity-clamped"),
    ],
)
def test_scores_are_clamped_then_weighted(raw: float, expected: float) -> None:
    result = make(scorers=[(Fixed("s", {A: raw}), 2.0)]).schedule(request(), EPS)
    assert result.primary.scores == {A: expected, B: 0.0, C: 0.0}


def test_weighted_scores_are_summed_and_decide_the_pick() -> None:
    s1 = Fixed("load", {A: 1.0, B: 0.5, C: 0.0})
    s2 = Fixed("cache", {A: 0.0, B: 0.5, C: 1.0})
    result = make(scorers=[(s1, 1.0), (s2, 3.0)]).schedule(request(), EPS)
    assert result.primary.scores == {A: 1.0, B: 2.0, C: 3.0}
    assert result.endpoint.address == C


def test_scores_for_non_candidates_are_ignored() -> None:
    scheduler = make(filters=[Drop("a", A)], scorers=[(Fixed("s", {A: 1.0, "x:1": 1.0}), 1.0)])
    assert scheduler.schedule(request(), EPS).primary.scores == {B: 0.0, C: 0.0}


async def test_hooks_reach_only_the_plugins_that_override_them() -> None:
    calls: list[str] = []
    timings = PluginTimings()
    plain = Fixed("plain", {})
    maker = Maker("m", calls, frozenset({Product.TOKENS}))
    scheduler = make(
        scorers=[(plain, 1.0)], plugins=[Recorder("r1", calls), plain, maker], timings=timings
    )
    req = request()
    await scheduler.prepare(req, EPS)
    result = scheduler.schedule(req, EPS)
    scheduler.pre_request(req, result)
    scheduler.response_received(req, result, {":status": "200"})
    scheduler.response_streaming(req, result, True)
    scheduler.response_complete(req, result, ResponseInfo(status=200))
    scheduler.endpoints_changed([], EPS[:1])
    assert calls == [
        "m.prepare(3)",
        "r1.pre_request",
        "r1.response_received",
        "r1.response_streaming",
        "r1.response_complete",
        "r1.on_endpoints_changed",
    ]
    hooked = {(point, name) for point, _, name in timings.stats}
    assert (PRE_REQUEST, "plain") not in hooked
    assert (PRE_REQUEST, "r1") in hooked


async def test_producers_run_after_the_producers_of_what_they_consume() -> None:
    calls: list[str] = []
    predict = Maker(
        "predict",
        calls,
        frozenset({Product.LATENCY_PREDICTIONS}),
        frozenset({Product.PREFIX_OVERLAPS, Product.TOKENS}),
    )
    overlaps = Maker(
        "overlaps", calls, frozenset({Product.PREFIX_OVERLAPS}), frozenset({Product.TOKENS})
    )
    tokens = Maker("tokens", calls, frozenset({Product.TOKENS}))
    scheduler = make(plugins=[predict, overlaps, tokens])
    await scheduler.prepare(request(), EPS)
    assert calls == ["tokens.prepare(3)", "overlaps.prepare(3)", "predict.prepare(3)"]


@pytest.mark.parametrize(
    ("plugins", "message"),
    [
        (
            [Maker("p", [], frozenset({Product.LATENCY_PREDICTIONS}), frozenset({Product.TOKENS}))],
            "plugin 'p' \\(type 'maker'\\) needs 'tokens', which no configured plugin produces",
        ),
        (
            [
                Maker("a", [], frozenset({Product.TOKENS})),
                Maker("b", [], frozenset({Product.TOKENS})),
            ],
            "plugins 'a' and 'b' both produce 'tokens'",
        ),
        (
            [
                Maker("a", [], frozenset({Product.TOKENS}), frozenset({Product.PREFIX_OVERLAPS})),
                Maker("b", [], frozenset({Product.PREFIX_OVERLAPS}), frozenset({Product.TOKENS})),
            ],
            "in a cycle",
        ),
        ([Maker("a", [], frozenset())], "implements prepare but declares no product"),
    ],
    ids=["missing-producer", "two-producers", "cycle", "prepare-without-product"],
)
def test_products_are_checked_at_construction(plugins: list[Plugin], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(plugins=plugins)


def test_a_failing_hook_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    scheduler = make(plugins=[Recorder("bad", calls, fail=True), Recorder("good", calls)])
    req = request()
    result = scheduler.schedule(req, EPS)
    with caplog.at_level(logging.ERROR):
        scheduler.pre_request(req, result)
        scheduler.response_received(req, result, {})
        scheduler.response_streaming(req, result, False)
        scheduler.response_complete(req, result, ResponseInfo(aborted=True))
        scheduler.endpoints_changed(EPS, [])
    assert [c for c in calls if c.startswith("good")] == [
        "good.pre_request",
        "good.response_received",
        "good.response_streaming",
        "good.response_complete",
        "good.on_endpoints_changed",
    ]
    assert caplog.text.count("bad broke") == 5


async def test_a_failing_prepare_propagates() -> None:
    scheduler = make(plugins=[Maker("bad", [], frozenset({Product.TOKENS}), fail=True)])
    with pytest.raises(RuntimeError, match="bad broke"):
        await scheduler.prepare(request(), EPS)


def test_every_plugin_call_is_timed() -> None:
    timings = PluginTimings()
    scheduler = make(
        filters=[Drop("f")], scorers=[(Fixed("s", {}), 1.0)], plugins=[], timings=timings
    )
    for _ in range(3):
        scheduler.schedule(request(), EPS)
    stats = {(point, name): stat for (point, _, name), stat in timings.stats.items()}
    assert stats[(FILTER, "f")].calls == 3
    assert stats[(SCORER, "s")].calls == 3
    assert stats[(PICKER, "picker")].calls == 3
    assert stats[(PROFILE_HANDLER, "single")].calls == 9  # 2 picks + 1 process per request
    assert all(s.total_s >= s.max_s >= 0 for s in stats.values())
    assert (PREPARE_DATA, "f") not in stats and (RESPONSE_COMPLETE, "f") not in stats


def test_profile_plugins_not_listed_still_get_hooks() -> None:
    calls: list[str] = []

    class HookedFilter(Drop):
        def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
            calls.append(self.name)

    scheduler = make(filters=[HookedFilter("hf")])
    req = request()
    scheduler.pre_request(req, scheduler.schedule(req, EPS))
    assert calls == ["hf"]
    assert len(scheduler.plugins) == 3


class Looping(ProfileHandler):
    type_name = "looping"

    def __init__(self, name: str, answer: str) -> None:
        super().__init__(name)
        self.answer = answer

    def pick_profiles(
        self,
        request: LLMRequest,
        profiles: Mapping[str, SchedulerProfile],
        results: Mapping[str, ProfileResult],
    ) -> Sequence[str]:
        return [self.answer]

    def process_results(
        self, request: LLMRequest, results: Mapping[str, ProfileResult]
    ) -> SchedulingResult:
        raise AssertionError("unreachable")


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        pytest.param("default", "already run", id="rerun-would-loop-forever"),
        pytest.param("ghost", "unknown", id="unknown-profile"),
    ],
)
def test_a_misbehaving_profile_handler_is_an_internal_error(answer: str, message: str) -> None:
    profile = SchedulerProfile("default", picker=MaxScorePicker("p", rng=random.Random(0)))
    scheduler = Scheduler(Looping("loop", answer), {"default": profile}, [])
    with pytest.raises(SchedulingError, match=message) as err:
        scheduler.schedule(request(), EPS)
    assert err.value.status == 500


def test_a_profile_without_picker_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="no picker"):
        Scheduler(SingleProfileHandler("s"), {"p": SchedulerProfile("p")}, [])
