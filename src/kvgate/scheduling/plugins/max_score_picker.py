"""`max-score-picker`: the highest total score wins; equal scores are chosen between at random.

With ``maxNumOfEndpoints`` k > 1 the next k-1 best follow as fallbacks, best first (ties again in
random order).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Annotated, Self

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import Picker, PluginContext, Range
from kvgate.scheduling.request import LLMRequest, ScoredEndpoint


@dataclass(frozen=True, slots=True)
class MaxScorePickerParams:
    max_num_of_endpoints: Annotated[int, Range(ge=1)] = 1
    """The pick plus fallbacks returned."""


def _score(item: ScoredEndpoint) -> float:
    return item.score


class MaxScorePicker(Picker):
    type_name = "max-score-picker"
    params_type = MaxScorePickerParams

    def __init__(self, name: str, *, max_num_of_endpoints: int = 1, rng: random.Random) -> None:
        super().__init__(name)
        self.max_num_of_endpoints = max_num_of_endpoints
        self._rng = rng

    @classmethod
    def from_config(cls, name: str, params: MaxScorePickerParams, context: PluginContext) -> Self:
        return cls(name, max_num_of_endpoints=params.max_num_of_endpoints, rng=context.rng(name))

    def pick(self, request: LLMRequest, scored: list[ScoredEndpoint]) -> list[Endpoint]:
        if self.max_num_of_endpoints == 1:
            return self._pick_one(scored)
        # Shuffling first makes the stable sort order ties at random.
        order = scored.copy()
        self._rng.shuffle(order)
        order.sort(key=_score, reverse=True)
        return [item.endpoint for item in order[: self.max_num_of_endpoints]]

    def _pick_one(self, scored: list[ScoredEndpoint]) -> list[Endpoint]:
        # One pass; a tie replaces the current best with probability 1/ties (reservoir
        # sampling), so every tied endpoint is equally likely and the RNG is only drawn on ties.
        best: ScoredEndpoint | None = None
        ties = 0
        for item in scored:
            if best is None or item.score > best.score:
                best, ties = item, 1
            elif item.score == best.score:
                ties += 1
                if self._rng.randrange(ties) == 0:
                    best = item
        return [] if best is None else [best.endpoint]
