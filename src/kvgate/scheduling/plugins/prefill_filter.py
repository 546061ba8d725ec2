"""`prefill-filter`: keep the endpoints that can prefill (role ``prefill`` or ``both``)."""

from __future__ import annotations

from typing import Self

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import Filter, LLMRequest
from kvgate.scheduling.plugins.roles import endpoint_role
from kvgate.scheduling.registry import NoParams, PluginContext

_ROLES = frozenset({"prefill", "both"})


class PrefillFilter(Filter):
    type_name = "prefill-filter"
    params_type = NoParams

    @classmethod
    def from_config(cls, name: str, params: NoParams, context: PluginContext) -> Self:
        return cls(name)

    def filter(self, request: LLMRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        return [ep for ep in endpoints if endpoint_role(ep) in _ROLES]
