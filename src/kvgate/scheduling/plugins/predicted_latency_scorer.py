"""`predicted-latency-scorer`: kvgate's own routing — score endpoints by the latency the request is
predicted to see there.

prepare     for every candidate, predict the request's TTFT and ITL with the calibrated engine
            model of `kvgate.scheduling.latency_model` (product ``LATENCY_PREDICTIONS``), from
            the KV scorer's products: the tokens, the endpoint's cached prefix (``overlaps``) and
            the work already booked there (``load``, and which of the request's blocks the
            requests in flight there hold); the endpoint's scraped metrics add work the gateway
            did not book (requests waiting beyond its own) and the KV capacity (unknown:
            ``default_kv_blocks``): a request that does not fit waits for running ones to end;
score       rank by routing cost = predicted TTFT + ``prefillWorkWeight`` × the request's own
            uncached prefill time. The second term (off by default) counts the work this
            request adds to the worker once more, for the requests that will queue behind it:
            it favours cache hits beyond what this request's own latency gains. Measured over
            the benchmark families it traded tail latency for little hit rate, hence 0.
            Costs within ``ttftTolerance`` of the best are near ties (`settle_near_ties`):
            among them the cost prefers the worker where the request evicts least;
pre_request remember the chosen endpoint's prediction (``predicted_ttft_s`` / ``_itl_s``) and
            count the blocks the request adds to its cache (`CacheChurn`);
first chunk the observed TTFT calibrates that worker's model (streamed responses only: a buffered
            response's first chunk is its last);
complete    the observed inter-token latency calibrates the worker's ITL.

Without KV events the overlaps come from the approximate index (what kvgate itself routed); with
stale metrics the model runs on the gateway's own bookkeeping alone and a default capacity.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Self

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import PluginContext, Product, Range, Scorer
from kvgate.scheduling.latency_model import (
    CalibrationSettings,
    EngineCost,
    LatencyModel,
    Predictions,
    min_max_scores,
)
from kvgate.scheduling.request import (
    LatencyPrediction,
    LLMRequest,
    ResponseInfo,
    SchedulingResult,
)
from kvgate.scheduling.services import NO_METRICS, SchedulingMetrics

_native_near_ties: Callable[[list[float], float], list[int] | None] | None
_native_settle: Callable[..., list[float] | None] | None
try:  # `_latency.c`; optional, the Python gives the same answer
    from kvgate.scheduling._latency import near_ties as _native_near_ties
    from kvgate.scheduling._latency import settle_near_ties as _native_settle
except ImportError:  # pragma: no cover - depends on the build
    _native_near_ties = _native_settle = None

_DEFAULT_OUTPUT_TOKENS = 256
_PRIOR = EngineCost()


@dataclass(frozen=True, slots=True)
class PredictedLatencyParams:
    prefill_work_weight: Annotated[float, Range(ge=0)] = 0.0
    """Weight of the request's own uncached prefill time on top of its TTFT (0: TTFT alone)."""
    ttft_tolerance: Annotated[float, Range(ge=0, lt=1)] = 0.05
    """Routing costs within this fraction of the best are near ties, settled by where the
    request evicts least (0: the lowest cost always wins)."""
    churn_half_life_s: Annotated[float, Range(gt=0)] = 20.0
    """Half-life of the count of blocks recently added to each worker's cache."""
    default_output_tokens: Annotated[int, Range(ge=1)] = _DEFAULT_OUTPUT_TOKENS
    """Output length assumed when the request sets no max_tokens."""
    default_kv_blocks: Annotated[int, Range(ge=1)] = 37_500
    """KV capacity of an endpoint whose metrics have not said (blocks)."""
    # The engine's step cost (milliseconds); defaults: the Dynamo mocker's fit.
    prefill_fixed_ms: Annotated[float, Range(ge=0)] = _PRIOR.prefill_fixed_ms
    prefill_per_token_ms: Annotated[float, Range(ge=0)] = _PRIOR.prefill_per_token_ms
    prefill_per_token_sq_ms: Annotated[float, Range(ge=0)] = _PRIOR.prefill_per_token_sq_ms
    decode_fixed_ms: float = _PRIOR.decode_fixed_ms
    decode_linear_ms: float = _PRIOR.decode_linear_ms
    decode_square_ms: float = _PRIOR.decode_square_ms
    max_num_batched_tokens: Annotated[int, Range(ge=1)] = _PRIOR.max_num_batched_tokens
    # Online calibration.
    calibration_forgetting: Annotated[float, Range(gt=0.5, le=1)] = 0.99
    calibration_prior_strength: Annotated[float, Range(gt=0)] = 2.0
    calibration_clip: Annotated[float, Range(gt=1)] = 4.0


@dataclass(slots=True)
class _Sent:
    worker: str
    prediction: LatencyPrediction
    sent_at: float
    first_token_at: float | None = None


class PredictedLatencyScorer(Scorer):
    type_name: ClassVar[str] = "predicted-latency-scorer"
    params_type: ClassVar[type[PredictedLatencyParams]] = PredictedLatencyParams
    produces: ClassVar[frozenset[Product]] = frozenset({Product.LATENCY_PREDICTIONS})
    consumes: ClassVar[frozenset[Product]] = frozenset(
        {Product.TOKENS, Product.PREFIX_OVERLAPS, Product.IN_FLIGHT_LOAD}
    )

    def __init__(
        self,
        name: str,
        params: PredictedLatencyParams | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: SchedulingMetrics = NO_METRICS,
    ) -> None:
        super().__init__(name)
        p = self.params = params or PredictedLatencyParams()
        self.model = LatencyModel(
            EngineCost(
                prefill_fixed_ms=p.prefill_fixed_ms,
                prefill_per_token_ms=p.prefill_per_token_ms,
                prefill_per_token_sq_ms=p.prefill_per_token_sq_ms,
                decode_fixed_ms=p.decode_fixed_ms,
                decode_linear_ms=p.decode_linear_ms,
                decode_square_ms=p.decode_square_ms,
                max_num_batched_tokens=p.max_num_batched_tokens,
            ),
            CalibrationSettings(
                forgetting=p.calibration_forgetting,
                prior_strength=p.calibration_prior_strength,
                clip=p.calibration_clip,
            ),
        )
        self.clock = clock
        self.metrics = metrics
        self.churn = CacheChurn(p.churn_half_life_s)
        self._sent: dict[str, _Sent] = {}

    @classmethod
    def from_config(cls, name: str, params: PredictedLatencyParams, context: PluginContext) -> Self:
        return cls(name, params, clock=context.now, metrics=context.metrics)

    # -- prepare: predictions -----------------------------------------------------------

    async def prepare(self, request: LLMRequest, endpoints: Sequence[Endpoint]) -> None:
        tokens, overlaps, load, block_size = (
            request.tokens,
            request.overlaps,
            request.load,
            request.block_size,
        )
        if tokens is None or overlaps is None or load is None or block_size is None:
            return
        started = time.perf_counter()
        hashes = request.block_hashes
        request.predictions = self.model.predict_endpoints(
            endpoints,
            isl=len(tokens),
            block_size=block_size,
            overlaps=overlaps,
            load=load.tables(),
            default_kv_blocks=self.params.default_kv_blocks,
            expected_output_tokens=_output_tokens(request.body, self.params.default_output_tokens),
            active_overlaps=load.active_overlaps(hashes) if hashes else None,
        )
        self.metrics.stage("predict", time.perf_counter() - started)

    # -- score ----------------------------------------------------------------------------

    def score(self, request: LLMRequest, endpoints: list[Endpoint]) -> dict[str, float]:
        predictions = request.predictions
        tokens = request.tokens
        if not isinstance(predictions, Predictions) or tokens is None:
            return {}
        weight = self.params.prefill_work_weight
        candidates: Sequence[Endpoint]
        if (
            not weight
            and predictions.candidates is endpoints
            and len(predictions.workers) == len(endpoints)
        ):
            # The candidates prepare predicted, in its order (no filter ran): the TTFT column is
            # the cost column.
            candidates, addresses, costs = endpoints, predictions.workers, predictions.ttft_ms
        else:
            candidates, addresses, costs = self._costs(request, predictions, endpoints, weight)
        if self.params.ttft_tolerance and len(costs) > 1:
            costs = self.settle_near_ties(request, candidates, addresses, costs)
        return min_max_scores(addresses if type(addresses) is list else list(addresses), costs)

    def _costs(
        self,
        request: LLMRequest,
        predictions: Predictions,
        endpoints: list[Endpoint],
        weight: float,
    ) -> tuple[list[Endpoint], list[str], list[float]]:
        """The routing cost of every endpoint that was predicted for, in ``endpoints``' order."""
        ttft = predictions.ttft_ms
        position = predictions.position
        own_ms = self.model.cost.prefill_ms
        isl, bs = len(request.tokens or ()), request.block_size or 1
        cached = (request.overlaps or {}).get
        kept: list[Endpoint] = []
        addresses: list[str] = []
        costs: list[float] = []
        for endpoint in endpoints:
            address = endpoint.address
            i = position(address)
            if i is None:
                continue
            cost = ttft[i]
            if weight:
                cost += weight * own_ms(max(1, isl - cached(address, 0) * bs))
            kept.append(endpoint)
            addresses.append(address)
            costs.append(cost)
        return kept, addresses, costs

    def settle_near_ties(
        self,
        request: LLMRequest,
        endpoints: Sequence[Endpoint],
        addresses: Sequence[str],
        costs: list[float],
    ) -> list[float]:
        """``costs`` (parallel to ``endpoints``), with the near ties of the best reordered by
        the eviction each would cause; a new list when any changed.

        Predictions a few percent apart are within the model's error, and a difference that
        small is mostly calibration noise: left to decide, it sends every such choice (e.g. a
        new prompt on an idle fleet) to the one worker whose θ came out a hair lower, which
        then takes most new content while the other caches sit unused — the fleet caches far
        less than it could. So among the costs within ``ttftTolerance`` of the best, half of
        the band orders them by cost and half by where the request does the least harm to
        what is cached: the blocks it adds to a worker's cache, times how much was added there
        recently, over the cache's size. An LRU cache filled faster evicts younger, likelier
        reused blocks, so this favours the worker already holding the prompt and, among
        equals, the one with the oldest (cheapest to lose) least recently used blocks. The
        near ties' costs stay below every other cost, so nothing outside them changes order."""
        counts, scale = self.churn.counts(self.clock())
        tolerance = self.params.ttft_tolerance
        overlaps = request.overlaps or {}
        blocks = max(1, len(request.tokens or ()) // (request.block_size or 1))
        capacity = self.params.default_kv_blocks
        if _native_settle is not None and type(addresses) is list and type(endpoints) is list:
            settled = _native_settle(
                costs, tolerance, addresses, endpoints, overlaps, counts, scale, blocks, capacity
            )
            if settled is not None:
                return settled
        return settle_near_ties_python(
            costs,
            tolerance,
            addresses=addresses,
            endpoints=endpoints,
            overlaps=overlaps,
            recent=counts,
            scale=scale,
            blocks=blocks,
            default_capacity=capacity,
        )

    # -- lifecycle ------------------------------------------------------------------------

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        worker = result.endpoint.address
        chosen = request.predictions.get(worker) if request.predictions else None
        if chosen is None:
            return
        request.predicted_ttft_s = chosen.ttft_s
        request.predicted_itl_s = chosen.itl_s
        if request.tokens is not None:
            blocks = len(request.tokens) // (request.block_size or 1)
            cached = (request.overlaps or {}).get(worker, 0)
            self.churn.add(worker, max(0, blocks - cached), self.clock())
        request.note_decision(_explain(worker, request.predictions or {}, result))
        if request.stream:
            self._sent[request.request_id] = _Sent(worker, chosen, self.clock())

    def response_streaming(
        self, request: LLMRequest, result: SchedulingResult, first_chunk: bool
    ) -> None:
        if not first_chunk:
            return
        sent = self._sent.get(request.request_id)
        if sent is None or sent.first_token_at is not None:
            return
        now = sent.first_token_at = self.clock()
        observed = now - sent.sent_at
        self.model.observe_ttft(sent.worker, sent.prediction, observed)
        self.metrics.ttft_observed(sent.prediction.ttft_s, observed)

    def response_complete(
        self, request: LLMRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        sent = self._sent.pop(request.request_id, None)
        if (
            sent is None
            or sent.first_token_at is None
            or response.aborted
            or not response.completion_tokens
            or response.completion_tokens < 2
        ):
            return
        itl = (self.clock() - sent.first_token_at) / (response.completion_tokens - 1)
        self.model.observe_itl(sent.worker, sent.prediction, itl)

    def on_endpoints_changed(self, joined: list[Endpoint], left: list[Endpoint]) -> None:
        for endpoint in left:
            self.model.forget(endpoint.address)
            self.churn.forget(endpoint.address)


def settle_near_ties_python(
    costs: list[float],
    tolerance: float,
    *,
    addresses: Sequence[str],
    endpoints: Sequence[Endpoint],
    overlaps: Mapping[str, int],
    recent: Mapping[str, float],
    scale: float,
    blocks: int,
    default_capacity: int,
) -> list[float]:
    """`PredictedLatencyScorer.settle_near_ties` on its inputs (what `_latency.c` must equal):
    ``recent`` × ``scale`` is each worker's recently added blocks, ``blocks`` the request's."""
    near = near_ties(costs, tolerance)
    if len(near) < 2:
        return costs
    best = min(costs[i] for i in near)
    band = best * (1.0 + tolerance)
    if band <= best:
        return costs
    harm: list[float] = []
    for i in near:
        address = addresses[i]
        added = max(blocks - overlaps.get(address, 0), 1)
        capacity = endpoints[i].metrics.num_gpu_blocks or default_capacity
        harm.append(added * (recent.get(address, 0.0) * scale + added) / capacity)
    settled = list(costs)
    # Half the band for the predicted difference, half for the harm (short of the edge,
    # 0.999): noise-sized differences leave the harm to decide, while a wait of most of
    # the band (5% of a long prompt is tens of milliseconds queued) needs far less harm.
    half = (band - best) * 0.5
    width = half * 0.999 / max(harm)
    for i, h in zip(near, harm, strict=True):
        settled[i] = best + (costs[i] - best) * 0.5 + width * h
    return settled


def near_ties(costs: list[float], tolerance: float) -> list[int]:
    """Where the costs within ``tolerance`` of the lowest are, in list order."""
    if _native_near_ties is not None:
        found = _native_near_ties(costs, tolerance)
        if found is not None:
            return found
    return near_ties_python(costs, tolerance)


def near_ties_python(costs: list[float], tolerance: float) -> list[int]:
    if not costs:
        return []
    band = min(costs) * (1.0 + tolerance)
    return [i for i, cost in enumerate(costs) if cost <= band]


class CacheChurn:
    """Per worker, the KV blocks recently added to its cache by requests routed there: a count
    that halves every ``half_life_s`` (what KV events would say, known without them).

    Counts are kept scaled to a common epoch, so that reading every worker's at one instant
    takes one exponential, not one per worker (`counts`)."""

    __slots__ = ("_counts", "_epoch", "_rate")

    # Rebase the epoch before the scale factor of a new count could overflow a float.
    _MAX_GROWTH = 1e150

    def __init__(self, half_life_s: float) -> None:
        self._rate = math.log(2.0) / half_life_s
        self._counts: dict[str, float] = {}
        self._epoch: float | None = None

    def counts(self, now: float) -> tuple[Mapping[str, float], float]:
        """The scaled counts and the factor that turns them into recent blocks at ``now``."""
        if self._epoch is None:
            return self._counts, 0.0
        return self._counts, math.exp(-self._rate * (now - self._epoch))

    def recent(self, worker: str, now: float) -> float:
        counts, scale = self.counts(now)
        return counts.get(worker, 0.0) * scale

    def add(self, worker: str, blocks: int, now: float) -> None:
        if self._epoch is None:
            self._epoch = now
        growth = math.exp(self._rate * (now - self._epoch))
        if growth > self._MAX_GROWTH:
            self._counts = {w: c / growth for w, c in self._counts.items()}
            self._epoch, growth = now, 1.0
        self._counts[worker] = self._counts.get(worker, 0.0) + blocks * growth

    def forget(self, worker: str) -> None:
        self._counts.pop(worker, None)


_EXPLAINED_CANDIDATES = 8


def _explain(
    worker: str, predictions: Mapping[str, LatencyPrediction], result: SchedulingResult
) -> str:
    """The pick's predictions and those of the best-scored other candidates (a few, so that the
    decision header stays small with many endpoints)."""
    scores = result.primary.scores
    others = sorted((a for a in scores if a != worker), key=lambda a: -scores[a])
    parts = []
    for address in (worker, *others[: _EXPLAINED_CANDIDATES - 1]):
        p = predictions.get(address)
        if p is not None:
            parts.append(f"{address}:{p.ttft_s * 1000:.1f}/{p.itl_s * 1000:.1f}")
    return "predicted_ttft/itl_ms=" + ",".join(parts)


def _output_tokens(body: Mapping[str, Any], default: int) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default
