"""Replica sync: EPP replicas share their in-flight bookings over NATS so that they agree on load.

Each replica routes on its own; what it books (request added with its blocks and pending prefill
tokens, prefill completed, freed) counts in the load the KV router's cost function sees. Alone, N
replicas each see 1/N of the load and herd onto the same "best" worker. With sync, every replica
publishes its own changes and books the others' under ``(router_id, request_id)``, so each sees
the sum (the KV *index* needs no sync: every replica subscribes to every engine's events itself).

Consistency model
    Each replica is the only writer of its own bookings; the others hold a copy per peer. Deltas
    carry a per-sender sequence number, heartbeats the last one sent. A gap (NATS core delivery is
    at most once: a reconnect or a slow consumer loses messages), a peer never heard of, or a
    replica that (re)connects triggers a snapshot request; the snapshot replaces that peer's copy
    whole. A peer silent for ``lease_s`` (default 3 heartbeats) is dropped with its bookings, and
    a peer that stops cleanly says ``bye`` first. Deltas re-applied over a snapshot are idempotent.

Never blocking routing
    Routing only appends to an in-memory outbox; one publisher task drains it (batching whatever
    accumulated into one message). While NATS is away, routing goes on with local state, ops are
    dropped and counted, the peers' copies expire with their leases, and on reconnect every
    replica re-publishes its snapshot and asks for the others'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from kvgate.errors import ConfigError
from kvgate.scheduling.kv_router import KvRouter
from kvgate.service import Service
from kvgate.sync.messages import (
    Add,
    Bye,
    Deltas,
    Free,
    Heartbeat,
    MalformedSyncMessage,
    Message,
    Op,
    PrefillDone,
    Snapshot,
    SyncRequest,
    add_size,
    decode,
    encode,
)

log = logging.getLogger(__name__)

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_SUBJECT_PREFIX = "kvgate"
# Room left under NATS' max_payload for the message envelope.
_ENVELOPE_BYTES = 512


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


@dataclass(slots=True)
class _Peer:
    router_id: str
    last_seen: float
    last_seq: int = 0
    synced: bool = False
    """A snapshot was applied and no message was lost since."""
    entries: set[tuple[str, str]] = field(default_factory=set)
    """(scorer, request_id) booked on the peer's behalf."""
    snapshot_id: int | None = None
    snapshot_parts: dict[int, list[Add]] = field(default_factory=dict)
    snapshot_requested_at: float = -1e9
    in_flight: int = 0


class ReplicaSync(Service):
    """Publishes the given routers' own booking changes and applies other replicas' to them.

    ``routers`` maps a KV scorer's plugin name to its router: replicas run the same
    configuration, so names match across replicas. Set the instance as each scorer's ``journal``.
    """

    def __init__(
        self,
        routers: Mapping[str, KvRouter],
        config: ReplicaSyncConfig,
        *,
        metrics: SyncMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.routers = dict(routers)
        self.config = config
        self.router_id = config.router_id
        self.metrics = metrics or SyncMetrics()
        self._clock = clock
        self.peers: dict[str, _Peer] = {}
        self._outbox: list[Op] = []
        self._seq = 0
        self._snapshot_counter = 0
        self._snapshot_wanted = False
        self._last_snapshot_at = -1e9
        self._ask_all = False
        self._ask: set[str] = set()
        self._heartbeat_due = False
        self._wake = asyncio.Event()
        self._nc: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.state = "connecting"
        self.last_error: str | None = None
        self.disconnects = 0
        self._max_payload = 1 << 20

    # -- journal (called on the routing path: append only) ---------------------------------------

    def added(
        self,
        scorer: str,
        request_id: str,
        worker: str,
        hashes: Sequence[int],
        prefill_tokens: int,
    ) -> None:
        self._queue(Add(scorer, request_id, worker, _as_list(hashes), prefill_tokens))

    def prefill_completed(self, scorer: str, request_id: str) -> None:
        self._queue(PrefillDone(scorer, request_id))

    def freed(self, scorer: str, request_id: str) -> None:
        self._queue(Free(scorer, request_id))

    def _queue(self, op: Op) -> None:
        if self.state != "connected" or len(self._outbox) >= self.config.max_outbox:
            # Peers cannot get it now; they resynchronise from a snapshot once we are back.
            self.metrics.dropped_ops.inc()
            if self.state == "connected":
                self._snapshot_wanted = True
                self._wake.set()
            return
        self._outbox.append(op)
        self._wake.set()

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Returns at once: connecting (and reconnecting) happens in the background."""
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._connect(), name="kvgate-sync-connect"),
            loop.create_task(self._publisher(), name="kvgate-sync-publish"),
            loop.create_task(self._ticker(), name="kvgate-sync-heartbeat"),
        ]

    async def aclose(self) -> None:
        self._closing = True
        nc = self._nc
        if nc is not None and nc.is_connected:
            with contextlib.suppress(Exception):
                await nc.publish(self.config.subject, encode(Bye(self.router_id)))
                await asyncio.wait_for(nc.flush(), 1.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 2.0)
        self._set_state("closed")
        for peer in list(self.peers.values()):
            self._drop_peer(peer)

    async def wait_connected(self, timeout_s: float) -> None:
        """For tests and tools: wait until connected (raises TimeoutError)."""
        async with asyncio.timeout(timeout_s):
            while self.state != "connected":
                await asyncio.sleep(0.01)

    def status(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "router_id": self.router_id,
            "nats_url": self.config.safe_url,
            "subject": self.config.subject,
            "state": self.state,
            "last_error": self.last_error,
            "disconnects": self.disconnects,
            "own_in_flight": self._own_in_flight(),
            "peers": {
                p.router_id: {
                    "synced": p.synced,
                    "seen_s_ago": round(now - p.last_seen, 3),
                    "in_flight": len(p.entries),
                    "in_flight_reported": p.in_flight,
                }
                for p in self.peers.values()
            },
        }

    # -- NATS connection --------------------------------------------------------------------------

    async def _connect(self) -> None:
        import nats

        delay = 0.25
        while not self._closing:
            try:
                # With unlimited attempts this returns only once a server answers (failures go
                # to error_cb); it raises for what retrying cannot fix, e.g. a refused login.
                self._nc = await nats.connect(
                    servers=[self.config.nats_url],
                    name=f"kvgate-epp {self.router_id}",
                    no_echo=True,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    connect_timeout=self.config.connect_timeout_s,
                    ping_interval=max(1, int(self.config.lease_s)),
                    max_outstanding_pings=2,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                )
                break
            except Exception as err:
                await self._on_error(err)
                self._set_state("disconnected")
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
        nc = self._nc
        self._max_payload = int(getattr(nc, "max_payload", 0) or self._max_payload)
        await nc.subscribe(self.config.subject, cb=self._on_data)
        await nc.subscribe(self.config.control_subject, cb=self._on_control)
        log.info(
            "replica sync: %s connected to %s, subject %s",
            self.router_id,
            self.config.safe_url,
            self.config.subject,
        )
        self._on_connected()

    def _on_connected(self) -> None:
        self.last_error = None
        self._set_state("connected")
        # Ask every replica for its bookings (a late joiner's view is right one round trip
        # later), and offer ours: after an outage the others have dropped us.
        self._ask_all = True
        self._snapshot_wanted = True
        self._heartbeat_due = True
        self._wake.set()

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        self.disconnects += 1
        self._set_state("disconnected")
        log.warning("replica sync: lost NATS at %s; routing on local state", self.config.safe_url)

    async def _on_reconnected(self) -> None:
        log.info("replica sync: NATS is back; exchanging snapshots")
        self._on_connected()

    async def _on_error(self, err: Exception) -> None:
        message = str(err) or type(err).__name__
        if self.state != "connected" and message != self.last_error:
            log.warning(
                "replica sync: cannot reach NATS at %s (%s); routing on local state, retrying",
                self.config.safe_url,
                message,
            )
        self.last_error = message
        if self.state == "connecting":
            self._set_state("disconnected")

    def _set_state(self, state: str) -> None:
        self.state = state
        self.metrics.connected.set(1 if state == "connected" else 0)
        if state != "connected" and self._outbox:
            # What is queued can no longer be sent in order; a snapshot replaces it.
            self.metrics.dropped_ops.inc(len(self._outbox))
            self._outbox = []

    # -- publishing (one task: the order of a replica's messages is the order NATS delivers) ------

    async def _publisher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            nc = self._nc
            if self.state != "connected" or nc is None:
                continue
            try:
                if self._outbox:
                    await self._publish_deltas(nc)
                now = self._clock()
                if self._snapshot_wanted:
                    wait = self._last_snapshot_at + self.config.snapshot_min_interval_s - now
                    if wait > 0:
                        asyncio.get_running_loop().call_later(wait, self._wake.set)
                    else:
                        self._snapshot_wanted = False
                        self._last_snapshot_at = now
                        await self._publish_snapshot(nc)
                if self._ask_all or self._ask:
                    targets: list[str | None] = [None] if self._ask_all else [*sorted(self._ask)]
                    self._ask_all = False
                    self._ask.clear()
                    for target in targets:
                        await self._send(
                            nc, self.config.control_subject, SyncRequest(self.router_id, target)
                        )
                if self._heartbeat_due:
                    self._heartbeat_due = False
                    beat = Heartbeat(self.router_id, self._seq, self._own_in_flight())
                    await self._send(nc, self.config.subject, beat)
            except Exception as err:
                # Lost in flight (connection dropped mid-publish): peers recover via snapshot.
                self.last_error = str(err) or type(err).__name__
                log.debug("replica sync: publish failed: %s", self.last_error)
                self._snapshot_wanted = True

    async def _publish_deltas(self, nc: Any) -> None:
        ops, self._outbox = self._outbox, []
        for chunk in _chunks(ops, self._max_payload - _ENVELOPE_BYTES):
            self._seq += 1
            await self._send(nc, self.config.subject, Deltas(self.router_id, self._seq, chunk))
            for op in chunk:
                self.metrics.ops.labels("sent", _op_name(op)).inc()

    async def _publish_snapshot(self, nc: Any) -> None:
        entries: list[Add] = []
        for name, router in self.routers.items():
            for request_id, req in router.active.own():
                prefill = 0 if req.prefill_done else req.prefill_tokens
                entries.append(Add(name, request_id, req.worker, _as_list(req.hashes), prefill))
        parts = _chunks(entries, self._max_payload - _ENVELOPE_BYTES) or [[]]
        self._snapshot_counter += 1
        for i, part in enumerate(parts):
            snap = Snapshot(self.router_id, self._seq, self._snapshot_counter, i, len(parts), part)
            await self._send(nc, self.config.subject, snap)

    async def _send(self, nc: Any, subject: str, message: Message) -> None:
        await nc.publish(subject, encode(message))
        self.metrics.messages.labels("sent", _kind(message)).inc()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            if self.state == "connected":
                self._heartbeat_due = True
                self._wake.set()
            self._expire_peers()

    # -- receiving ---------------------------------------------------------------------------------

    async def _on_data(self, msg: Any) -> None:
        self._receive_guarded(msg.data)

    async def _on_control(self, msg: Any) -> None:
        self._receive_guarded(msg.data)

    def _receive_guarded(self, payload: bytes) -> None:
        # A message that trips a bug must cost that message, not the subscription.
        try:
            self.receive(payload)
        except Exception:
            self.metrics.malformed.inc()
            log.exception("replica sync: a message could not be applied; skipped")

    def receive(self, payload: bytes) -> None:
        """Apply one message from NATS. Public so that tests can feed payloads directly."""
        try:
            message = decode(payload)
        except MalformedSyncMessage as err:
            self.metrics.malformed.inc()
            log.debug("replica sync: malformed message dropped: %s", err)
            return
        if message.router == self.router_id:
            return
        self.metrics.messages.labels("received", _kind(message)).inc()
        if isinstance(message, SyncRequest):
            if message.target is None or message.target == self.router_id:
                self._snapshot_wanted = True
                self._wake.set()
            return
        now = self._clock()
        peer = self.peers.get(message.router)
        if isinstance(message, Bye):
            if peer is not None:
                log.info("replica sync: peer %s left", peer.router_id)
                self._drop_peer(peer)
            return
        if peer is None:
            if len(self.peers) >= self.config.max_peers:
                self.metrics.malformed.inc()
                return
            peer = self.peers[message.router] = _Peer(message.router, now)
            self.metrics.peers.set(len(self.peers))
            log.info("replica sync: new peer %s", peer.router_id)
            if not isinstance(message, Snapshot):
                self._request_snapshot(peer, now)
        peer.last_seen = now
        if isinstance(message, Deltas):
            if peer.synced and message.seq != peer.last_seq + 1:
                self._lost(peer, now)
            peer.last_seq = message.seq
            self._apply_ops(peer, message.ops, now)
        elif isinstance(message, Heartbeat):
            peer.in_flight = message.in_flight
            if peer.synced and message.seq != peer.last_seq:
                self._lost(peer, now)
            elif not peer.synced:
                self._request_snapshot(peer, now)
        else:
            self._apply_snapshot_part(peer, message, now)
        self.metrics.remote_requests.set(sum(len(p.entries) for p in self.peers.values()))

    def _lost(self, peer: _Peer, now: float) -> None:
        self.metrics.gaps.inc()
        peer.synced = False
        self._request_snapshot(peer, now)

    def _request_snapshot(self, peer: _Peer, now: float) -> None:
        if now - peer.snapshot_requested_at < self.config.snapshot_min_interval_s:
            return
        peer.snapshot_requested_at = now
        self._ask.add(peer.router_id)
        self._wake.set()

    def _apply_ops(self, peer: _Peer, ops: Sequence[Op], now: float) -> None:
        limit = self.config.max_peer_requests
        for op in ops:
            router = self.routers.get(op.scorer)
            if router is None:
                self.metrics.malformed.inc()
                continue
            key = (peer.router_id, op.request)
            if isinstance(op, Add):
                entry = (op.scorer, op.request)
                if entry not in peer.entries and len(peer.entries) >= limit:
                    self.metrics.malformed.inc()
                    continue
                router.book_key(key, op.worker, op.hashes, op.prefill_tokens, now)
                peer.entries.add(entry)
            elif isinstance(op, PrefillDone):
                router.mark_prefill_complete(key)
            else:
                router.free(key)
                peer.entries.discard((op.scorer, op.request))
            self.metrics.ops.labels("applied", _op_name(op)).inc()

    def _apply_snapshot_part(self, peer: _Peer, snap: Snapshot, now: float) -> None:
        if peer.snapshot_id != snap.snapshot:
            peer.snapshot_id = snap.snapshot
            peer.snapshot_parts = {}
        peer.snapshot_parts[snap.part] = snap.entries
        if len(peer.snapshot_parts) < snap.parts:
            return
        entries = [e for part in sorted(peer.snapshot_parts) for e in peer.snapshot_parts[part]]
        peer.snapshot_id = None
        peer.snapshot_parts = {}
        current = {(e.scorer, e.request): e for e in entries if e.scorer in self.routers}
        if len(current) > self.config.max_peer_requests:
            current = dict(list(current.items())[: self.config.max_peer_requests])
        self.metrics.malformed.inc(len(entries) - len(current))
        for scorer, request_id in peer.entries - current.keys():
            self.routers[scorer].free((peer.router_id, request_id))
        for (scorer, request_id), e in current.items():
            router = self.routers[scorer]
            key = (peer.router_id, request_id)
            booked = router.active.get(key)
            if booked is None or booked.worker != e.worker:
                router.book_key(key, e.worker, e.hashes, e.prefill_tokens, now)
            elif e.prefill_tokens == 0:
                router.mark_prefill_complete(key)
        peer.entries = set(current)
        peer.last_seq = snap.seq
        peer.synced = True
        self.metrics.snapshots_applied.inc()

    def _expire_peers(self) -> None:
        deadline = self._clock() - self.config.lease_s
        for peer in [p for p in self.peers.values() if p.last_seen < deadline]:
            log.warning(
                "replica sync: peer %s silent for over %.1f s; dropping its %d bookings",
                peer.router_id,
                self.config.lease_s,
                len(peer.entries),
            )
            self.metrics.peers_expired.inc()
            self._drop_peer(peer)

    def _drop_peer(self, peer: _Peer) -> None:
        for scorer, request_id in peer.entries:
            router = self.routers.get(scorer)
            if router is not None:
                router.free((peer.router_id, request_id))
        self.peers.pop(peer.router_id, None)
        self.metrics.peers.set(len(self.peers))
        self.metrics.remote_requests.set(sum(len(p.entries) for p in self.peers.values()))

    def _own_in_flight(self) -> int:
        return sum(1 for router in self.routers.values() for _ in router.active.own())


def _as_list(hashes: Sequence[int]) -> list[int]:
    return hashes if isinstance(hashes, list) else list(hashes)


_OpT = TypeVar("_OpT", Add, Op)


def _chunks(ops: Sequence[_OpT], budget: int) -> list[list[_OpT]]:
    """Split into messages of at most ``budget`` encoded bytes, in order."""
    chunks: list[list[_OpT]] = []
    size = budget
    for op in ops:
        if isinstance(op, Add):
            op_size = add_size(op)
            if op_size > budget:
                op = _truncate(op, budget)  # noqa: PLW2901
                op_size = add_size(op)
        else:
            op_size = 4 * (len(op.scorer) + len(op.request)) + 16
        if size + op_size > budget:
            chunks.append([])
            size = 0
        chunks[-1].append(op)
        size += op_size
    return chunks


def _truncate(op: Add, budget: int) -> Add:
    """A prompt too long for one message keeps its leading blocks: a prefix still counts."""
    keep = max(0, (budget - add_size(Add(op.scorer, op.request, op.worker, [], 0))) // 9)
    return Add(op.scorer, op.request, op.worker, op.hashes[:keep], op.prefill_tokens)


_KINDS = {
    Deltas: "deltas",
    Heartbeat: "heartbeat",
    Snapshot: "snapshot",
    Bye: "bye",
    SyncRequest: "sync_request",
}
_OPS = {Add: "add", PrefillDone: "prefill_done", Free: "free"}


def _kind(message: Message) -> str:
    return _KINDS[type(message)]


def _op_name(op: Op) -> str:
    return _OPS[type(op)]
