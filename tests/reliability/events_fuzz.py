"""Fuzz targets: KV-event payloads, decoded and applied to the prefix index.

A case is a short stream of one engine's messages (1-6), each a ZMQ message ``[topic, seq,
payload]``. Payloads are mostly well-formed batches in vLLM's map layout or the older tagged-array
layout (or both in one batch), with damage drawn from the bytes: wrong block sizes, token counts
that do not match the blocks, token ids outside u32, hashes as integers of any size or as byte
strings (empty too), parents that are unknown, wrong field types, unknown event types, extra
fields, huge batches (up to 2,000 events, or one event of 4,096 blocks); and otherwise garbage:
random bytes, cut msgpack, any msgpack value, nesting deep enough to exhaust recursion.

`DecodeTarget` (fast, in process): every payload either decodes or raises `MalformedEvent`
(nothing else); what decodes is applied to a real `PrefixIndex` as the subscriber does, without an
exception; the index stays consistent, and when the case's workers leave it is empty again.

`SocketTarget` (slower, real sockets): the same messages, plus damaged frames (wrong frame
count, a seq frame of the wrong length, sequence gaps and restarts), published over TCP to a real
`KvEventSubscriber` feeding the index; afterwards the subscriber counted no internal or sink error
and still applies a good batch.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from kvgate.events.decode import MalformedEvent, decode_batch
from kvgate.events.subscriber import KvEventSubscriber, SubscriberConfig
from kvgate.events.types import AllBlocksCleared, BlockRemoved, BlockStored, EngineHash, KvEvent
from kvgate.index.prefix_index import PrefixIndex
from tests.events.publisher import TestPublisher
from tests.reliability.choices import Choices

BLOCK_SIZE = 16
WORKERS = ("10.0.0.1:8000", "10.0.0.2:8000")
_encode = msgspec.msgpack.encode
MARKER_HASH = 0x5EED_F00D
MARKER_WORKER = "10.0.0.99:8000"


@dataclass
class Message:
    worker: str
    frames: list[bytes]


class _Engine:
    """What one simulated publisher remembers within a case: hashes it stored (for parents and
    removals) and its sequence number."""

    def __init__(self) -> None:
        self.hashes: list[int] = []
        self.seq = 0


def _wire_int(c: Choices) -> int:
    """Any integer msgpack can carry (int64 or uint64; nothing else can be on the wire)."""
    return c.any_int() % (2**64 + 2**63) - 2**63


def _hash(c: Choices, engine: _Engine) -> Any:
    kind = c.integer(0, 9)
    if kind <= 5:
        value = c.integer(1, 2**64 - 1) if c.percent(70) else _wire_int(c)
        if c.percent(5):
            return value  # not remembered: a removal of it is unknown
        engine.hashes.append(value)
        return value
    if kind <= 7 and engine.hashes:
        return c.pick(engine.hashes)
    if kind == 8:
        return c.raw(40)  # vLLM sends 32-byte digests; empty and short ones are damage
    return _wire_int(c)


def _tokens(c: Choices, blocks: int, block_size: int) -> list[int]:
    count = blocks * max(block_size, 0) if not c.percent(8) else c.integer(0, 80)
    count = min(count, 70_000)
    base = c.integer(0, 80_000)
    tokens = list(range(base, base + count))  # ids within Qwen3's vocabulary
    if tokens and c.percent(5):  # one id outside the vocabulary, maybe outside u32
        tokens[c.integer(0, count - 1)] = _wire_int(c)
    return tokens


def _odd_value(c: Choices) -> Any:
    return c.pick([None, True, 1.5, "x", b"\x00", [], {}, [1, 2], {"a": 1}, -1, 2**64 - 1])


def _stored(c: Choices, engine: _Engine, layout: str) -> Any:
    huge = c.percent(1)
    blocks = c.integer(256, 4096) if huge else c.integer(0, 8)
    block_size = BLOCK_SIZE if not c.percent(8) else c.pick([0, -1, 1, 8, 32, 2**40, _wire_int(c)])
    fields: dict[str, Any] = {
        "block_hashes": [_hash(c, engine) for _ in range(blocks)],
        "parent_block_hash": None
        if c.percent(50) or not engine.hashes
        else (c.pick(engine.hashes) if c.percent(80) else _hash(c, engine)),
        "token_ids": _tokens(c, blocks, block_size if isinstance(block_size, int) else 0),
        "block_size": block_size,
        "lora_id": None if c.percent(90) else _odd_value(c),
        "medium": c.pick([None, "GPU", "GPU", "cpu", "CPU_PINNED", ""]) if c.percent(98) else 7,
        "lora_name": None if c.percent(85) else c.pick(["adapter-a", "", 3, c.text(10)]),
    }
    if c.percent(3):  # one field of the wrong type
        fields[c.pick(list(fields))] = _odd_value(c)
    if c.percent(2):
        del fields[c.pick(list(fields))]
    return _layout(c, "BlockStored", fields, layout)


def _removed(c: Choices, engine: _Engine, layout: str) -> Any:
    count = c.integer(0, 6)
    hashes = [c.pick(engine.hashes) if engine.hashes and c.percent(80) else _hash(c, engine)
              for _ in range(count)]  # fmt: skip
    fields: dict[str, Any] = {"block_hashes": hashes, "medium": c.pick([None, "GPU", "cpu"])}
    if c.percent(5):
        fields["block_hashes"] = _odd_value(c)
    return _layout(c, "BlockRemoved", fields, layout)


def _layout(c: Choices, tag: str, fields: dict[str, Any], layout: str) -> Any:
    if layout == "map":
        event = {"type": tag, **fields}
        if c.percent(5):
            event["future_field"] = _odd_value(c)
        return event
    event_list: list[Any] = [tag, *fields.values()]
    if c.percent(5):
        event_list.append(_odd_value(c))  # a later vLLM's extra field
    if c.percent(5):
        event_list = event_list[: c.integer(1, len(event_list))]
    return event_list


def _event(c: Choices, engine: _Engine, layout: str) -> Any:
    kind = c.integer(0, 39)
    if kind <= 27:
        return _stored(c, engine, layout)
    if kind <= 35:
        return _removed(c, engine, layout)
    if kind <= 37:
        return {"type": "AllBlocksCleared"} if layout == "map" else ["AllBlocksCleared"]
    if kind == 38:  # an event type this decoder does not know
        tag = c.pick(["BlockUpdated", "", "blockstored", "KVCacheEvent"])
        return {"type": tag, "x": 1} if layout == "map" else [tag, 1, 2]
    return _odd_value(c)


def _huge(c: Choices, engine: _Engine, layout: str) -> list[Any]:
    """500-2,000 one-block stores chained on each other (an engine's busiest step)."""
    count = c.integer(500, 2000)
    first = c.integer(1, 2**62)
    parent = c.pick(engine.hashes) if engine.hashes and c.boolean() else None
    events: list[Any] = []
    for i in range(count):
        fields = {
            "block_hashes": [first + i],
            "parent_block_hash": parent,
            "token_ids": [(first + i * BLOCK_SIZE + t) % 151_936 for t in range(BLOCK_SIZE)],
            "block_size": BLOCK_SIZE,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,
        }
        events.append({"type": "BlockStored", **fields} if layout != "array" else
                      ["BlockStored", *fields.values()])  # fmt: skip
        parent = first + i
    engine.hashes.extend(range(first, first + count, 97))
    return events


def _msgpack_value(c: Choices, depth: int = 0) -> Any:
    kind = c.integer(0, 8 if depth < 4 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return _wire_int(c)
    if kind == 2:
        return c.any_float()
    if kind == 3:
        return c.text(10)
    if kind == 4:
        return c.raw(10)
    if kind == 5:
        return msgspec.msgpack.Ext(c.integer(-128, 127), c.raw(6))
    if kind in (6, 7):
        return [_msgpack_value(c, depth + 1) for _ in range(c.integer(0, 4))]
    keys = [None, 0, -1, "type", "block_hashes", "x", 1.5]
    return {c.pick(keys): _msgpack_value(c, depth + 1) for _ in range(c.integer(0, 3))}


def _encodable(value: Any) -> bytes:
    try:
        return _encode(value)
    except (OverflowError, TypeError, ValueError):
        return b"\xc0"  # nil: a valid msgpack value that is no batch


def payload(c: Choices, engine: _Engine) -> bytes:
    kind = c.integer(0, 19)
    if kind <= 13:  # a batch, maybe damaged
        layout = c.pick(["map", "array", "mixed"])
        if c.percent(1):
            events = _huge(c, engine, layout)
        else:
            events = [
                _event(c, engine, c.pick(["map", "array"]) if layout == "mixed" else layout)
                for _ in range(c.integer(0, 5))
            ]
        ts = c.pick([1.7e9, 0, -1.0, "now", None, 2**63]) if c.percent(5) else 1.7e9
        batch: list[Any] = [ts, events]
        if c.percent(80):
            batch.append(c.pick([None, 0, 0, 1, 3, -1, 2**63]) if c.percent(97) else "rank")
        if c.percent(3):
            batch.append("trailing")
        data = _encodable(batch)
        if c.percent(2):  # cut short
            data = data[: c.integer(0, len(data))]
        return data
    if kind <= 15:
        return c.raw(200)
    if kind <= 17:
        return _encodable(_msgpack_value(c))
    if kind == 18:  # nesting past any recursion limit
        depth = c.integer(1, 200_000)
        return b"\x91" * depth + b"\xc0"
    return b"\x93" + _encodable(1.0) + b"\xdc\xff\xff"  # claims 65,535 events, has none


def messages(c: Choices, *, damage_frames: bool = False) -> list[Message]:
    engines = {w: _Engine() for w in WORKERS}
    out: list[Message] = []
    for _ in range(c.integer(1, 6)):
        worker = WORKERS[0] if c.percent(70) else WORKERS[1]
        engine = engines[worker]
        data = payload(c, engine)
        seq = engine.seq
        if damage_frames and c.percent(15):
            seq = c.pick([seq + c.integer(2, 5), max(seq - 1, 0), 0, 2**63 - 1])
        engine.seq = seq + 1
        seq_frame = seq.to_bytes(8, "big")
        frames = [f"kv@{worker}@m".encode(), seq_frame, data]
        if damage_frames and c.percent(5):
            frames = c.pick([frames[:2], [*frames, b"x"], [data], [frames[0], b"\x00" * 7, data]])
        out.append(Message(worker, frames))
    return out


class DecodeTarget:
    """Decode and apply in process; the index must end consistent and, emptied, empty."""

    name = "kv-events"

    def __init__(self) -> None:
        self.outcomes = {"batches": 0, "malformed": 0, "events": 0, "blocks_indexed": 0}

    def __call__(self, data: bytes) -> None:
        index = PrefixIndex(BLOCK_SIZE)
        for message in messages(Choices(data)):
            seq = int.from_bytes(message.frames[1], "big")
            _decode_and_apply(index, message.worker, seq, message.frames[2], self.outcomes)
        _check_emptied(index, self.outcomes)


class RawDecodeTarget:
    """The bytes are one payload: for libFuzzer to mutate real msgpack (see `sample_payloads`)."""

    name = "kv-events-raw"

    def __init__(self) -> None:
        self.outcomes = {"batches": 0, "malformed": 0, "events": 0, "blocks_indexed": 0}

    def __call__(self, data: bytes) -> None:
        index = PrefixIndex(BLOCK_SIZE)
        _decode_and_apply(index, WORKERS[0], 0, data, self.outcomes)
        _check_emptied(index, self.outcomes)


def sample_payloads() -> list[bytes]:
    """Well-formed batches in both layouts (the raw target's starting corpus)."""
    out = []
    for layout in ("map", "array"):
        engine = _Engine()
        stored = {"block_hashes": [11, 12], "parent_block_hash": None,
                  "token_ids": list(range(2 * BLOCK_SIZE)), "block_size": BLOCK_SIZE,
                  "lora_id": None, "medium": "GPU", "lora_name": None}  # fmt: skip
        digest = b"\xaa" * 24 + (13).to_bytes(8, "big")  # vLLM's bytes hashes
        child = {**stored, "block_hashes": [digest], "parent_block_hash": 12,
                 "token_ids": list(range(100, 100 + BLOCK_SIZE))}  # fmt: skip
        removed = {"block_hashes": [12], "medium": "GPU"}
        events = [
            _layout(Choices(b""), "BlockStored", stored, layout),
            _layout(Choices(b""), "BlockStored", child, layout),
            _layout(Choices(b""), "BlockRemoved", removed, layout),
            {"type": "AllBlocksCleared"} if layout == "map" else ["AllBlocksCleared"],
        ]
        for end in range(1, len(events) + 1):
            out.append(_encode([1.7e9, events[:end], 0]))
        out.append(_encode([1.7e9, _huge(Choices(b"\x01" * 16), engine, layout)[:50]]))
    return out


def _decode_and_apply(
    index: PrefixIndex, worker: str, seq: int, payload: bytes, outcomes: dict[str, int]
) -> None:
    """What the subscriber does with one payload, minus the sequence tracking."""
    try:
        batch = decode_batch(seq, payload, lambda _tag: None)
    except MalformedEvent:
        outcomes["malformed"] += 1
        return
    outcomes["batches"] += 1
    for event in batch.events:
        _check_typed(event)
        outcomes["events"] += 1
        if isinstance(event, BlockStored) and event.block_size != BLOCK_SIZE:
            continue  # the subscriber refuses it (block-size mismatch)
        index.apply_event(worker, event)
    _check_consistent(index)


def _check_emptied(index: PrefixIndex, outcomes: dict[str, int]) -> None:
    outcomes["blocks_indexed"] += index.entries
    for worker in index.workers():
        index.remove_worker(worker)
    assert index.entries == 0 and index.num_blocks == 0, "index not empty after removal"


def _check_typed(event: KvEvent) -> None:
    if isinstance(event, BlockStored):
        assert all(type(h) is int for h in event.block_hashes), event.block_hashes
        assert event.parent_block_hash is None or type(event.parent_block_hash) is int
        assert type(event.token_ids) is list and type(event.block_size) is int
    elif isinstance(event, BlockRemoved):
        assert all(type(h) is int for h in event.block_hashes), event.block_hashes
    else:
        assert isinstance(event, AllBlocksCleared), event


def _check_consistent(index: PrefixIndex) -> None:
    sizes = index.sizes()
    assert index.entries == sum(sizes.values()) >= 0, (index.entries, sizes)
    assert index.num_blocks <= index.entries, (index.num_blocks, index.entries)


class SocketTarget:
    """The messages over TCP to a real subscriber on its own event loop (use as a context)."""

    name = "kv-events-socket"

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.index = PrefixIndex(BLOCK_SIZE)
        self.marks = 0
        self.marker_seq = 0
        self.outcomes = {"messages": 0}

    def __enter__(self) -> SocketTarget:
        self.loop.run_until_complete(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.run_until_complete(self._stop())
        self.loop.close()

    async def _start(self) -> None:
        self.context = zmq.asyncio.Context()
        self.subscriber = KvEventSubscriber(
            _MarkingSink(self), SubscriberConfig(block_size=BLOCK_SIZE), context=self.context
        )
        central = self.subscriber.bind("tcp://127.0.0.1:*", subscribe=b"kv@")
        for worker in (*WORKERS, MARKER_WORKER):
            self.subscriber.add_source(worker)
        await self.subscriber.start()
        self.publisher = TestPublisher(self.context, connect=central)
        await self._flush()

    async def _stop(self) -> None:
        await self.publisher.aclose()
        await self.subscriber.aclose()
        self.context.destroy(linger=0)

    async def _flush(self, timeout_s: float = 10.0) -> None:
        """Send a marker batch after the case and wait until the sink got it: ZMQ keeps one
        publisher's messages in order, so everything before it was handled."""
        wanted = self.marks + 1
        marker = _encode([1.7e9, [{"type": "BlockRemoved", "block_hashes": [MARKER_HASH]}]])
        async with asyncio.timeout(timeout_s):
            while self.marks < wanted:
                # The first markers may go before the connection is up (PUB drops them).
                seq, self.marker_seq = self.marker_seq, self.marker_seq + 1
                self.publisher.send_frames(
                    [f"kv@{MARKER_WORKER}@m".encode(), seq.to_bytes(8, "big"), marker]
                )
                # Connected, a marker arrives within milliseconds; until then, resend often.
                for _ in range(1000 if self.marker_seq > 1 else 20):
                    if self.marks >= wanted:
                        return
                    await asyncio.sleep(0.001 if self.marker_seq > 1 else 0.01)

    def __call__(self, data: bytes) -> None:
        self.loop.run_until_complete(self._case(data))

    async def _case(self, data: bytes) -> None:
        for message in messages(Choices(data), damage_frames=True):
            self.publisher.send_frames(message.frames)
            self.outcomes["messages"] += 1
        await self._flush()
        stats = self.subscriber.stats
        assert stats.internal_errors == 0, "the subscriber's reader caught an exception"
        total = stats.total()
        assert total.sink_errors == 0, "applying a decoded event to the index raised"
        _check_consistent(self.index)
        self.outcomes.update(
            batches=total.batches - self.marks,
            malformed=total.malformed + stats.malformed,
            gaps=total.gaps,
            resets=total.resets,
            block_size_mismatch=total.block_size_mismatch,
        )


class _MarkingSink:
    def __init__(self, target: SocketTarget) -> None:
        self.target = target

    def apply_event(self, worker: str, event: KvEvent) -> None:
        if isinstance(event, BlockRemoved) and event.block_hashes == [EngineHash(MARKER_HASH)]:
            self.target.marks += 1
            return
        self.target.index.apply_event(worker, event)

    def clear_worker(self, worker: str) -> None:
        self.target.index.clear_worker(worker)
