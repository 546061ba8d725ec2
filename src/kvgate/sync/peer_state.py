"""Replica sync without I/O: what this replica owes its peers, and what it holds for them.

Outgoing, this replica's booking changes queue as ops; `PeerState.take_outgoing` turns what is
due into messages (numbered deltas, a snapshot, snapshot requests, a heartbeat) for the caller to
publish in that order. Incoming, `PeerState.receive` applies other replicas' messages to the
routers: their bookings go under ``(router_id, request_id)`` keys, sequence numbers reveal lost
messages, a lost message or an unknown peer asks for a snapshot, a snapshot replaces that peer's
copy whole, and `PeerState.expire_peers` drops a peer whose lease ran out, with its bookings.

Time is passed in. The caller (`kvgate.sync.replica.ReplicaSync`) owns the bus and the tasks;
``on_pending`` tells it that something became due. Thread-safety: none; owned by one event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvgate.scheduling.kv_router import KvRouter
from kvgate.sync.config import ReplicaSyncConfig
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
)
from kvgate.sync.metrics import SyncMetrics

log = logging.getLogger(__name__)

# Room left under the bus's max_payload for the message envelope.
ENVELOPE_BYTES = 512


@dataclass(slots=True)
class Peer:
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


def _nothing() -> None:
    pass


class PeerState:
    """This replica's outbox and sequence, and its copy of every peer's bookings.

    ``routers`` maps a KV scorer's plugin name to its router (names match across replicas).
    """

    def __init__(
        self,
        routers: Mapping[str, KvRouter],
        config: ReplicaSyncConfig,
        metrics: SyncMetrics,
        *,
        on_pending: Callable[[], None] = _nothing,
    ) -> None:
        self.routers = dict(routers)
        self.config = config
        self.router_id = config.router_id
        self.metrics = metrics
        self.on_pending = on_pending
        self.peers: dict[str, Peer] = {}
        self.seq = 0
        """Sequence number of the last deltas message taken for publishing."""
        self.connected = False
        self._outbox: list[Op] = []
        self._snapshot_counter = 0
        self._snapshot_wanted = False
        self._last_snapshot_at = -1e9
        self._ask_all = False
        self._ask: set[str] = set()
        self._heartbeat_due = False

    # -- own changes (called on the routing path: append only) -----------------------------------

    def queue(self, op: Op) -> None:
        if not self.connected or len(self._outbox) >= self.config.max_outbox:
            # Peers cannot get it now; they resynchronise from a snapshot once we are back.
            self.metrics.dropped_ops.inc()
            if self.connected:
                self.want_snapshot()
            return
        self._outbox.append(op)
        self.on_pending()

    # -- connection and timers --------------------------------------------------------------------

    def set_connected(self, connected: bool) -> None:
        self.connected = connected
        if connected:
            # Ask every replica for its bookings (a late joiner's view is right one round trip
            # later), and offer ours: after an outage the others have dropped us.
            self._ask_all = True
            self._snapshot_wanted = True
            self._heartbeat_due = True
            self.on_pending()
        elif self._outbox:
            # What is queued can no longer be sent in order; a snapshot replaces it.
            self.metrics.dropped_ops.inc(len(self._outbox))
            self._outbox = []

    def want_snapshot(self) -> None:
        """Publish a snapshot soon (ops were dropped, or a publish failed)."""
        self._snapshot_wanted = True
        self.on_pending()

    def tick(self, now: float) -> None:
        """Every heartbeat interval: a heartbeat is due, and silent peers expire."""
        if self.connected:
            self._heartbeat_due = True
            self.on_pending()
        self.expire_peers(now)

    # -- outgoing ---------------------------------------------------------------------------------

    def take_outgoing(self, now: float, max_payload: int) -> tuple[list[Message], float | None]:
        """The messages due now, in publishing order, and in how many seconds to call again for
        a snapshot held back by ``snapshot_min_interval_s`` (None: nothing held back)."""
        budget = max_payload - ENVELOPE_BYTES
        messages: list[Message] = []
        if self._outbox:
            ops, self._outbox = self._outbox, []
            for chunk in _chunks(ops, budget):
                self.seq += 1
                messages.append(Deltas(self.router_id, self.seq, chunk))
        retry_in = None
        if self._snapshot_wanted:
            wait = self._last_snapshot_at + self.config.snapshot_min_interval_s - now
            if wait > 0:
                retry_in = wait
            else:
                self._snapshot_wanted = False
                self._last_snapshot_at = now
                messages.extend(self._snapshot(budget))
        if self._ask_all or self._ask:
            targets: list[str | None] = [None] if self._ask_all else [*sorted(self._ask)]
            self._ask_all = False
            self._ask.clear()
            messages.extend(SyncRequest(self.router_id, target) for target in targets)
        if self._heartbeat_due:
            self._heartbeat_due = False
            messages.append(Heartbeat(self.router_id, self.seq, self.own_in_flight()))
        return messages, retry_in

    def _snapshot(self, budget: int) -> list[Snapshot]:
        entries: list[Add] = []
        for name, router in self.routers.items():
            for request_id, req in router.active.own():
                prefill = 0 if req.prefill_done else req.prefill_tokens
                entries.append(Add(name, request_id, req.worker, as_list(req.hashes), prefill))
        parts = _chunks(entries, budget) or [[]]
        self._snapshot_counter += 1
        return [
            Snapshot(self.router_id, self.seq, self._snapshot_counter, i, len(parts), part)
            for i, part in enumerate(parts)
        ]

    # -- incoming ---------------------------------------------------------------------------------

    def receive(self, payload: bytes, now: float) -> None:
        """Apply one message from the bus."""
        try:
            message = decode(payload)
        except MalformedSyncMessage as err:
            self.metrics.malformed.inc()
            log.debug("replica sync: malformed message dropped: %s", err)
            return
        if message.router == self.router_id:
            return
        self.metrics.messages.labels("received", kind_of(message)).inc()
        if isinstance(message, SyncRequest):
            if message.target is None or message.target == self.router_id:
                self.want_snapshot()
            return
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
            peer = self.peers[message.router] = Peer(message.router, now)
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
        self._count_remote()

    def _lost(self, peer: Peer, now: float) -> None:
        self.metrics.gaps.inc()
        peer.synced = False
        self._request_snapshot(peer, now)

    def _request_snapshot(self, peer: Peer, now: float) -> None:
        if now - peer.snapshot_requested_at < self.config.snapshot_min_interval_s:
            return
        peer.snapshot_requested_at = now
        self._ask.add(peer.router_id)
        self.on_pending()

    def _apply_ops(self, peer: Peer, ops: Sequence[Op], now: float) -> None:
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
            self.metrics.ops.labels("applied", op_name(op)).inc()

    def _apply_snapshot_part(self, peer: Peer, snap: Snapshot, now: float) -> None:
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

    # -- leases -----------------------------------------------------------------------------------

    def expire_peers(self, now: float) -> None:
        deadline = now - self.config.lease_s
        for peer in [p for p in self.peers.values() if p.last_seen < deadline]:
            log.warning(
                "replica sync: peer %s silent for over %.1f s; dropping its %d bookings",
                peer.router_id,
                self.config.lease_s,
                len(peer.entries),
            )
            self.metrics.peers_expired.inc()
            self._drop_peer(peer)

    def drop_peers(self) -> None:
        """Forget every peer and its bookings (this replica is closing)."""
        for peer in list(self.peers.values()):
            self._drop_peer(peer)

    def _drop_peer(self, peer: Peer) -> None:
        for scorer, request_id in peer.entries:
            router = self.routers.get(scorer)
            if router is not None:
                router.free((peer.router_id, request_id))
        self.peers.pop(peer.router_id, None)
        self.metrics.peers.set(len(self.peers))
        self._count_remote()

    def _count_remote(self) -> None:
        self.metrics.remote_requests.set(sum(len(p.entries) for p in self.peers.values()))

    # -- reading ----------------------------------------------------------------------------------

    def own_in_flight(self) -> int:
        return sum(1 for router in self.routers.values() for _ in router.active.own())

    def peer_status(self, now: float) -> dict[str, dict[str, Any]]:
        return {
            p.router_id: {
                "synced": p.synced,
                "seen_s_ago": round(now - p.last_seen, 3),
                "in_flight": len(p.entries),
                "in_flight_reported": p.in_flight,
            }
            for p in self.peers.values()
        }


def as_list(hashes: Sequence[int]) -> list[int]:
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


def kind_of(message: Message) -> str:
    return _KINDS[type(message)]


def op_name(op: Op) -> str:
    return _OPS[type(op)]
