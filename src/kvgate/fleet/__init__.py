"""The worker fleet: endpoints, their metrics, and how kvgate learns who they are."""

from kvgate.fleet.endpoint import Endpoint, EndpointMetrics, EndpointSet

__all__ = ["Endpoint", "EndpointMetrics", "EndpointSet"]
