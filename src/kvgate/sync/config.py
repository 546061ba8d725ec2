"""Settings of replica sync: where NATS is, the subjects, heartbeats and leases, and limits."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field

from kvgate.errors import ConfigError

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_SUBJECT_PREFIX = "kvgate"


def default_subject(scope: str | None) -> str:
    """One subject per model pool: replicas serving different pools must not share load."""
    return f"{DEFAULT_SUBJECT_PREFIX}.{_subject_token(scope or 'default')}.active_sequences"


def _subject_token(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text) or "default"


def redact_url(url: str) -> str:
    """``nats://user:secret@host:4222`` → ``nats://***@host:4222`` (tokens and passwords)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    return f"{scheme}{sep}***@{host}" if sep and at and userinfo else url


def new_router_id() -> str:
    """Unique per process start: a restarted replica is a new peer, never a continuation."""
    return f"{socket.gethostname()[:64]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True, slots=True)
class ReplicaSyncConfig:
    nats_url: str = DEFAULT_NATS_URL
    subject: str = field(default_factory=lambda: default_subject(None))
    router_id: str = field(default_factory=new_router_id)
    heartbeat_s: float = 1.0
    lease_s: float = 3.0
    """A peer not heard from for this long is dropped, with its bookings."""
    max_outbox: int = 50_000
    """Ops queued while the publisher is behind; beyond, ops are dropped and a snapshot follows."""
    snapshot_min_interval_s: float = 0.2
    """Snapshot requests arriving closer together than this are answered by one snapshot."""
    connect_timeout_s: float = 2.0
    max_peers: int = 256
    """Replicas tracked at once; messages from more are dropped (counted as malformed)."""
    max_peer_requests: int = 200_000
    """Bookings held for one replica; adds beyond are dropped (counted as malformed)."""

    def __post_init__(self) -> None:
        if not self.nats_url.startswith(("nats://", "tls://", "ws://", "wss://")):
            raise ConfigError(
                "nats_url", f"got {redact_url(self.nats_url)!r}; expected nats://host:port"
            )
        if not self.subject or any(c in self.subject for c in " *>\t\r\n"):
            raise ConfigError("subject", f"got {self.subject!r}; expected a literal NATS subject")
        if not 0 < len(self.router_id) <= 256:
            raise ConfigError("router_id", "must be 1..256 characters")
        if self.heartbeat_s <= 0:
            raise ConfigError("heartbeat_s", f"got {self.heartbeat_s}; must be > 0")
        if self.lease_s <= self.heartbeat_s:
            raise ConfigError(
                "lease_s", f"got {self.lease_s}; must exceed heartbeat_s ({self.heartbeat_s})"
            )
        if self.max_outbox <= 0:
            raise ConfigError("max_outbox", "must be > 0")
        if self.max_peers <= 0 or self.max_peer_requests <= 0:
            raise ConfigError("max_peers", "max_peers and max_peer_requests must be > 0")

    @property
    def safe_url(self) -> str:
        """The NATS URL without credentials, for logs and health details."""
        return redact_url(self.nats_url)

    @property
    def control_subject(self) -> str:
        return f"{self.subject}.sync"
