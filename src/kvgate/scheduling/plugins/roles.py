"""The disaggregation role of an endpoint, as the llm-d / GAIE role filters read it."""

from __future__ import annotations

from kvgate.fleet.endpoint import Endpoint

ROLE_LABEL = "llm-d.ai/role"


def endpoint_role(endpoint: Endpoint) -> str:
    """The pod label ``llm-d.ai/role`` when present (``decode`` / ``prefill`` / ``both``; any
    other value matches neither filter); otherwise the role discovery assigned, which is ``both``
    unless configured — so an unlabelled endpoint serves both phases."""
    return endpoint.labels.get(ROLE_LABEL, endpoint.role)
