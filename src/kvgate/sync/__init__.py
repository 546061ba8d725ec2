"""Replica sync: several EPP replicas share their in-flight load over NATS (see `replica`)."""

from kvgate.sync.replica import (
    DEFAULT_NATS_URL,
    ReplicaSync,
    ReplicaSyncConfig,
    SyncMetrics,
    default_subject,
)

__all__ = [
    "DEFAULT_NATS_URL",
    "ReplicaSync",
    "ReplicaSyncConfig",
    "SyncMetrics",
    "default_subject",
]
