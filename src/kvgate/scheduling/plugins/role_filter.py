"""`decode-filter` and `prefill-filter`: keep the endpoints that serve one phase of a request.

An endpoint's role is the pod label ``llm-d.ai/role`` when present (``decode`` / ``prefill`` /
``both``; any other value matches neither filter), otherwise the role discovery assigned, which is
``both`` unless configured — so an unlabelled endpoint serves both phases.
"""

from __future__ import annotations

from typing import ClassVar

from kvgate.fleet.endpoint import ROLE_LABEL, Endpoint
from kvgate.scheduling.framework import Filter
from kvgate.scheduling.request import LLMRequest


def endpoint_role(endpoint: Endpoint) -> str:
    return endpoint.labels.get(ROLE_LABEL, endpoint.role)


class RoleFilter(Filter):
    roles: ClassVar[frozenset[str]]

    def filter(self, request: LLMRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        roles = self.roles
        return [ep for ep in endpoints if endpoint_role(ep) in roles]


class DecodeFilter(RoleFilter):
    type_name = "decode-filter"
    roles = frozenset({"decode", "both"})


class PrefillFilter(RoleFilter):
    type_name = "prefill-filter"
    roles = frozenset({"prefill", "both"})
