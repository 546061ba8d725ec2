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

Layout
    The protocol itself (ops, sequence numbers, gaps, snapshots, leases) is `peer_state`, without
    I/O; the bus is an interface (`bus`: NATS in `nats_bus`, in-process in `memory_bus`); this
    module wires them: connection state, the publisher and heartbeat tasks, start and stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kvgate.scheduling.kv_router import KvRouter
from kvgate.service import Service
from kvgate.sync.bus import Bus, Connect
from kvgate.sync.config import ReplicaSyncConfig
from kvgate.sync.messages import Add, Bye, Deltas, Free, Message, PrefillDone, SyncRequest, encode
from kvgate.sync.metrics import SyncMetrics
from kvgate.sync.nats_bus import connect_nats
from kvgate.sync.peer_state import Peer, PeerState, as_list, kind_of, op_name

log = logging.getLogger(__name__)

_DEFAULT_MAX_PAYLOAD = 1 << 20


class ReplicaSync(Service):
    """Publishes the given routers' own booking changes and applies other replicas' to them.

    ``routers`` maps a KV scorer's plugin name to its router: replicas run the same
    configuration, so names match across replicas. Set the instance as each scorer's ``journal``.
    ``connect`` opens the bus (default: NATS at ``config.nats_url``).
    """

    def __init__(
        self,
        routers: Mapping[str, KvRouter],
        config: ReplicaSyncConfig,
        *,
        metrics: SyncMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        connect: Connect | None = None,
    ) -> None:
        self.config = config
        self.router_id = config.router_id
        self.metrics = metrics or SyncMetrics()
        self._clock = clock
        self._connect_bus: Connect = connect or functools.partial(connect_nats, config)
        self._wake = asyncio.Event()
        self.peer_state = PeerState(routers, config, self.metrics, on_pending=self._wake.set)
        self._bus: Bus | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.state = "connecting"
        self.last_error: str | None = None
        self.disconnects = 0
        self._max_payload = _DEFAULT_MAX_PAYLOAD

    @property
    def routers(self) -> dict[str, KvRouter]:
        return self.peer_state.routers

    @property
    def peers(self) -> Mapping[str, Peer]:
        return self.peer_state.peers

    # -- journal (called on the routing path: append only) ---------------------------------------

    def added(
        self,
        scorer: str,
        request_id: str,
        worker: str,
        hashes: Sequence[int],
        prefill_tokens: int,
    ) -> None:
        self.peer_state.queue(Add(scorer, request_id, worker, as_list(hashes), prefill_tokens))

    def prefill_completed(self, scorer: str, request_id: str) -> None:
        self.peer_state.queue(PrefillDone(scorer, request_id))

    def freed(self, scorer: str, request_id: str) -> None:
        self.peer_state.queue(Free(scorer, request_id))

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
        bus = self._bus
        if bus is not None and bus.is_connected:
            with contextlib.suppress(Exception):
                await bus.publish(self.config.subject, encode(Bye(self.router_id)))
                await bus.flush(1.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if bus is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(bus.close(), 2.0)
        self._set_state("closed")
        self.peer_state.drop_peers()

    async def wait_connected(self, timeout_s: float) -> None:
        """For tests and tools: wait until connected (raises TimeoutError)."""
        async with asyncio.timeout(timeout_s):
            while self.state != "connected":
                await asyncio.sleep(0.01)

    def status(self) -> dict[str, Any]:
        return {
            "router_id": self.router_id,
            "nats_url": self.config.safe_url,
            "subject": self.config.subject,
            "state": self.state,
            "last_error": self.last_error,
            "disconnects": self.disconnects,
            "own_in_flight": self.peer_state.own_in_flight(),
            "peers": self.peer_state.peer_status(self._clock()),
        }

    # -- connection -------------------------------------------------------------------------------

    async def _connect(self) -> None:
        delay = 0.25
        while not self._closing:
            try:
                self._bus = await self._connect_bus(self)
                break
            except Exception as err:
                await self.on_error(err)
                self._set_state("disconnected")
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
        bus = self._bus
        if bus is None:
            return
        self._max_payload = bus.max_payload
        await bus.subscribe(self.config.subject, self._receive_guarded)
        await bus.subscribe(self.config.control_subject, self._receive_guarded)
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

    async def on_disconnected(self) -> None:
        if self._closing:
            return
        self.disconnects += 1
        self._set_state("disconnected")
        log.warning("replica sync: lost NATS at %s; routing on local state", self.config.safe_url)

    async def on_reconnected(self) -> None:
        log.info("replica sync: NATS is back; exchanging snapshots")
        self._on_connected()

    async def on_error(self, err: Exception) -> None:
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
        self.peer_state.set_connected(state == "connected")

    # -- publishing (one task: the order of a replica's messages is the order the bus delivers) --

    async def _publisher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            bus = self._bus
            if self.state != "connected" or bus is None:
                continue
            messages, retry_in = self.peer_state.take_outgoing(self._clock(), self._max_payload)
            if retry_in is not None:
                asyncio.get_running_loop().call_later(retry_in, self._wake.set)
            try:
                for message in messages:
                    await self._send(bus, message)
            except Exception as err:
                # Lost in flight (connection dropped mid-publish): peers recover via snapshot.
                self.last_error = str(err) or type(err).__name__
                log.debug("replica sync: publish failed: %s", self.last_error)
                self.peer_state.want_snapshot()

    async def _send(self, bus: Bus, message: Message) -> None:
        control = isinstance(message, SyncRequest)
        await bus.publish(
            self.config.control_subject if control else self.config.subject, encode(message)
        )
        self.metrics.messages.labels("sent", kind_of(message)).inc()
        if isinstance(message, Deltas):
            for op in message.ops:
                self.metrics.ops.labels("sent", op_name(op)).inc()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            self.peer_state.tick(self._clock())

    # -- receiving ---------------------------------------------------------------------------------

    def _receive_guarded(self, payload: bytes) -> None:
        # A message that trips a bug must cost that message, not the subscription.
        try:
            self.receive(payload)
        except Exception:
            self.metrics.malformed.inc()
            log.exception("replica sync: a message could not be applied; skipped")

    def receive(self, payload: bytes) -> None:
        """Apply one message from the bus. Public so that tests can feed payloads directly."""
        self.peer_state.receive(payload, self._clock())
