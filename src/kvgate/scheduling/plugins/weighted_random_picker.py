"""`weighted-random-picker`: chance proportional to score, without replacement for fallbacks.

Weighted sampling without replacement uses A-Res (Efraimidis & Spirakis): each endpoint draws
``u ~ U(0, 1]`` and gets the key ``log(u) / score``; the k largest keys are a weighted sample in
draw order. One pass, one random number per endpoint, no cumulative tables. Endpoints scoring 0
come only after every positive one, in random order — so when all scores are 0 the pick is uniform.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass
from typing import Annotated, Self

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import Picker, PluginContext, Range
from kvgate.scheduling.request import LLMRequest, ScoredEndpoint


@dataclass(frozen=True, slots=True)
class WeightedRandomPickerParams:
    max_num_of_endpoints: Annotated[int, Range(ge=1)] = 1


class WeightedRandomPicker(Picker):
    type_name = "weighted-random-picker"
    params_type = WeightedRandomPickerParams

    def __init__(self, name: str, *, max_num_of_endpoints: int = 1, rng: random.Random) -> None:
        super().__init__(name)
        self.max_num_of_endpoints = max_num_of_endpoints
        self._rng = rng

    @classmethod
    def from_config(
        cls, name: str, params: WeightedRandomPickerParams, context: PluginContext
    ) -> Self:
        return cls(name, max_num_of_endpoints=params.max_num_of_endpoints, rng=context.rng(name))

    def pick(self, request: LLMRequest, scored: list[ScoredEndpoint]) -> list[Endpoint]:
        draw = self._rng.random
        # (tier, key, index): positive scores are tier 1, zero (or negative) scores tier 0; the
        # index keeps tuples comparable without comparing endpoints.
        keyed = [
            (1, math.log(1.0 - draw()) / item.score, i) if item.score > 0 else (0, draw(), i)
            for i, item in enumerate(scored)
        ]
        if self.max_num_of_endpoints == 1:
            return [scored[max(keyed)[2]].endpoint] if keyed else []
        best = heapq.nlargest(self.max_num_of_endpoints, keyed)
        return [scored[i].endpoint for _, _, i in best]
