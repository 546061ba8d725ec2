"""`round-robin-picker`: ignores scores and takes the candidates in turn.

The standard EPP's fallback when KV routing is off. Candidates are put in a stable order (by
address) on every pick, so the rotation stays fair when the candidate set changes between
requests; fallbacks are the candidates that follow in that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Self

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import Picker, PluginContext, Range
from kvgate.scheduling.request import LLMRequest, ScoredEndpoint


@dataclass(frozen=True, slots=True)
class RoundRobinPickerParams:
    max_num_of_endpoints: Annotated[int, Range(ge=1)] = 1


def _address(item: ScoredEndpoint) -> str:
    return item.endpoint.address


class RoundRobinPicker(Picker):
    type_name = "round-robin-picker"
    params_type = RoundRobinPickerParams

    def __init__(self, name: str, *, max_num_of_endpoints: int = 1) -> None:
        super().__init__(name)
        self.max_num_of_endpoints = max_num_of_endpoints
        self._next = 0

    @classmethod
    def from_config(cls, name: str, params: RoundRobinPickerParams, context: PluginContext) -> Self:
        return cls(name, max_num_of_endpoints=params.max_num_of_endpoints)

    def pick(self, request: LLMRequest, scored: list[ScoredEndpoint]) -> list[Endpoint]:
        n = len(scored)
        if n == 0:
            return []
        order = sorted(scored, key=_address)
        start = self._next % n
        self._next = start + 1
        count = min(self.max_num_of_endpoints, n)
        return [order[(start + i) % n].endpoint for i in range(count)]
