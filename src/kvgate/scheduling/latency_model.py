"""Predicted latency of a request on a worker: an engine cost model, calibrated online per worker.

**The engine.** A vLLM-style engine runs steps back to back. Each step has a token budget
``M`` (``max_num_batched_tokens``): every decoding request takes one token of it, prompt chunks
take the rest, first-come first-served. A step costs a prefill part that grows with the prompt
tokens in it and, when requests decode, a decode part that grows with their KV footprint::

    step_ms = prefill_fixed + prefill_per_token·T + prefill_per_token²·T²   (T prompt tokens > 0)
            + decode(u)                                                    (D > 0 decoding)
    decode(u) = max(decode_floor, decode_fixed + decode_linear·u + decode_square·u²)

``u`` is the decoding requests' contexts summed over the cache's capacity (clamped at 1): each
request's own, a block two of them share counted twice, as attention reads it for each. The
defaults are the Dynamo mocker's published fit (the cost shape of
`kvgate.sim.timing.PolynomialTiming`).

**TTFT.** A request routed to worker ``w`` waits for the prompt work already booked there and
not yet prefilled (``P``: its pending prefill tokens, as the gateway booked them), then computes
its own uncached tokens ``U = isl − overlap·block_size`` (at least one). With ``D`` requests
decoding the chunk is ``C = M − D`` tokens, so ``P + U`` tokens take ``k = ⌈(P+U)/C⌉`` steps::

    fixed_ms = k·(prefill_fixed + [D > 0]·decode(u)) + [D > 0]·½·decode(u)
    token_ms = prefill_per_token·(P+U) + prefill_per_token²·(⌊(P+U)/C⌋·C² + ((P+U) mod C)²)
    TTFT     = θ_fixed·fixed_ms + θ_token·token_ms

**Waiting for KV space.** The engine admits a request only when its blocks fit in the cache
beside those of the requests it runs (prefix caching evicts idle cached blocks, never running
ones). A request of ``R`` blocks, ``S`` of them (a leading run) already held by requests in
flight on ``w``, next to ``A`` active blocks in a cache of ``K`` blocks, lacks
``E = A + R − S − K`` blocks; with ``n`` requests in flight (``A/n`` blocks each on average) it
waits for ``j = min(⌈E·n/A⌉, n)`` of them to finish. Their remaining decode steps taken as spread
evenly over this request's expected output ``O``, the ``j``-th ends after ``j·O/(n+1)`` steps::

    fixed_ms += j·O/(n+1) · decode(u)

(``A``, ``n``: what the gateway booked; ``K``: the endpoint's ``num_gpu_blocks``. A small cache
full of long prompts queues requests for whole decodes, which the prefill terms alone miss.)

**ITL.** ``θ_itl · (decode(u') + prefill interference)``: ``u'`` counts this request's blocks
too; the interference spreads the time of the prompt work queued on ``w`` over the tokens the
request will generate.

**Calibration.** ``θ`` starts at 1 (the prior) and is fitted per worker from what the gateway
observes: when a streamed response's first chunk arrives, the (fixed_ms, token_ms) features of
its prediction and the observed TTFT update a two-parameter recursive least-squares fit with a
forgetting factor; when a response ends, the observed inter-token latency updates ``θ_itl`` as an
exponentially weighted ratio. Observations more than ``clip``× off the prediction are clipped
before they count (one stalled request must not swing the model), and ``θ`` stays within
[1/clip, clip]. A worker seen for the first time takes the pool's average ``θ``.

Everything is plain floats and dicts, updated from the event loop; one prediction is a few dozen
arithmetic operations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.request import LatencyPrediction, LoadTables
from kvgate.settings import Range, check_ranges

_native_predict: Callable[..., tuple[list[str], list[float], bytes] | None] | None
_native_scores: Callable[[list[str], list[float]], dict[str, float] | None] | None
try:  # the native candidate loops (`_latency.c`); optional, the Python gives the same answers
    from kvgate.scheduling._latency import min_max_scores as _native_scores
    from kvgate.scheduling._latency import predict as _native_predict
except ImportError:  # pragma: no cover - depends on the build
    _native_predict = _native_scores = None

NATIVE_PREDICTION = _native_predict is not None


@dataclass(frozen=True, slots=True)
class EngineCost:
    """The cost shape of one engine step, in milliseconds (see the module docstring)."""

    prefill_fixed_ms: Annotated[float, Range(ge=0)] = 16.50142
    prefill_per_token_ms: Annotated[float, Range(ge=0)] = 1.518344e-2
    prefill_per_token_sq_ms: Annotated[float, Range(ge=0)] = 4.209989e-7
    decode_fixed_ms: float = 5.74
    decode_linear_ms: float = 54.01
    decode_square_ms: float = -25.74
    decode_floor_ms: Annotated[float, Range(ge=0)] = 1.0
    max_num_batched_tokens: Annotated[int, Range(ge=1)] = 8192

    def __post_init__(self) -> None:
        check_ranges(self)

    def decode_ms(self, usage: float) -> float:
        u = 0.0 if usage < 0 else 1.0 if usage > 1 else usage
        ms = self.decode_fixed_ms + self.decode_linear_ms * u + self.decode_square_ms * u * u
        return ms if ms > self.decode_floor_ms else self.decode_floor_ms

    def prefill_ms(self, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        return (
            self.prefill_fixed_ms
            + self.prefill_per_token_ms * tokens
            + self.prefill_per_token_sq_ms * tokens * tokens
        )


@dataclass(frozen=True, slots=True)
class CalibrationSettings:
    forgetting: Annotated[float, Range(gt=0.5, le=1)] = 0.99
    """RLS forgetting factor: the weight of an observation halves after ~ln 2 / (1 − λ) more."""
    prior_strength: Annotated[float, Range(gt=0)] = 2.0
    """How many typical observations the prior is worth (larger: slower to move)."""
    clip: Annotated[float, Range(gt=1)] = 4.0
    """Observations beyond clip× the prediction are clipped; θ stays in [1/clip, clip]."""
    itl_smoothing: Annotated[float, Range(gt=0, le=1)] = 0.1
    """Weight of one observation in the ITL ratio's moving average."""

    def __post_init__(self) -> None:
        check_ranges(self)


class WorkerFit:
    """θ of one worker: a 2-parameter RLS on (fixed_ms, token_ms) and an ITL ratio."""

    __slots__ = ("itl_scale", "observations", "p00", "p01", "p11", "theta_fixed", "theta_token")

    def __init__(
        self, theta_fixed: float, theta_token: float, itl_scale: float, variance: float
    ) -> None:
        self.theta_fixed = theta_fixed
        self.theta_token = theta_token
        self.itl_scale = itl_scale
        # Inverse-information matrix of the RLS fit (symmetric 2x2).
        self.p00 = variance
        self.p01 = 0.0
        self.p11 = variance
        self.observations = 0

    def ttft_ms(self, fixed_ms: float, token_ms: float) -> float:
        return self.theta_fixed * fixed_ms + self.theta_token * token_ms

    def observe_ttft(
        self, fixed_ms: float, token_ms: float, observed_ms: float, s: CalibrationSettings
    ) -> None:
        predicted = self.ttft_ms(fixed_ms, token_ms)
        if predicted <= 0 or not math.isfinite(observed_ms) or observed_ms < 0:
            return
        clip = s.clip
        observed_ms = min(max(observed_ms, predicted / clip), predicted * clip)
        # Scale the features so one observation of a 10 ms and one of a 10 s request carry
        # comparable weight (relative error is what matters for routing).
        norm = 1.0 / predicted
        x0, x1 = fixed_ms * norm, token_ms * norm
        y = observed_ms * norm
        lam = s.forgetting
        p00, p01, p11 = self.p00, self.p01, self.p11
        px0 = p00 * x0 + p01 * x1
        px1 = p01 * x0 + p11 * x1
        denom = lam + x0 * px0 + x1 * px1
        k0, k1 = px0 / denom, px1 / denom
        err = y - (self.theta_fixed * x0 + self.theta_token * x1)
        lo, hi = 1.0 / clip, clip
        self.theta_fixed = min(max(self.theta_fixed + k0 * err, lo), hi)
        self.theta_token = min(max(self.theta_token + k1 * err, lo), hi)
        self.p00 = (p00 - k0 * px0) / lam
        self.p01 = (p01 - k0 * px1) / lam
        self.p11 = (p11 - k1 * px1) / lam
        self.observations += 1

    def observe_itl(self, predicted_ms: float, observed_ms: float, s: CalibrationSettings) -> None:
        if predicted_ms <= 0 or not math.isfinite(observed_ms) or observed_ms <= 0:
            return
        unscaled = predicted_ms / self.itl_scale
        ratio = min(max(observed_ms / unscaled, 1.0 / s.clip), s.clip)
        self.itl_scale += s.itl_smoothing * (ratio - self.itl_scale)


class Predictions(Mapping[str, LatencyPrediction]):
    """The predictions of one request for many workers, kept as columns: a `LatencyPrediction`
    is made when a worker's is asked for (most never are)."""

    __slots__ = ("_columns", "_index", "_model", "_out", "candidates", "ttft_ms", "workers")

    def __init__(
        self,
        model: LatencyModel,
        workers: Sequence[str],
        ttft_ms: list[float],
        columns: Sequence[float],
        *,
        expected_output_tokens: int,
        candidates: Sequence[Endpoint] | None = None,
    ) -> None:
        self._model = model
        self.workers = workers
        self.ttft_ms = ttft_ms
        """Predicted TTFT per worker, in the order of `workers` (milliseconds)."""
        # Five columns of len(workers) values, one after the other: fixed_ms, token_ms, pending
        # prefill tokens, decoding requests, KV usage with this request.
        self._columns = columns
        self._out = expected_output_tokens
        self.candidates = candidates
        """The endpoints predicted for, in the order of `workers`, when made from endpoints."""
        self._index: dict[str, int] | None = None

    def position(self, worker: str) -> int | None:
        """Where ``worker`` is in `ttft_ms`; None if it was not predicted."""
        index = self._index
        if index is None:
            index = self._index = {w: i for i, w in enumerate(self.workers)}
        return index.get(worker)

    def ttft_s(self, worker: str, at: int = -1) -> float | None:
        """``self[worker].ttft_s`` without making the prediction object. ``at``: where the
        worker probably is (its place among the candidates predicted): checked, and then found
        without building the index of every worker."""
        workers = self.workers
        i = at if 0 <= at < len(workers) and workers[at] == worker else self.position(worker)
        return None if i is None else self.ttft_ms[i] / 1000.0

    def __getitem__(self, worker: str) -> LatencyPrediction:
        i = self.position(worker)
        if i is None:
            raise KeyError(worker)
        n = len(self.workers)
        columns = self._columns
        itl = self._model.itl_ms(
            worker,
            int(columns[2 * n + i]),
            int(columns[3 * n + i]),
            columns[4 * n + i],
            self._out,
        )
        return LatencyPrediction(self.ttft_ms[i] / 1000.0, itl / 1000.0, columns[i], columns[n + i])

    def __contains__(self, worker: object) -> bool:
        return isinstance(worker, str) and self.position(worker) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.workers)

    def __len__(self) -> int:
        return len(self.workers)


def _kv_wait_steps(lacking: int, active: int, in_flight: int, output_tokens: int) -> float:
    """Decode steps until ``lacking`` KV tokens are freed by requests finishing (the module
    docstring's ``j·O/(n+1)``); ``active``: the in-flight requests' KV tokens."""
    if lacking <= 0 or active <= 0 or in_flight <= 0:
        return 0.0
    finishing = min(-(-(lacking * in_flight) // active), in_flight)
    return finishing * output_tokens / (in_flight + 1)


def min_max_scores(addresses: Sequence[str], costs: Sequence[float]) -> dict[str, float]:
    """Scores from costs (parallel sequences), min-max: the cheapest 1, the dearest 0."""
    if _native_scores is not None and type(addresses) is list and type(costs) is list:
        scores = _native_scores(addresses, costs)
        if scores is not None:
            return scores
    return min_max_scores_python(addresses, costs)


def min_max_scores_python(addresses: Sequence[str], costs: Sequence[float]) -> dict[str, float]:
    if not costs:
        return {}
    low = min(costs)
    span = max(costs) - low
    if span <= 0:
        return dict.fromkeys(addresses, 1.0)
    return {address: (span - (c - low)) / span for address, c in zip(addresses, costs, strict=True)}


class LatencyModel:
    """Per-worker calibrated predictions over one engine cost shape."""

    def __init__(
        self, cost: EngineCost | None = None, calibration: CalibrationSettings | None = None
    ) -> None:
        cost = self._cost = cost or EngineCost()
        self._cost_terms = (
            cost.prefill_fixed_ms,
            cost.prefill_per_token_ms,
            cost.prefill_per_token_sq_ms,
            cost.decode_fixed_ms,
            cost.decode_linear_ms,
            cost.decode_square_ms,
            cost.decode_floor_ms,
            cost.max_num_batched_tokens,
        )
        self.settings = calibration or CalibrationSettings()
        self.fits: dict[str, WorkerFit] = {}

    @property
    def cost(self) -> EngineCost:
        return self._cost

    def fit(self, worker: str) -> WorkerFit:
        fit = self.fits.get(worker)
        if fit is None:
            fit = self.fits[worker] = self._pool_prior()
        return fit

    def _pool_prior(self) -> WorkerFit:
        """A new worker starts from the average of the calibrated ones (1.0 when none)."""
        seasoned = [f for f in self.fits.values() if f.observations]
        variance = 1.0 / self.settings.prior_strength
        if not seasoned:
            return WorkerFit(1.0, 1.0, 1.0, variance)
        n = len(seasoned)
        return WorkerFit(
            sum(f.theta_fixed for f in seasoned) / n,
            sum(f.theta_token for f in seasoned) / n,
            sum(f.itl_scale for f in seasoned) / n,
            variance,
        )

    def forget(self, worker: str) -> None:
        self.fits.pop(worker, None)

    def predict(
        self,
        worker: str,
        *,
        uncached_tokens: int,
        pending_prefill_tokens: int,
        decoding: int,
        decode_usage: float,
        usage_after: float,
        expected_output_tokens: int,
    ) -> LatencyPrediction:
        """Predict the request's TTFT and ITL on ``worker``.

        ``uncached_tokens``: its prompt minus what the worker caches; ``pending_prefill_tokens``:
        prompt work booked there before it; ``decoding``: requests generating there;
        ``decode_usage`` / ``usage_after``: their contexts summed over the cache's capacity, without
        and with this request."""
        batch = self.predict_many(
            [worker],
            uncached=[uncached_tokens],
            pending=[pending_prefill_tokens],
            decoding=[decoding],
            usage=[decode_usage],
            usage_after=[usage_after],
            expected_output_tokens=expected_output_tokens,
        )
        prediction = batch.get(worker)
        assert prediction is not None
        return prediction

    def predict_many(
        self,
        workers: Sequence[str],
        *,
        uncached: Sequence[int],
        pending: Sequence[int],
        decoding: Sequence[int],
        usage: Sequence[float],
        usage_after: Sequence[float],
        expected_output_tokens: int,
        candidates: Sequence[Endpoint] | None = None,
        kv_wait_steps: Sequence[float] | None = None,
    ) -> Predictions:
        """`predict` for many workers at once (parallel sequences); ``candidates``: the endpoints
        behind ``workers``, in their order, when the predictions are made from endpoints;
        ``kv_wait_steps``: decode steps each worker makes before the request's blocks fit in
        its cache (none when absent)."""
        ttft, fixed_ms, token_ms = self._ttft_columns(
            workers,
            uncached,
            pending,
            decoding,
            usage,
            kv_wait_steps=[0.0] * len(workers) if kv_wait_steps is None else kv_wait_steps,
        )
        return Predictions(
            self,
            workers,
            ttft,
            [*fixed_ms, *token_ms, *pending, *decoding, *usage_after],
            expected_output_tokens=expected_output_tokens,
            candidates=candidates,
        )

    def predict_endpoints(
        self,
        endpoints: Sequence[Endpoint],
        *,
        isl: int,
        block_size: int,
        overlaps: Mapping[str, int],
        load: LoadTables,
        default_kv_blocks: int,
        expected_output_tokens: int,
        active_overlaps: Mapping[str, int] | None = None,
    ) -> Predictions:
        """Predict a request of ``isl`` prompt tokens on each of ``endpoints``: the routing hot
        path, one native call when `_latency.c` is built (`predict_endpoints_python` otherwise,
        and whenever a value is outside what the native code computes exactly).

        Each endpoint's inputs: the blocks of the request it caches (``overlaps``), the work the
        gateway booked there (``load``), the request's leading blocks that requests in flight
        there already hold (``active_overlaps``: they need no new space), and its scraped
        metrics: its KV capacity (``num_gpu_blocks``, else ``default_kv_blocks``) and, unless
        stale, the requests it held waiting beyond those booked here when it was scraped
        (``booked_prefilling``; another gateway's, direct clients'), each assumed to bring a
        prompt of this request's size."""
        if active_overlaps is None:
            active_overlaps = {}
        if _native_predict is not None:
            made = _native_predict(
                endpoints,
                overlaps,
                active_overlaps,
                *load,
                self.fits,
                self.fit,
                isl,
                block_size,
                default_kv_blocks,
                expected_output_tokens,
                self._cost_terms,
            )
            if made is not None:
                workers, ttft, columns = made
                return Predictions(
                    self,
                    workers,
                    ttft,
                    memoryview(columns).cast("d"),
                    expected_output_tokens=expected_output_tokens,
                    candidates=endpoints,
                )
        return self.predict_endpoints_python(
            endpoints,
            isl=isl,
            block_size=block_size,
            overlaps=overlaps,
            load=load,
            default_kv_blocks=default_kv_blocks,
            expected_output_tokens=expected_output_tokens,
            active_overlaps=active_overlaps,
        )

    def predict_endpoints_python(
        self,
        endpoints: Sequence[Endpoint],
        *,
        isl: int,
        block_size: int,
        overlaps: Mapping[str, int],
        load: LoadTables,
        default_kv_blocks: int,
        expected_output_tokens: int,
        active_overlaps: Mapping[str, int] | None = None,
    ) -> Predictions:
        """`predict_endpoints` in Python (what the native code must equal)."""
        request_tokens = -(-isl // block_size) * block_size
        workers = [ep.address for ep in endpoints]
        cached = overlaps.get
        held = (active_overlaps or {}).get
        uncached = [isl - cached(w, 0) * block_size for w in workers]
        booked, prefilling_on, in_flight_on, active_on, context_on = (t.get for t in load)
        pending = [booked(w, 0) for w in workers]
        prefilling = [prefilling_on(w, 0) for w in workers]
        in_flight = [in_flight_on(w, 0) for w in workers]
        decoding = [n - p for n, p in zip(in_flight, prefilling, strict=True)]
        capacity = [
            (ep.metrics.num_gpu_blocks or default_kv_blocks) * block_size for ep in endpoints
        ]
        active = [active_on(w, 0) * block_size for w in workers]
        usage = [context_on(w, 0) * block_size / c for w, c in zip(workers, capacity, strict=True)]
        usage_after = [u + request_tokens / c for u, c in zip(usage, capacity, strict=True)]
        kv_wait = [
            _kv_wait_steps(
                active[i] + request_tokens - held(w, 0) * block_size - capacity[i],
                active[i],
                in_flight[i],
                expected_output_tokens,
            )
            for i, w in enumerate(workers)
        ]
        for i, endpoint in enumerate(endpoints):
            metrics = endpoint.metrics
            booked_then = metrics.booked_prefilling
            if booked_then is None:
                booked_then = prefilling[i]
            if metrics.waiting > booked_then and not metrics.stale:
                pending[i] += (metrics.waiting - booked_then) * isl
        return self.predict_many(
            workers,
            uncached=uncached,
            pending=pending,
            decoding=decoding,
            usage=usage,
            usage_after=usage_after,
            expected_output_tokens=expected_output_tokens,
            candidates=endpoints,
            kv_wait_steps=kv_wait,
        )

    def _ttft_columns(
        self,
        workers: Sequence[str],
        uncached: Sequence[int],
        pending: Sequence[int],
        decoding: Sequence[int],
        usage: Sequence[float],
        *,
        kv_wait_steps: Sequence[float],
    ) -> tuple[list[float], list[float], list[float]]:
        """Calibrated TTFT, fixed_ms and token_ms per worker (the module docstring's formulas;
        `_latency.c` repeats this loop operation for operation)."""
        cost = self.cost
        a, b, c = cost.prefill_fixed_ms, cost.prefill_per_token_ms, cost.prefill_per_token_sq_ms
        d0, d1, d2, floor = (
            cost.decode_fixed_ms,
            cost.decode_linear_ms,
            cost.decode_square_ms,
            cost.decode_floor_ms,
        )
        budget = cost.max_num_batched_tokens
        fits = self.fits
        ttft: list[float] = []
        fixed_ms: list[float] = []
        token_ms: list[float] = []
        for worker, fresh, ahead, dec, used, wait in zip(
            workers, uncached, pending, decoding, usage, kv_wait_steps, strict=True
        ):
            total = (ahead if ahead > 0 else 0) + (fresh if fresh > 0 else 1)
            chunk = budget - dec if dec < budget else 1
            full, rest = divmod(total, chunk)
            u = 0.0 if used < 0 else 1.0 if used > 1 else used
            decode_now = d0 + d1 * u + d2 * u * u
            decode_now = decode_now if decode_now > floor else floor
            if dec > 0:
                # A decode step is under way: on average half of it remains. (A prefill step
                # under way needs no term: its tokens are still counted in the pending work.)
                fixed = (full + (1 if rest else 0)) * (a + decode_now) + 0.5 * decode_now
            else:
                fixed = (full + (1 if rest else 0)) * a
            if wait > 0:
                fixed += wait * decode_now
            token = b * total + c * (full * chunk * chunk + rest * rest)
            fit = fits.get(worker) or self.fit(worker)
            ttft.append(fit.theta_fixed * fixed + fit.theta_token * token)
            fixed_ms.append(fixed)
            token_ms.append(token)
        return ttft, fixed_ms, token_ms

    def itl_ms(self, worker: str, ahead: int, decoding: int, usage_after: float, out: int) -> float:
        """Inter-token latency on ``worker``: its decode step with this request in the batch,
        plus the prompt work queued there spread over the tokens this request will generate."""
        cost = self.cost
        interference = 0.0
        if ahead > 0:
            chunk = max(cost.max_num_batched_tokens - decoding, 1)
            interference = (
                -(-ahead // chunk) * cost.prefill_fixed_ms
                + cost.prefill_per_token_ms * ahead
                + cost.prefill_per_token_sq_ms * ahead * min(ahead, chunk)
            ) / max(out, 1)
        return self.fit(worker).itl_scale * (cost.decode_ms(usage_after) + interference)

    def observe_ttft(self, worker: str, prediction: LatencyPrediction, observed_s: float) -> None:
        fit = self.fits.get(worker)
        if fit is not None:
            fit.observe_ttft(
                prediction.fixed_ms, prediction.token_ms, observed_s * 1000.0, self.settings
            )

    def observe_itl(self, worker: str, prediction: LatencyPrediction, observed_s: float) -> None:
        fit = self.fits.get(worker)
        if fit is not None:
            fit.observe_itl(prediction.itl_s * 1000.0, observed_s * 1000.0, self.settings)
