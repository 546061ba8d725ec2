"""A test engine publisher that speaks vLLM's KV event wire format byte for byte.

Frames ``[topic, seq (8-byte big-endian, from 0), msgpack(EventBatch)]``; batches encoded with
msgspec from plain lists and dicts (independently of `kvgate.events.decode`), events in the map
layout (vLLM 0.33) or the array layout (older vLLM, Dynamo mocker). An optional replay ROUTER
answers ``[b"", start_seq]`` with the buffered batches and the ``-1`` end marker.

The socket is an XPUB rather than a PUB: identical on the wire, but it reports subscriptions, so a
test can wait until the subscriber is listening instead of sleeping and hoping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Literal

import msgspec
import zmq
import zmq.asyncio

from kvgate.events.types import AllBlocksCleared, BlockRemoved, BlockStored, EngineHash, KvEvent

Layout = Literal["map", "array", "mocker"]
HashEncoding = Literal["int", "bytes"]

END_SEQ = (-1).to_bytes(8, "big", signed=True)


def wire_hash(value: int, encoding: HashEncoding) -> int | bytes:
    if encoding == "int":
        return value
    # vLLM's bytes hashes are 32-byte digests; only the last 8 bytes identify the block for us.
    return b"\xaa" * 24 + value.to_bytes(8, "big")


def wire_event(event: KvEvent, layout: Layout, hashes: HashEncoding = "int") -> Any:
    """One event as the publisher would put it in a batch, as plain msgpack-able objects."""
    if isinstance(event, BlockStored):
        block_hashes = [wire_hash(h, hashes) for h in event.block_hashes]
        parent = (
            None if event.parent_block_hash is None else wire_hash(event.parent_block_hash, hashes)
        )
        if layout == "map":
            return {
                "type": "BlockStored",
                "block_hashes": block_hashes,
                "parent_block_hash": parent,
                "token_ids": event.token_ids,
                "block_size": event.block_size,
                "lora_id": None,
                "medium": event.medium,
                "lora_name": event.lora_name,
                "extra_keys": event.extra_keys,
            }
        fields = ["BlockStored", block_hashes, parent, event.token_ids, event.block_size]
        if layout == "array":
            fields += [None, event.medium, event.lora_name]
            if event.extra_keys is not None:
                fields.append(event.extra_keys)
        return fields
    if isinstance(event, BlockRemoved):
        block_hashes = [wire_hash(h, hashes) for h in event.block_hashes]
        if layout == "map":
            return {"type": "BlockRemoved", "block_hashes": block_hashes, "medium": event.medium}
        if layout == "array":
            return ["BlockRemoved", block_hashes, event.medium]
        return ["BlockRemoved", block_hashes]
    assert isinstance(event, AllBlocksCleared)
    return {"type": "AllBlocksCleared"} if layout == "map" else ["AllBlocksCleared"]


def encode_batch(
    events: Sequence[KvEvent],
    *,
    layout: Layout = "map",
    hashes: HashEncoding = "int",
    dp_rank: int | None = 0,
    ts: float | None = None,
) -> bytes:
    wire = [wire_event(e, layout, hashes) for e in events]
    batch: list[Any] = [time.time() if ts is None else ts, wire]
    if dp_rank is not None:
        batch.append(dp_rank)
    return msgspec.msgpack.encode(batch)


def stored(
    hashes: Sequence[int],
    *,
    parent: int | None = None,
    block_size: int = 4,
    medium: str | None = "GPU",
    lora_name: str | None = None,
    tokens: list[int] | None = None,
    first_token: int = 0,
    extra_keys: list[Any] | None = None,
) -> BlockStored:
    """A BlockStored of len(hashes) blocks; by default full blocks of predictable tokens."""
    if tokens is None:
        tokens = list(range(first_token, first_token + block_size * len(hashes)))
    return BlockStored(
        [EngineHash(h) for h in hashes],
        None if parent is None else EngineHash(parent),
        tokens,
        block_size,
        lora_name,
        medium,
        extra_keys,
    )


def removed(hashes: Sequence[int], medium: str | None = "GPU") -> BlockRemoved:
    return BlockRemoved([EngineHash(h) for h in hashes], medium)


class TestPublisher:
    """A fake engine's publisher: `publish` sends a batch and keeps it for replay."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        context: zmq.asyncio.Context,
        *,
        topic: bytes = b"",
        layout: Layout = "map",
        hashes: HashEncoding = "int",
        dp_rank: int | None = 0,
        replay: bool = False,
        replay_buffer: int = 10_000,
        connect: str | None = None,
        bind: str = "tcp://127.0.0.1:*",
        replay_bind: str = "tcp://127.0.0.1:*",
    ) -> None:
        """Bind `bind` (or connect to `connect`, an engine publishing to a central socket)."""
        self.topic = topic
        self.layout: Layout = layout
        self.hashes: HashEncoding = hashes
        self.dp_rank = dp_rank
        self.next_seq = 0
        self.replay_requests: list[int] = []
        self.replay_enabled = True  # False: requests are read but never answered
        self._buffer: list[tuple[int, bytes]] = []
        self._replay_buffer = replay_buffer
        self._subscriptions = 0
        self._subscribed = asyncio.Event()
        self._pub = context.socket(zmq.XPUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 100_000)
        self._router: zmq.asyncio.Socket | None = None
        self.replay_endpoint: str | None = None
        try:
            if connect is None:
                self._pub.bind(bind)
                self.endpoint = last_endpoint(self._pub)
            else:
                self._pub.connect(connect)
                self.endpoint = connect
            if replay:
                self._router = context.socket(zmq.ROUTER)
                self._router.setsockopt(zmq.LINGER, 0)
                self._router.bind(replay_bind)
                self.replay_endpoint = last_endpoint(self._router)
        except zmq.ZMQError:
            self._pub.close(linger=0)
            if self._router is not None:
                self._router.close(linger=0)
            raise
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch_subscriptions())]
        if replay:
            self._tasks.append(loop.create_task(self._serve_replay()))

    async def wait_subscribed(self, count: int = 1, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while self._subscriptions < count:
                self._subscribed.clear()
                await self._subscribed.wait()

    def publish(self, events: Sequence[KvEvent], *, send: bool = True) -> int:
        """Encode and send one batch; `send=False` buffers it for replay only (a lost message)."""
        payload = encode_batch(events, layout=self.layout, hashes=self.hashes, dp_rank=self.dp_rank)
        return self.publish_payload(payload, send=send)

    def publish_payload(self, payload: bytes, *, send: bool = True) -> int:
        seq = self.next_seq
        self.next_seq += 1
        self._buffer.append((seq, payload))
        del self._buffer[: -self._replay_buffer]
        if send:
            self.send_frames([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def send_frames(self, frames: Sequence[bytes]) -> None:
        self._pub.send_multipart(list(frames), flags=zmq.NOBLOCK)

    def restart(self) -> None:
        """Behave like a restarted engine: seq back to 0, replay buffer empty."""
        self.next_seq = 0
        self._buffer.clear()

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pub.close(linger=0)
        if self._router is not None:
            self._router.close(linger=0)

    async def __aenter__(self) -> TestPublisher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _watch_subscriptions(self) -> None:
        while True:
            message = await self._pub.recv()
            if message[:1] == b"\x01":
                self._subscriptions += 1
                self._subscribed.set()

    async def _serve_replay(self) -> None:
        assert self._router is not None
        while True:
            identity, empty, start = await self._router.recv_multipart()
            assert empty == b"", empty
            start_seq = int.from_bytes(start, "big")
            self.replay_requests.append(start_seq)
            if not self.replay_enabled:
                continue
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    await self._router.send_multipart(
                        [identity, b"", self.topic, seq.to_bytes(8, "big"), payload]
                    )
            await self._router.send_multipart([identity, b"", b"", END_SEQ, b""])


def last_endpoint(socket: zmq.Socket[Any]) -> str:
    """The endpoint a socket last bound, with the port the OS picked for a wildcard."""
    endpoint = socket.getsockopt(zmq.LAST_ENDPOINT)
    assert isinstance(endpoint, bytes)
    return endpoint.decode()
