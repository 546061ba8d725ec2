"""The native predictor (`_latency.c`) against the Python it replaces: the same predictions to the
last bit, the same calibration records made, and the Python taking over outside the range where
the native arithmetic is exact."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling import latency_model
from kvgate.scheduling._latency import (
    min_max_scores,
    near_ties,
    predict,
    settle_near_ties,
    top_scored,
)
from kvgate.scheduling.latency_model import (
    EngineCost,
    LatencyModel,
    Predictions,
    WorkerFit,
    min_max_scores_python,
)
from kvgate.scheduling.plugins import slo_aware_picker
from kvgate.scheduling.plugins.predicted_latency_scorer import (
    near_ties_python,
    settle_near_ties_python,
)
from kvgate.scheduling.plugins.slo_aware_picker import top_scored_python
from kvgate.scheduling.request import LoadTables, ScoredEndpoint
from tests.scheduling.utils import endpoint

ADDRESSES = [f"10.0.0.{i}:8000" for i in range(12)]


def test_the_native_predictor_is_built() -> None:
    # `pip install -e .` builds it wherever gcc and Python's headers exist (CI included).
    assert latency_model.NATIVE_PREDICTION


@dataclass
class Case:
    endpoints: list[Endpoint]
    overlaps: dict[str, int]
    active_overlaps: dict[str, int]
    load: LoadTables
    fits: dict[str, tuple[float, float, float, int]]
    cost: EngineCost
    isl: int
    block_size: int
    default_kv_blocks: int
    output_tokens: int

    def model(self) -> LatencyModel:
        model = LatencyModel(self.cost)
        for worker, (theta_fixed, theta_token, itl_scale, observations) in self.fits.items():
            fit = model.fits[worker] = WorkerFit(theta_fixed, theta_token, itl_scale, 0.5)
            fit.observations = observations
        return model

    def native_declines(self, model: LatencyModel) -> bool:
        c = self.cost
        terms = (
            c.prefill_fixed_ms,
            c.prefill_per_token_ms,
            c.prefill_per_token_sq_ms,
            c.decode_fixed_ms,
            c.decode_linear_ms,
            c.decode_square_ms,
            c.decode_floor_ms,
            c.max_num_batched_tokens,
        )
        made = predict(
            self.endpoints,
            self.overlaps,
            self.active_overlaps,
            *self.load,
            model.fits,
            model.fit,
            self.isl,
            self.block_size,
            self.default_kv_blocks,
            self.output_tokens,
            terms,
        )
        return made is None

    def predict(self, model: LatencyModel, *, native: bool) -> Predictions:
        run = model.predict_endpoints if native else model.predict_endpoints_python
        return run(
            self.endpoints,
            isl=self.isl,
            block_size=self.block_size,
            overlaps=self.overlaps,
            load=self.load,
            default_kv_blocks=self.default_kv_blocks,
            expected_output_tokens=self.output_tokens,
            active_overlaps=self.active_overlaps,
        )


counts = st.integers(-1000, 1 << 22)
thetas = st.floats(0.25, 4.0)


@st.composite
def cases(draw: st.DrawFn, count: st.SearchStrategy[int] = counts) -> Case:
    workers = draw(st.lists(st.sampled_from(ADDRESSES), max_size=10))  # repeats allowed
    endpoints = [
        endpoint(
            worker,
            waiting=draw(st.integers(0, 40)),
            booked_prefilling=draw(st.one_of(st.none(), st.integers(0, 50))),
            num_gpu_blocks=draw(st.one_of(st.none(), st.just(0), st.integers(-5, 1 << 20))),
            stale=draw(st.booleans()),
        )
        for worker in workers
    ]

    def table(values: st.SearchStrategy[int]) -> dict[str, int]:
        return draw(st.dictionaries(st.sampled_from(ADDRESSES), values, max_size=12))

    cost = EngineCost(
        prefill_fixed_ms=draw(st.floats(0, 50)),
        prefill_per_token_ms=draw(st.floats(0, 1)),
        prefill_per_token_sq_ms=draw(st.floats(0, 1e-3)),
        decode_fixed_ms=draw(st.floats(-10, 10)),
        decode_linear_ms=draw(st.floats(-100, 100)),
        decode_square_ms=draw(st.floats(-100, 100)),
        decode_floor_ms=draw(st.floats(0, 5)),
        max_num_batched_tokens=draw(st.integers(1, 16384)),
    )
    fit = st.tuples(thetas, thetas, thetas, st.integers(0, 3))
    return Case(
        endpoints=endpoints,
        overlaps=table(count),
        active_overlaps=table(count),
        load=(
            table(count),
            table(st.integers(0, 50)),
            table(st.integers(0, 80)),
            table(count),
            table(count),
        ),
        fits=draw(st.dictionaries(st.sampled_from(ADDRESSES), fit, max_size=6)),
        cost=cost,
        isl=draw(count.filter(lambda n: n >= 0)),  # a prompt length
        block_size=draw(st.sampled_from([1, 16, 64, 512])),
        default_kv_blocks=draw(st.integers(1, 1 << 20)),
        output_tokens=draw(st.integers(1, 4096)),
    )


def assert_same(native: Predictions, python: Predictions, a: LatencyModel, b: LatencyModel) -> None:
    assert native.workers == python.workers
    assert native.ttft_ms == python.ttft_ms  # exactly: the same double operations in order
    for worker in python:
        assert native[worker] == python[worker]
    # Calibration: the same records made, in the same order, from the same pool prior.
    assert list(a.fits) == list(b.fits)
    for worker, fit in a.fits.items():
        other = b.fits[worker]
        assert (fit.theta_fixed, fit.theta_token, fit.itl_scale) == (
            other.theta_fixed,
            other.theta_token,
            other.itl_scale,
        )


@settings(max_examples=400)
@given(cases())
def test_native_predictions_equal_the_python(case: Case) -> None:
    assert not case.native_declines(case.model()), "within its range, the native code runs"
    a, b = case.model(), case.model()
    assert_same(case.predict(a, native=True), case.predict(b, native=False), a, b)


@settings(max_examples=150)
@given(cases(count=st.integers(0, 1 << 60)))
def test_counts_beyond_exact_doubles_fall_back_to_the_python(case: Case) -> None:
    # Python's ints do not overflow; the native code declines what it cannot compute exactly.
    a, b = case.model(), case.model()
    assert_same(case.predict(a, native=True), case.predict(b, native=False), a, b)


def test_what_the_native_code_declines() -> None:
    ep = [endpoint("10.0.0.1:8000", num_gpu_blocks=100)]
    model = LatencyModel()
    c = model.cost
    terms = (c.prefill_fixed_ms, c.prefill_per_token_ms, c.prefill_per_token_sq_ms,
             c.decode_fixed_ms, c.decode_linear_ms, c.decode_square_ms, c.decode_floor_ms,
             c.max_num_batched_tokens)  # fmt: skip
    empty: dict[str, int] = {}
    tables = (empty, empty, empty, empty, empty)

    def run(
        *,
        overlaps: Mapping[str, object] = empty,
        held: Mapping[str, object] = empty,
        cost: tuple[object, ...] = terms,
    ) -> object:
        return predict(ep, overlaps, held, *tables, model.fits, model.fit, 100, 16, 10, 8, cost)  # type: ignore[arg-type]

    assert run() is not None
    assert run(overlaps={"10.0.0.1:8000": 1 << 53}) is None  # beyond exact doubles
    assert run(overlaps={"10.0.0.1:8000": 2.0}) is None  # not an int
    assert run(overlaps=DictSubclass({"10.0.0.1:8000": 1})) is None  # not exactly a dict
    assert run(held={"10.0.0.1:8000": 1 << 53}) is None
    assert run(held=DictSubclass()) is None
    tables = (empty, empty, empty, empty, {"10.0.0.1:8000": 1 << 53})  # the context sum too
    assert run() is None
    tables = (empty, empty, empty, empty, empty)
    assert run(cost=(16, *terms[1:])) is None  # an int coefficient: Python computes in ints
    ep[0].metrics.waiting = 1.5  # type: ignore[assignment]
    assert run() is None


class DictSubclass(dict[str, int]):
    """A dict subclass: the native code takes exact dicts only."""


def test_bad_arguments_raise_instead_of_crashing() -> None:
    model = LatencyModel()
    terms = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 8)
    empty: dict[str, int] = {}
    good = (
        [endpoint()],
        empty,
        empty,
        empty,
        empty,
        empty,
        empty,
        empty,
        model.fits,
        model.fit,
        10,
        16,
        5,
        8,
        terms,
    )
    for position, bad in ((0, 5), (14, (1.0,)), (14, "x"), (0, [object()]), (9, None)):
        args = list(good)
        args[position] = bad
        with pytest.raises((TypeError, AttributeError)):
            predict(*args)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        min_max_scores(["a"])  # type: ignore[call-arg]


def same_float(x: float, y: float) -> bool:
    return x == y or (math.isnan(x) and math.isnan(y))


@settings(max_examples=400)
@given(
    st.lists(
        st.tuples(st.sampled_from(ADDRESSES), st.floats(allow_nan=True, allow_infinity=True)),
        max_size=14,
    )
)
def test_min_max_scores_equal_the_python(items: list[tuple[str, float]]) -> None:
    addresses = [a for a, _ in items]
    costs = [c for _, c in items]
    native = min_max_scores(addresses, costs)
    python = min_max_scores_python(addresses, costs)
    assert native is not None
    assert list(native) == list(python)
    assert all(same_float(native[a], python[a]) for a in python)


def test_min_max_scores_declines_what_is_not_str_and_float() -> None:
    assert min_max_scores(["a", "b"], [1.0, 2]) is None
    assert min_max_scores(["a"], [1.0, 2.0]) is None
    assert min_max_scores([("a",)], [1.0]) is None  # type: ignore[list-item]
    assert latency_model.min_max_scores(["a", "b"], [1.0, 3]) == {"a": 1.0, "b": 0.0}


@settings(max_examples=400)
@given(
    st.lists(st.sampled_from([0.0, -0.0, 0.25, 1.0, 1.5, float("inf"), -float("inf")]), min_size=1)
)
def test_top_scored_equals_the_python(scores: list[float]) -> None:
    scored = [ScoredEndpoint(endpoint(f"10.0.0.{i}:8000"), s) for i, s in enumerate(scores)]
    assert top_scored(scored) == top_scored_python(scored)


def test_top_scored_declines_what_it_cannot_compare_as_floats() -> None:
    ep = endpoint()
    assert top_scored([]) is None
    assert top_scored([ScoredEndpoint(ep, 1.0), ScoredEndpoint(ep, math.nan)]) is None
    assert top_scored([ScoredEndpoint(ep, 1.0), ScoredEndpoint(ep, 2)]) is None
    assert top_scored((ScoredEndpoint(ep, 1.0),)) is None  # type: ignore[arg-type]
    assert top_scored([ep]) is None  # type: ignore[list-item]  # no score slot
    with pytest.raises(AttributeError):  # and the Python says why
        slo_aware_picker.top_scored([ep])  # type: ignore[list-item]


@settings(max_examples=400)
@given(
    st.lists(
        st.one_of(
            st.sampled_from([0.0, -0.0, 100.0, 104.99, 105.0, 105.01, float("inf")]),
            st.floats(0.0, 1e6, allow_nan=False),
        )
    ),
    st.sampled_from([0.0, 0.05, 0.5]),
)
def test_near_ties_equal_the_python(costs: list[float], tolerance: float) -> None:
    assert near_ties(costs, tolerance) == near_ties_python(costs, tolerance)


@dataclass
class NearTies:
    costs: list[float]
    tolerance: float
    addresses: list[str]
    endpoints: list[Endpoint]
    overlaps: dict[str, int]
    recent: dict[str, float]
    scale: float
    blocks: int
    default_capacity: int

    def native(self) -> list[float] | None:
        return settle_near_ties(
            self.costs,
            self.tolerance,
            self.addresses,
            self.endpoints,
            self.overlaps,
            self.recent,
            self.scale,
            self.blocks,
            self.default_capacity,
        )

    def python(self) -> list[float]:
        return settle_near_ties_python(
            self.costs,
            self.tolerance,
            addresses=self.addresses,
            endpoints=self.endpoints,
            overlaps=self.overlaps,
            recent=self.recent,
            scale=self.scale,
            blocks=self.blocks,
            default_capacity=self.default_capacity,
        )


@st.composite
def near_tie_cases(draw: st.DrawFn) -> NearTies:
    n = draw(st.integers(1, len(ADDRESSES)))
    addresses = ADDRESSES[:n]
    costs = draw(
        st.lists(
            st.one_of(
                st.sampled_from([100.0, 101.0, 103.0, 104.99, 105.0, 250.0]),
                st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False),
            ),
            min_size=n,
            max_size=n,
        )
    )
    capacity = st.one_of(st.none(), st.sampled_from([0, 1, 512, 32_000]))
    return NearTies(
        costs,
        draw(st.sampled_from([0.0, 0.05, 0.5])),
        list(addresses),
        [endpoint(a, num_gpu_blocks=draw(capacity)) for a in addresses],
        draw(st.dictionaries(st.sampled_from(addresses), st.integers(0, 5_000))),
        draw(st.dictionaries(st.sampled_from(addresses), st.floats(0.0, 1e9, allow_nan=False))),
        draw(st.sampled_from([0.0, 0.5, 1.0, 3.7])),
        draw(st.integers(1, 5_000)),
        draw(st.sampled_from([1, 37_500])),
    )


@settings(max_examples=400)
@given(near_tie_cases())
def test_settling_near_ties_equals_the_python(case: NearTies) -> None:
    native = case.native()
    assert native is not None
    assert native == case.python()
    if native is case.costs:  # nothing settled: the costs themselves, as the Python returns
        assert case.python() is case.costs


def test_settling_declines_what_it_cannot_compare() -> None:
    eps = [endpoint(a) for a in ADDRESSES[:2]]
    args = (0.05, ADDRESSES[:2], eps, {}, {}, 1.0, 10, 100)
    assert settle_near_ties([100.0, 101.0], *args) is not None
    assert settle_near_ties([100.0, 101], *args) is None
    assert settle_near_ties((100.0, 101.0), *args) is None  # type: ignore[arg-type]
    wrong = (0.05, ADDRESSES[:2], eps, {ADDRESSES[0]: 1.5}, {}, 1.0, 10, 100)
    assert settle_near_ties([100.0, 101.0], *wrong) is None  # type: ignore[arg-type]


def test_near_ties_declines_what_it_cannot_compare_as_floats() -> None:
    assert near_ties([1.0, 2], 0.05) is None
    assert near_ties([1.0, math.nan], 0.05) is None
    assert near_ties((1.0,), 0.05) is None  # type: ignore[arg-type]
