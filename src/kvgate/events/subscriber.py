"""Subscribe to engines' KV event streams (ZMQ) and apply the events to a sink, in order.

Sources
    Each engine is a *source* named by its worker id (``"ip:port"``), added and removed at runtime:

    - connect mode: ``add_source(worker, "tcp://ip:5557")`` opens a SUB socket to the engine's
      bound PUB (with ``data_parallel_size=n`` it connects to ports ``5557 .. 5557+n-1``, vLLM's
      layout for data-parallel ranks);
    - central mode: ``bind("tcp://*:5557")`` opens one SUB socket that engines' PUBs connect to,
      and ``add_source(worker)`` (no endpoint) accepts that worker's messages, recognised by the
      topic ``<prefix>@<worker>@<model>`` (llm-d: ``kv@10.0.0.1:8000@Qwen/Qwen3-0.6B``). Topics of
      unregistered workers are counted and dropped, so a removed worker that keeps publishing
      cannot reappear in the index.

Ordering and sequence numbers
    One reader task per socket, and every worker's messages come through exactly one socket, so
    each worker's events reach the sink in arrival order. Per (worker, data-parallel rank) the
    subscriber tracks the publisher's ``seq`` (`kvgate.events.sequence` tells the cases apart):

    - a source with a replay endpoint is asked for its buffered history as soon as it is added
      (kvgate restarted next to engines that served before); live batches the replay already
      covered are skipped;
    - the first live message sets the baseline; if it is past seq 0 and the history was not
      fetched, the batches before it are replayed then (backfill), or the worker's earlier blocks
      stay unknown (a cold start, counted and logged);
    - ``seq`` at or below the last one means the publisher restarted (not only back to 0: a new
      engine's first messages may be lost while the connection is set up): the worker is cleared
      and the new ``seq`` is the baseline. Nothing else can produce it: ZMQ delivers a publisher's
      messages in order and at most once, and a replay stops short of the live message that
      triggered it, so replayed and live batches never overlap;
    - a gap is filled from the engine's replay socket when one is configured; if there is none, or
      the replay fails, times out or does not reach back far enough, the worker is cleared (stale
      blocks mislead routing, missing ones only cost a cache miss) and the stream resumes there.
    A payload that cannot be decoded is not applied and does not advance ``seq``, so the next good
    message shows up as a gap and goes through the same path.

Block size
    A ``BlockStored`` whose ``block_size`` differs from the configured one is refused (never given
    to the sink): its blocks would be hashed on the wrong boundaries. An ERROR saying what to change
    is logged once per worker and reported size.

Concurrency and resources
    Everything runs on the caller's event loop; the sink is called synchronously from it and must
    not block. A gap replay is awaited inline by the socket's reader, so on the central socket it
    delays the other workers by up to ``replay_timeout_s``; their messages queue in the socket
    meanwhile (``rcvhwm``). By default each subscriber owns a ZMQ context, destroyed by `aclose`;
    pass ``context=`` to share one (it is then left open).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, Final, Protocol

import zmq
import zmq.asyncio

from kvgate.events.decode import MalformedEvent, decode_batch, parse_seq
from kvgate.events.replay import ReplayError, fetch_replay, offset_endpoint_port
from kvgate.events.sequence import SequenceTracker, SeqVerdict, is_unbroken, replay_shortfall
from kvgate.events.types import BlockRemoved, BlockStored, EventBatch, KvEvent
from kvgate.service import Service
from kvgate.settings import Range, check_ranges

__all__ = [
    "EventSink",
    "KvEventSubscriber",
    "SubscriberConfig",
    "SubscriberStats",
    "WorkerStats",
]

logger = logging.getLogger(__name__)

_FRAMES_PER_MESSAGE: Final = 3
_TOPIC_PARTS: Final = 3
_RECV_ERROR_BACKOFF_S: Final = 0.1


class EventSink(Protocol):
    """Where decoded events go (the prefix index). Called on the event loop; must not block."""

    def apply_event(self, worker: str, event: KvEvent) -> None: ...

    def clear_worker(self, worker: str) -> None:
        """Drop every block of `worker` but keep the worker."""
        ...


@dataclass(frozen=True, slots=True)
class SubscriberConfig:
    block_size: Annotated[int, Range(ge=1)]
    """Tokens per KV block kvgate hashes with; BlockStored events of any other size are refused."""
    block_size_setting: str = "DYNAMO_KV_BLOCK_SIZE"
    """Name of the kvgate setting quoted in the block-size mismatch error."""
    rcvhwm: Annotated[int, Range(ge=0)] = 100_000
    """SUB receive high-water mark, in messages. ZMQ's default (1,000) drops bursts; vLLM's
    publisher uses 100,000. Worst case memory ~ rcvhwm x batch size (a few hundred bytes each)."""
    replay_timeout_s: Annotated[float, Range(gt=0)] = 2.0
    """Total time allowed for one gap replay before the worker is cleared instead."""
    max_drain: Annotated[int, Range(ge=1)] = 1_000
    """Messages handled per wakeup of a socket's reader before it yields to the event loop: large
    enough that a burst costs few loop round trips, small enough not to starve other tasks."""
    warn_interval_s: Annotated[float, Range(ge=0)] = 10.0
    """Minimum interval between two warnings of the same kind (malformed, unknown topic, ...)."""

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(slots=True)
class WorkerStats:
    """Counters of one worker's stream; plain ints, only ever increasing."""

    batches: int = 0
    """Batches applied (including replayed ones)."""
    events: int = 0
    """Events in applied batches."""
    blocks_stored: int = 0
    blocks_removed: int = 0
    malformed: int = 0
    """Messages dropped because the frames or the payload did not follow the wire format."""
    unknown_events: int = 0
    """Events of a type this decoder does not know, skipped (the rest of their batch applied)."""
    gaps: int = 0
    replays_ok: int = 0
    replays_failed: int = 0
    resets: int = 0
    """Times the worker's blocks were cleared: after an unfilled gap or a publisher restart."""
    backfills: int = 0
    """First contacts after which the worker's earlier events were replayed (index rebuilt)."""
    cold_starts: int = 0
    """First contacts past seq 0 with no (working) replay: earlier blocks stay unknown."""
    block_size_mismatch: int = 0
    """BlockStored events refused because of their block_size."""
    sink_errors: int = 0

    def add(self, other: WorkerStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(slots=True)
class SubscriberStats:
    workers: dict[str, WorkerStats] = field(default_factory=dict)
    """Current sources' counters; a removed worker's are folded into `departed`."""
    departed: WorkerStats = field(default_factory=WorkerStats)
    unknown_topic: int = 0
    """Messages on the central socket whose topic names no registered worker."""
    malformed: int = 0
    """Malformed messages that could not be attributed to a worker."""
    internal_errors: int = 0
    """Unexpected exceptions caught by a reader loop (a bug: see the log)."""

    def total(self) -> WorkerStats:
        """Sum over current and departed workers; monotonic."""
        total = WorkerStats()
        total.add(self.departed)
        for stats in self.workers.values():
            total.add(stats)
        return total


class _Worker:
    __slots__ = (
        "active",
        "mismatch_reported",
        "name",
        "replay_endpoint",
        "seqs",
        "stats",
        "unknown_reported",
    )

    def __init__(self, name: str, replay_endpoint: str | None) -> None:
        self.name = name
        self.replay_endpoint = replay_endpoint
        self.stats = WorkerStats()
        self.seqs = SequenceTracker()
        # Cleared when the source is removed; checked after every await so a removed worker gets
        # no further sink calls.
        self.active = True
        self.mismatch_reported: set[int] = set()
        self.unknown_reported: set[str] = set()

    def on_unknown_event(self, tag: str) -> None:
        self.stats.unknown_events += 1
        if tag not in self.unknown_reported:
            self.unknown_reported.add(tag)
            logger.warning(
                "worker %s sent an event of unknown type %r; skipping such events "
                "(the rest of each batch is applied)",
                self.name,
                tag,
            )


def _recv_message(socket: zmq.Socket[bytes]) -> list[bytes]:
    """One whole multipart message, without blocking (`zmq.Again` when there is none).

    Frame by frame because ``Frame.more`` spares the RCVMORE getsockopt that `recv_multipart`
    makes per frame: ~40% less time per 3-frame message. The parts of a multipart message are
    delivered atomically, so only the first recv can find nothing.
    """
    frame = socket.recv(zmq.NOBLOCK, copy=False)
    parts = [frame.bytes]
    while frame.more:
        frame = socket.recv(zmq.NOBLOCK, copy=False)
        parts.append(frame.bytes)
    return parts


class _Throttle:
    """Lets one log line through per interval and counts the ones it held back."""

    __slots__ = ("_interval", "_next", "_suppressed")

    def __init__(self, interval_s: float) -> None:
        self._interval = interval_s
        self._next = 0.0
        self._suppressed = 0

    def allow(self) -> int | None:
        """None to stay quiet; otherwise how many lines were suppressed since the last one."""
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return None
        suppressed, self._suppressed = self._suppressed, 0
        self._next = now + self._interval
        return suppressed


class _Source:
    __slots__ = ("socket", "task", "worker")

    def __init__(self, worker: _Worker, socket: zmq.asyncio.Socket | None) -> None:
        self.worker = worker
        self.socket = socket  # None: the worker publishes to the central socket
        self.task: asyncio.Task[None] | None = None


class KvEventSubscriber(Service):
    """Consume KV event streams from many engines and apply them to an `EventSink`.

    Use as ``async with KvEventSubscriber(sink, config) as sub:`` or `start` / `aclose`. Sources
    may be added before or after start; see the module docstring for modes and guarantees.
    """

    def __init__(
        self,
        sink: EventSink,
        config: SubscriberConfig,
        *,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self._sink = sink
        self._config = config
        self._owns_context = context is None
        self._context = context if context is not None else zmq.asyncio.Context()
        self.stats = SubscriberStats()
        self._sources: dict[str, _Source] = {}
        self._central: zmq.asyncio.Socket | None = None
        self._central_subscribe = b""
        # topic -> worker for topics seen before; entries of removed workers are dropped.
        self._topics: dict[bytes, _Worker] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False
        self._throttles = {
            kind: _Throttle(config.warn_interval_s)
            for kind in ("malformed", "unknown_topic", "sink", "internal")
        }

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start reading every socket added so far (later ones start as they are added)."""
        self._check_open()
        if self._started:
            return
        self._started = True
        for source in self._sources.values():
            self._spawn_source(source)
            self._spawn_history(source.worker)
        if self._central is not None:
            self._spawn_central()

    async def aclose(self) -> None:
        """Stop all readers, close every socket and, if this subscriber owns it, the context."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for source in self._sources.values():
            source.worker.active = False
            if source.socket is not None:
                source.socket.close(linger=0)
        if self._central is not None:
            self._central.close(linger=0)
        if self._owns_context:
            self._context.destroy(linger=0)

    # -- sources ---------------------------------------------------------------------------------

    def add_source(
        self,
        worker: str,
        endpoint: str | None = None,
        *,
        replay_endpoint: str | None = None,
        subscribe: bytes = b"",
        data_parallel_size: int = 1,
    ) -> None:
        """Start consuming `worker`'s events.

        `endpoint` is the engine's bound PUB (``tcp://ip:port``) to connect to; None means the
        engine publishes to this subscriber's central socket (see `bind`) with a topic naming
        `worker`. `replay_endpoint` is the engine's replay ROUTER, used to fill gaps; the port is
        offset by the data-parallel rank, as vLLM does. `subscribe` is a topic prefix (connect
        mode; the central socket has its own, see `bind`).
        """
        self._check_open()
        if worker in self._sources:
            raise ValueError(f"worker {worker!r} is already a source; remove it first")
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {data_parallel_size}")
        if endpoint is None and (subscribe or data_parallel_size != 1):
            raise ValueError(
                "subscribe and data_parallel_size apply to connected sources (endpoint=...); "
                "the central socket's prefix is set by bind()"
            )
        socket = None
        if endpoint is not None:
            endpoints = [offset_endpoint_port(endpoint, rank) for rank in range(data_parallel_size)]
            socket = self._new_sub_socket(subscribe)
            try:
                for address in endpoints:
                    socket.connect(address)
            except zmq.ZMQError as exc:
                socket.close(linger=0)
                raise ValueError(f"cannot connect to {endpoint!r} for {worker}: {exc}") from None
        source = _Source(_Worker(worker, replay_endpoint), socket)
        self._sources[worker] = source
        self.stats.workers[worker] = source.worker.stats
        if self._started:
            self._spawn_source(source)
            self._spawn_history(source.worker)

    def remove_source(self, worker: str) -> None:
        """Stop consuming `worker`'s events; the sink receives none of them after this returns.

        The caller removes the worker from the index itself. Unknown workers are ignored.
        """
        source = self._sources.pop(worker, None)
        if source is None:
            return
        source.worker.active = False
        self.stats.departed.add(self.stats.workers.pop(worker))
        self._topics = {t: w for t, w in self._topics.items() if w is not source.worker}
        socket = source.socket
        if socket is None:
            return
        if source.task is None:
            socket.close(linger=0)
            return
        # Close only once the reader has left its pending recv (closing a socket under a pending
        # asyncio recv leaves a dangling future); the done callback also covers a task cancelled
        # before it ever ran.
        source.task.add_done_callback(lambda _task: socket.close(linger=0))
        source.task.cancel()

    def bind(self, endpoint: str, *, subscribe: bytes = b"") -> str:
        """Bind the central SUB socket (first call creates it) and return the bound endpoint.

        Engines connect their PUB here; ``tcp://127.0.0.1:0`` picks a free port, whose endpoint is
        returned. `subscribe` is the topic prefix to receive (e.g. ``b"kv@"``), fixed by the call
        that creates the socket.
        """
        self._check_open()
        if self._central is None:
            self._central = self._new_sub_socket(subscribe)
            self._central_subscribe = subscribe
            if self._started:
                self._spawn_central()
        elif subscribe != self._central_subscribe:
            raise ValueError(
                f"the central socket already subscribes to {self._central_subscribe!r}; "
                f"cannot change it to {subscribe!r}"
            )
        self._central.bind(endpoint)
        bound = self._central.getsockopt(zmq.LAST_ENDPOINT)
        assert isinstance(bound, bytes)
        return bound.decode()

    # -- internals: sockets and readers ----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the subscriber is closed")

    def _new_sub_socket(self, subscribe: bytes) -> zmq.asyncio.Socket:
        socket = self._context.socket(zmq.SUB)
        socket.setsockopt(zmq.RCVHWM, self._config.rcvhwm)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SUBSCRIBE, subscribe)
        return socket

    def _spawn_source(self, source: _Source) -> None:
        if source.socket is None:
            return
        source.task = self._spawn(
            self._read(source.socket, source.worker), f"kv-events {source.worker.name}"
        )

    def _spawn_history(self, worker: _Worker) -> None:
        if worker.replay_endpoint is not None:
            self._spawn(self._fetch_history(worker), f"kv-events history {worker.name}")

    async def _fetch_history(self, worker: _Worker) -> None:
        """Replay a new source's buffered history at once rather than at its next live batch
        (`_backfill`): an idle worker's cached prefixes are then known before it gets a request,
        e.g. right after kvgate restarted. Only data-parallel rank 0's buffer is asked; other
        ranks backfill at their first batch."""
        assert worker.replay_endpoint is not None
        try:
            payloads = await fetch_replay(
                self._context,
                offset_endpoint_port(worker.replay_endpoint, 0),
                0,
                stop_before=1 << 63,
                timeout_s=self._config.replay_timeout_s * 5,
            )
            batches = [decode_batch(seq, data, worker.on_unknown_event) for seq, data in payloads]
        except (ReplayError, ValueError, MalformedEvent) as exc:
            logger.info("worker %s: no start-up replay (%s); backfilling at its first batch",
                        worker.name, exc)  # fmt: skip
            return
        if not worker.active or worker.seqs.started or not batches:
            return  # live batches came first (their backfill covers this), or nothing to know
        seqs = [b.seq for b in batches]
        if not is_unbroken(seqs) or any(
            b.data_parallel_rank != batches[0].data_parallel_rank for b in batches
        ):
            logger.info("worker %s: start-up replay is not one unbroken stream; backfilling at "
                        "its first batch", worker.name)  # fmt: skip
            return
        for batch in batches:
            self._apply(worker, batch)
        worker.seqs.replayed(batches[0].data_parallel_rank, seqs[-1])
        worker.stats.backfills += 1
        logger.info(
            "worker %s: index rebuilt from its replay buffer at start-up (batches %d..%d)%s",
            worker.name,
            seqs[0],
            seqs[-1],
            f"; blocks stored before batch {seqs[0]} are unknown until stored again"
            if seqs[0] > 0
            else "",
        )

    def _spawn_central(self) -> None:
        assert self._central is not None
        self._spawn(self._read(self._central, None), "kv-events central")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _resolve_topic(self, topic: bytes) -> _Worker | None:
        worker = self._topics.get(topic)
        if worker is not None:
            return worker
        parts = topic.split(b"@", _TOPIC_PARTS - 1)
        if len(parts) == _TOPIC_PARTS:
            source = self._sources.get(parts[1].decode(errors="replace"))
            if source is not None and source.socket is None:
                self._topics[topic] = source.worker
                return source.worker
        self.stats.unknown_topic += 1
        suppressed = self._throttles["unknown_topic"].allow()
        if suppressed is not None:
            logger.warning(
                "dropping KV events with topic %r: it names no registered worker (expected "
                "<prefix>@<worker>@<model> with <worker> added by add_source(worker)); "
                "%d similar messages suppressed",
                topic,
                suppressed,
            )
        return None

    async def _read(self, socket: zmq.asyncio.Socket, worker: _Worker | None) -> None:
        """Reader of one socket: `worker` for a connected source, None for the central socket."""
        # The asyncio socket is only used to wait; messages are read through a plain socket
        # sharing its handle, which costs no future per message.
        plain: zmq.Socket[bytes] = zmq.Socket.shadow(socket.underlying)
        max_drain = self._config.max_drain
        while True:
            try:
                await socket.poll()  # POLLIN, no timeout
            except zmq.ZMQError as exc:
                if exc.errno in (zmq.ETERM, zmq.ENOTSOCK):
                    return
                self._internal_error("waiting for KV events failed")
                await asyncio.sleep(_RECV_ERROR_BACKOFF_S)
                continue
            for _ in range(max_drain):
                try:
                    frames = _recv_message(plain)
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:
                    if exc.errno in (zmq.ETERM, zmq.ENOTSOCK):
                        return
                    self._internal_error("receiving KV events failed")
                    break
                try:
                    gap = self._handle(frames, worker)
                    if gap is not None:
                        await gap
                except Exception:
                    self._internal_error("handling a KV event message failed")
            else:
                # The burst goes on: let other tasks run before the rest of it.
                await asyncio.sleep(0)

    def _internal_error(self, what: str) -> None:
        self.stats.internal_errors += 1
        suppressed = self._throttles["internal"].allow()
        if suppressed is not None:
            logger.exception("%s (%d similar errors suppressed)", what, suppressed)

    # -- internals: one message ------------------------------------------------------------------

    def _handle(
        self, frames: list[bytes], source: _Worker | None
    ) -> Coroutine[Any, Any, None] | None:
        """Apply one message; returns a coroutine to await only when a gap needs filling.

        Synchronous on purpose: the common path then costs no coroutine per message.
        """
        if len(frames) != _FRAMES_PER_MESSAGE:
            self._malformed(source, f"expected {_FRAMES_PER_MESSAGE} frames, got {len(frames)}")
            return None
        worker = source if source is not None else self._resolve_topic(frames[0])
        if worker is None:
            return None
        try:
            batch = decode_batch(parse_seq(frames[1]), frames[2], worker.on_unknown_event)
        except MalformedEvent as exc:
            self._malformed(worker, str(exc))
            return None
        verdict, previous = worker.seqs.observe(batch.data_parallel_rank, batch.seq)
        if verdict is SeqVerdict.NEXT or verdict is SeqVerdict.FIRST:
            self._apply(worker, batch)
        elif verdict is SeqVerdict.JOINED:
            # Joining a stream already under way (kvgate restarted, or the worker is older than
            # this subscriber): what the worker cached before is in its replay buffer.
            return self._backfill(worker, batch)
        elif verdict is SeqVerdict.RESTARTED:
            logger.warning(
                "worker %s restarted its KV event stream (seq %d after %d, dp rank %s): "
                "dropping its blocks and following the new stream",
                worker.name,
                batch.seq,
                previous,
                batch.data_parallel_rank,
            )
            self._reset(worker)
            self._apply(worker, batch)
        elif verdict is SeqVerdict.GAP:
            worker.stats.gaps += 1
            return self._fill_gap(worker, previous + 1, batch)
        return None

    async def _fill_gap(self, worker: _Worker, first_missing: int, batch: EventBatch) -> None:
        replayed: list[EventBatch] | None = None
        reason = "no replay endpoint is configured for it"
        if worker.replay_endpoint is not None:
            replayed, reason = await self._replay(worker, batch, first_missing)
            if not worker.active:
                return
        if replayed is not None:
            worker.stats.replays_ok += 1
            for missing in replayed:
                self._apply(worker, missing)
        else:
            if worker.replay_endpoint is not None:
                worker.stats.replays_failed += 1
            logger.warning(
                "worker %s: KV events %d..%d were lost and %s; dropping its blocks and "
                "resuming at seq %d",
                worker.name,
                first_missing,
                batch.seq - 1,
                reason,
                batch.seq,
            )
            self._reset(worker)
        self._apply(worker, batch)

    async def _backfill(self, worker: _Worker, batch: EventBatch) -> None:
        reason = "no replay endpoint is configured for it"
        replayed: list[EventBatch] | None = None
        if worker.replay_endpoint is not None:
            replayed, reason = await self._replay(worker, batch, 0, allow_late_start=True)
            if not worker.active:
                return
        if replayed:
            worker.stats.backfills += 1
            for earlier in replayed:
                self._apply(worker, earlier)
            first = replayed[0].seq
            logger.info(
                "worker %s: index rebuilt from its replay buffer (batches %d..%d)%s",
                worker.name,
                first,
                batch.seq - 1,
                f"; blocks stored before batch {first} are unknown until stored again"
                if first > 0
                else "",
            )
        else:
            worker.stats.cold_starts += 1
            logger.warning(
                "worker %s: joining its KV event stream at seq %d and %s: its index starts "
                "empty, and blocks it cached earlier are unknown until stored again",
                worker.name,
                batch.seq,
                reason,
            )
        self._apply(worker, batch)

    async def _replay(
        self,
        worker: _Worker,
        batch: EventBatch,
        first_missing: int,
        *,
        allow_late_start: bool = False,
    ) -> tuple[list[EventBatch] | None, str]:
        """The missing batches, in order, or None and why they could not all be had.

        ``allow_late_start`` (see `replay_shortfall`) is safe for a backfill: missing the oldest
        batches only loses blocks, never leaves stale ones, as a removal is always later than
        the store it undoes."""
        assert worker.replay_endpoint is not None
        try:
            endpoint = offset_endpoint_port(worker.replay_endpoint, batch.data_parallel_rank)
            payloads = await fetch_replay(
                self._context,
                endpoint,
                first_missing,
                stop_before=batch.seq,
                timeout_s=self._config.replay_timeout_s,
            )
        except (ReplayError, ValueError) as exc:
            return None, f"the replay failed ({exc})"
        shortfall = replay_shortfall(
            [seq for seq, _ in payloads],
            first_missing,
            batch.seq,
            allow_late_start=allow_late_start,
        )
        if shortfall is not None:
            return None, shortfall
        replayed: list[EventBatch] = []
        for seq, payload in payloads:
            try:
                missing = decode_batch(seq, payload, worker.on_unknown_event)
            except MalformedEvent as exc:
                return None, f"replayed batch {seq} is malformed ({exc})"
            if missing.data_parallel_rank != batch.data_parallel_rank:
                return None, f"replayed batch {seq} belongs to another data-parallel rank"
            replayed.append(missing)
        return replayed, ""

    def _apply(self, worker: _Worker, batch: EventBatch) -> None:
        stats = worker.stats
        stats.batches += 1
        stats.events += len(batch.events)
        sink = self._sink
        name = worker.name
        block_size = self._config.block_size
        for event in batch.events:
            if type(event) is BlockStored:
                if event.block_size != block_size:
                    self._refuse_block_size(worker, event.block_size)
                    continue
                stats.blocks_stored += len(event.block_hashes)
            elif type(event) is BlockRemoved:
                stats.blocks_removed += len(event.block_hashes)
            try:
                sink.apply_event(name, event)
            except Exception:
                self._sink_failed(worker, "apply_event")

    def _reset(self, worker: _Worker) -> None:
        worker.stats.resets += 1
        try:
            self._sink.clear_worker(worker.name)
        except Exception:
            self._sink_failed(worker, "clear_worker")

    def _refuse_block_size(self, worker: _Worker, reported: int) -> None:
        worker.stats.block_size_mismatch += 1
        if reported in worker.mismatch_reported:
            return
        worker.mismatch_reported.add(reported)
        expected = self._config.block_size
        logger.error(
            "worker %s reports block_size=%d but kvgate is configured with %d: set %s=%d "
            "(or the engine's --block-size to %d); its BlockStored events are ignored until then",
            worker.name,
            reported,
            expected,
            self._config.block_size_setting,
            reported,
            expected,
        )

    def _sink_failed(self, worker: _Worker, method: str) -> None:
        worker.stats.sink_errors += 1
        suppressed = self._throttles["sink"].allow()
        if suppressed is not None:
            logger.exception(
                "the event sink's %s failed for worker %s; continuing (%d similar errors "
                "suppressed)",
                method,
                worker.name,
                suppressed,
            )

    def _malformed(self, worker: _Worker | None, reason: str) -> None:
        if worker is None:
            self.stats.malformed += 1
        else:
            worker.stats.malformed += 1
        suppressed = self._throttles["malformed"].allow()
        if suppressed is not None:
            logger.warning(
                "dropping a malformed KV event message from %s: %s (%d similar messages "
                "suppressed)",
                "an unknown publisher" if worker is None else f"worker {worker.name}",
                reason,
                suppressed,
            )
