"""Worker selection: KV-aware cost routing, active-sequence load, round-robin fallback."""

from kvgate.errors import ConfigError
from kvgate.scheduling.active import ActiveSequences
from kvgate.scheduling.kv_router import (
    AllWorkersBusy,
    Candidate,
    KvRouter,
    NoCandidates,
    RoundRobin,
    RoutingRequest,
    Selection,
)
from kvgate.scheduling.router_config import KvRouterConfig

__all__ = [
    "ActiveSequences",
    "AllWorkersBusy",
    "Candidate",
    "ConfigError",
    "KvRouter",
    "KvRouterConfig",
    "NoCandidates",
    "RoundRobin",
    "RoutingRequest",
    "Selection",
]
