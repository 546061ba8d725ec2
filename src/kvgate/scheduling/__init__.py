"""Worker selection: KV-aware cost routing, active-sequence load, round-robin fallback."""

from kvgate.scheduling.active import ActiveSequences
from kvgate.scheduling.config import ConfigError, KvRouterConfig
from kvgate.scheduling.kv_router import (
    AllWorkersBusy,
    Candidate,
    KvRouter,
    NoCandidates,
    RoundRobin,
    RoutingRequest,
    Selection,
)

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
