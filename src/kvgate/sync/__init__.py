"""Replica sync: several EPP replicas share their in-flight load over NATS (see `replica`)."""

from kvgate.sync.config import (
    DEFAULT_NATS_URL,
    ReplicaSyncConfig,
    default_subject,
    new_router_id,
    redact_url,
)
from kvgate.sync.metrics import SyncMetrics
from kvgate.sync.replica import ReplicaSync

__all__ = [
    "DEFAULT_NATS_URL",
    "ReplicaSync",
    "ReplicaSyncConfig",
    "SyncMetrics",
    "default_subject",
    "new_router_id",
    "redact_url",
]
