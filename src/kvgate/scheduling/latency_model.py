"""Predicted latency of a request on a worker: an engine cost model, calibrated online per worker.

**The engine.** A vLLM-style engine runs steps back to back. Each step has a token budget
``M`` (``max_num_batched_tokens``): every decoding request takes one token of it, prompt chunks
take the rest, first-come first-served. A step costs a prefill part that grows with the prompt
tokens in it and, when requests decode, a decode part that grows with their KV footprint::

    step_ms = prefill_fixed + prefill_per_token·T + prefill_per_token²·T²   (T prompt tokens > 0)
            + decode(u)                                                    (D > 0 decoding)
    decode(u) = max(decode_floor, decode_fixed + decode_linear·u + decode_square·u²)

``u`` is the decoding requests' KV tokens over the cache's capacity. The defaults are the
Dynamo mocker's published fit (the cost shape of `kvgate.sim.timing.PolynomialTiming`).

**TTFT.** A request routed to worker ``w`` waits for the prompt work already booked there and
not yet prefilled (``P``: its pending prefill tokens, as the gateway booked them), then computes
its own uncached tokens ``U = isl − overlap·block_size`` (at least one). With ``D`` requests
decoding the chunk is ``C = M − D`` tokens, so ``P + U`` tokens take ``k = ⌈(P+U)/C⌉`` steps::

    fixed_ms = k·(prefill_fixed + [D > 0]·decode(u)) + [D > 0]·½·decode(u)
    token_ms = prefill_per_token·(P+U) + prefill_per_token²·(⌊(P+U)/C⌋·C² + ((P+U) mod C)²)
    TTFT     = θ_fixed·fixed_ms + θ_token·token_ms

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
from dataclasses import dataclass
from typing import Annotated

from kvgate.scheduling.request import LatencyPrediction
from kvgate.settings import Range, check_ranges


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


class LatencyModel:
    """Per-worker calibrated predictions over one engine cost shape."""

    def __init__(
        self, cost: EngineCost | None = None, calibration: CalibrationSettings | None = None
    ) -> None:
        self.cost = cost or EngineCost()
        self.settings = calibration or CalibrationSettings()
        self.fits: dict[str, WorkerFit] = {}

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
        ``decode_usage`` / ``usage_after``: their KV tokens over the cache's capacity, without
        and with this request."""
        cost = self.cost
        own = uncached_tokens if uncached_tokens > 0 else 1
        ahead = pending_prefill_tokens if pending_prefill_tokens > 0 else 0
        total = ahead + own
        chunk = cost.max_num_batched_tokens - decoding
        chunk = max(chunk, 1)
        full, rest = divmod(total, chunk)
        steps = full + (1 if rest else 0)
        step_fixed = cost.prefill_fixed_ms
        decode_now = cost.decode_ms(decode_usage) if decoding else 0.0
        fixed = steps * (step_fixed + decode_now)
        if decoding:
            # A decode step is under way: on average half of it remains. (A prefill step under
            # way needs no term: its tokens are still counted in the pending work.)
            fixed += 0.5 * decode_now
        token = cost.prefill_per_token_ms * total + cost.prefill_per_token_sq_ms * (
            full * chunk * chunk + rest * rest
        )
        fit = self.fits.get(worker) or self.fit(worker)
        ttft = fit.theta_fixed * fixed + fit.theta_token * token
        interference = 0.0
        if ahead:
            steps_ahead = -(-ahead // chunk)
            interference = (
                steps_ahead * step_fixed
                + cost.prefill_per_token_ms * ahead
                + cost.prefill_per_token_sq_ms * ahead * (ahead if ahead < chunk else chunk)
            ) / max(expected_output_tokens, 1)
        itl = fit.itl_scale * (cost.decode_ms(usage_after) + interference)
        return LatencyPrediction(ttft / 1000.0, itl / 1000.0, fixed, token)

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
