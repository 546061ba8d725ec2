"""`slo-aware-picker`: the best-scored endpoint among those predicted to meet the request's
latency objectives.

The objectives are the request's ``x-slo-ttft-ms`` and ``x-slo-tpot-ms`` headers (GAIE's names),
else this picker's ``ttftSloMs`` / ``tpotSloMs`` parameters, else none. With the predictions of
``predicted-latency-scorer``:

1. endpoints predicted to meet every objective are preferred: the highest score among them wins
   (ties: the lower predicted TTFT, then at random);
2. when none is, a sheddable request (objective priority < 0) is refused with 429 and a reason;
   any other request goes to the endpoint with the lowest predicted TTFT.

Fallbacks (``maxNumOfEndpoints`` > 1) follow in the same order. Without predictions (a request
kvgate does not tokenize) it picks like ``max-score-picker``. With no objective and one endpoint
to return (the default) the pick is one pass over the candidates, not a shuffle and a sort.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from operator import attrgetter
from typing import Annotated, ClassVar, Self

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import Picker, PluginContext, Product, Range
from kvgate.scheduling.latency_model import Predictions
from kvgate.scheduling.request import (
    LatencyPrediction,
    LLMRequest,
    SchedulingError,
    ScoredEndpoint,
)
from kvgate.scheduling.services import NO_METRICS, SchedulingMetrics

_native_top_scored: Callable[[list[ScoredEndpoint]], list[int] | None] | None
try:  # `_latency.c`; optional, the Python gives the same answer
    from kvgate.scheduling._latency import top_scored as _native_top_scored
except ImportError:  # pragma: no cover - depends on the build
    _native_top_scored = None


@dataclass(frozen=True, slots=True)
class SloAwarePickerParams:
    ttft_slo_ms: Annotated[float | None, Range(gt=0)] = None
    """Default TTFT objective for requests without ``x-slo-ttft-ms``; None: none."""
    tpot_slo_ms: Annotated[float | None, Range(gt=0)] = None
    """Default time-per-output-token objective for requests without ``x-slo-tpot-ms``."""
    max_num_of_endpoints: Annotated[int, Range(ge=1)] = 1
    """The pick plus fallbacks returned."""


class SloAwarePicker(Picker):
    type_name: ClassVar[str] = "slo-aware-picker"
    params_type: ClassVar[type[SloAwarePickerParams]] = SloAwarePickerParams
    consumes: ClassVar[frozenset[Product]] = frozenset({Product.LATENCY_PREDICTIONS})

    def __init__(
        self,
        name: str,
        params: SloAwarePickerParams | None = None,
        *,
        rng: random.Random | None = None,
        metrics: SchedulingMetrics = NO_METRICS,
    ) -> None:
        super().__init__(name)
        self.params = params or SloAwarePickerParams()
        self._rng = rng or random.Random()
        self.metrics = metrics

    @classmethod
    def from_config(cls, name: str, params: SloAwarePickerParams, context: PluginContext) -> Self:
        return cls(name, params, rng=context.rng(name), metrics=context.metrics)

    def pick(self, request: LLMRequest, scored: list[ScoredEndpoint]) -> list[Endpoint]:
        if not scored:
            return []
        predictions: Mapping[str, LatencyPrediction] = request.predictions or {}
        ttft_slo = request.slo_ttft_s
        if ttft_slo is None and self.params.ttft_slo_ms is not None:
            ttft_slo = self.params.ttft_slo_ms / 1000.0
        itl_slo = request.slo_itl_s
        if itl_slo is None and self.params.tpot_slo_ms is not None:
            itl_slo = self.params.tpot_slo_ms / 1000.0
        if self.params.max_num_of_endpoints == 1 and (
            (ttft_slo is None and itl_slo is None) or not predictions
        ):
            return [self._best(predictions, scored).endpoint]
        # Random keys first: the stable sorts below then order ties at random.
        order = scored.copy()
        self._rng.shuffle(order)
        if (ttft_slo is None and itl_slo is None) or not predictions:
            order.sort(key=lambda s: (-s.score, _ttft(predictions, s)))
        else:
            meets = [s for s in order if _meets(predictions, s, ttft_slo, itl_slo)]
            if meets:
                rest = [s for s in order if s not in meets]
                meets.sort(key=lambda s: (-s.score, _ttft(predictions, s)))
                rest.sort(key=lambda s: _ttft(predictions, s))
                order = meets + rest
            elif request.priority < 0:
                best = min(_ttft(predictions, s) for s in order)
                self.metrics.shed("slo")
                raise SchedulingError(
                    429,
                    "no endpoint is predicted to meet the request's latency objectives "
                    f"({_objectives(ttft_slo, itl_slo)}; best predicted TTFT "
                    f"{best * 1000:.0f} ms); sheddable request (priority < 0) dropped",
                )
            else:
                order.sort(key=lambda s: _ttft(predictions, s))
        return [s.endpoint for s in order[: self.params.max_num_of_endpoints]]

    def _best(
        self, predictions: Mapping[str, LatencyPrediction], scored: list[ScoredEndpoint]
    ) -> ScoredEndpoint:
        """The first of the order the sorts above would make, without sorting: the highest
        score, then the lowest predicted TTFT, then at random."""
        tied = top_scored(scored)
        if len(tied) == 1:
            return scored[tied[0]]
        ttft = [_ttft(predictions, scored[i], i) for i in tied]
        fastest = min(ttft)
        best = [scored[i] for i, t in zip(tied, ttft, strict=True) if t == fastest]
        return best[0] if len(best) == 1 else self._rng.choice(best)


def top_scored(scored: list[ScoredEndpoint]) -> list[int]:
    """Where the highest score is in ``scored`` (not empty), in list order."""
    if _native_top_scored is not None:
        found = _native_top_scored(scored)
        if found is not None:
            return found
    return top_scored_python(scored)


def top_scored_python(scored: list[ScoredEndpoint]) -> list[int]:
    scores = list(map(_SCORE, scored))
    top = max(scores)
    tied = [i := scores.index(top)]
    for _ in range(scores.count(top) - 1):
        tied.append(i := scores.index(top, i + 1))
    return tied


_SCORE = attrgetter("score")


def _ttft(
    predictions: Mapping[str, LatencyPrediction], item: ScoredEndpoint, at: int = -1
) -> float:
    """The predicted TTFT of ``item``, infinite when not predicted; ``at``: its place among the
    candidates, where the scheduler keeps the order the predictions were made in."""
    address = item.endpoint.address
    if isinstance(predictions, Predictions):
        ttft = predictions.ttft_s(address, at)
        return ttft if ttft is not None else float("inf")
    prediction = predictions.get(address)
    return prediction.ttft_s if prediction is not None else float("inf")


def _meets(
    predictions: Mapping[str, LatencyPrediction],
    item: ScoredEndpoint,
    ttft_slo: float | None,
    itl_slo: float | None,
) -> bool:
    prediction = predictions.get(item.endpoint.address)
    if prediction is None:
        return False
    return (ttft_slo is None or prediction.ttft_s <= ttft_slo) and (
        itl_slo is None or prediction.itl_s <= itl_slo
    )


def _objectives(ttft_slo: float | None, itl_slo: float | None) -> str:
    parts = []
    if ttft_slo is not None:
        parts.append(f"TTFT <= {ttft_slo * 1000:.0f} ms")
    if itl_slo is not None:
        parts.append(f"TPOT <= {itl_slo * 1000:.1f} ms")
    return ", ".join(parts)
