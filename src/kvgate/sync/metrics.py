"""Prometheus metrics of replica sync (the names are part of the operations docs)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class SyncMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.connected = Gauge(
            "kvgate_replica_sync_connected", "1 while connected to NATS", registry=r
        )
        self.peers = Gauge("kvgate_replica_sync_peers", "Other replicas heard from", registry=r)
        self.remote_requests = Gauge(
            "kvgate_replica_sync_remote_requests",
            "In-flight requests booked on behalf of other replicas",
            registry=r,
        )
        self.messages = Counter(
            "kvgate_replica_sync_messages",
            "Sync messages by direction and kind",
            ["direction", "kind"],
            registry=r,
        )
        self.ops = Counter(
            "kvgate_replica_sync_ops",
            "Booking changes sent or applied",
            ["direction", "op"],
            registry=r,
        )
        self.dropped_ops = Counter(
            "kvgate_replica_sync_dropped_ops",
            "Own booking changes not sent (NATS unavailable or outbox full)",
            registry=r,
        )
        self.malformed = Counter(
            "kvgate_replica_sync_malformed",
            "Sync messages ignored because they do not decode or name no known scorer",
            registry=r,
        )
        self.gaps = Counter(
            "kvgate_replica_sync_gaps", "Lost messages detected from a peer's sequence", registry=r
        )
        self.peers_expired = Counter(
            "kvgate_replica_sync_peers_expired",
            "Peers dropped after their lease ran out (no heartbeat)",
            registry=r,
        )
        self.snapshots_applied = Counter(
            "kvgate_replica_sync_snapshots_applied", "Peer snapshots applied", registry=r
        )
