"""`random-picker`: uniformly random, ignoring scores; fallbacks are further distinct draws."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Annotated, Self

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import Picker, PluginContext, Range
from kvgate.scheduling.request import LLMRequest, ScoredEndpoint


@dataclass(frozen=True, slots=True)
class RandomPickerParams:
    max_num_of_endpoints: Annotated[int, Range(ge=1)] = 1


class RandomPicker(Picker):
    type_name = "random-picker"
    params_type = RandomPickerParams

    def __init__(self, name: str, *, max_num_of_endpoints: int = 1, rng: random.Random) -> None:
        super().__init__(name)
        self.max_num_of_endpoints = max_num_of_endpoints
        self._rng = rng

    @classmethod
    def from_config(cls, name: str, params: RandomPickerParams, context: PluginContext) -> Self:
        return cls(name, max_num_of_endpoints=params.max_num_of_endpoints, rng=context.rng(name))

    def pick(self, request: LLMRequest, scored: list[ScoredEndpoint]) -> list[Endpoint]:
        if not scored:
            return []
        if self.max_num_of_endpoints == 1:
            return [scored[self._rng.randrange(len(scored))].endpoint]
        chosen = self._rng.sample(scored, min(self.max_num_of_endpoints, len(scored)))
        return [item.endpoint for item in chosen]
