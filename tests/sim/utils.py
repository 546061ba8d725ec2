"""Shared by the sim tests: the model name, the worker factory type, SSE reading, KV event
subscription, the line a fleet prints per worker."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import zmq
import zmq.asyncio

from kvgate.sim.http import SimWorker
from tests.sim.msgpack_reader import unpack

WORKER_LINE = re.compile(
    r"worker (\d+) url=(http://127\.0\.0\.1:\d+) events=(tcp://127\.0\.0\.1:\d+) "
    r"replay=(tcp://127\.0\.0\.1:\d+) instance_id=(\d+) topic=(kv@127\.0\.0\.1:\d+@\S+)"
)

MODEL = "Qwen/Qwen3-0.6B"

WorkerFactory = Callable[..., AbstractAsyncContextManager[SimWorker]]
"""The ``make_worker`` fixture: ``async with make_worker(**overrides) as worker``."""


@dataclass
class StreamedReply:
    status: int
    headers: dict[str, str]
    chunks: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    chunk_times: list[float] = field(default_factory=list)
    """Monotonic arrival time of each data event."""
    sent_at: float = 0.0

    @property
    def text(self) -> str:
        out = []
        for chunk in self.chunks:
            for choice in chunk["choices"]:
                out.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
        return "".join(out)

    @property
    def ttft(self) -> float:
        """Seconds from sending to the first chunk carrying generated text."""
        for at, chunk in zip(self.chunk_times, self.chunks, strict=True):
            for choice in chunk["choices"]:
                if choice.get("text") or choice.get("delta", {}).get("content"):
                    return at - self.sent_at
        raise AssertionError("no text in the stream")

    @property
    def usage(self) -> dict[str, Any]:
        [last] = [c for c in self.chunks if c.get("usage")]
        return last["usage"]  # type: ignore[no-any-return]


async def stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> StreamedReply:
    sent = time.monotonic()
    async with session.post(url, json={**body, "stream": True}) as resp:
        reply = StreamedReply(resp.status, dict(resp.headers), sent_at=sent)
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line:
                continue
            assert line.startswith("data: "), line
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                reply.done = True
                continue
            assert not reply.done, "data after [DONE]"
            reply.chunks.append(json.loads(payload))
            reply.chunk_times.append(time.monotonic())
    return reply


class Subscriber:
    """A SUB socket on a worker's event endpoint; frames are parsed with the test's own msgpack
    reader."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self._socket = zmq.asyncio.Context(context).socket(zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, 100_000)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.connect(endpoint)

    async def ready(self) -> None:
        # A PUB drops messages until the subscription reaches it; on loopback that takes
        # well under this.
        await asyncio.sleep(0.3)

    async def recv(self, timeout: float = 5.0) -> tuple[bytes, int, Any]:
        topic, seq, payload = await asyncio.wait_for(self._socket.recv_multipart(), timeout)
        assert len(seq) == 8
        return topic, int.from_bytes(seq, "big"), unpack(payload)

    async def drain(self, quiet: float = 0.3) -> list[tuple[bytes, int, Any]]:
        """Every message until none arrives for ``quiet`` seconds."""
        out = []
        while True:
            try:
                out.append(await self.recv(timeout=quiet))
            except TimeoutError:
                return out

    def close(self) -> None:
        self._socket.close(linger=0)


def events_of(batch: Any) -> list[dict[str, Any]]:
    """Events of a decoded batch ``[ts, events, dp_rank]`` in map form, whichever layout."""
    assert isinstance(batch, list) and len(batch) == 3
    ts, events, _rank = batch
    assert isinstance(ts, float)
    out = []
    fields = {
        "BlockStored": (
            "block_hashes",
            "parent_block_hash",
            "token_ids",
            "block_size",
            "lora_id",
            "medium",
            "lora_name",
            "extra_keys",
        ),
        "BlockRemoved": ("block_hashes", "medium"),
        "AllBlocksCleared": (),
    }
    for event in events:
        if isinstance(event, dict):
            out.append(event)
        else:
            tag, *values = event
            # Trailing optional fields (extra_keys) may be absent, as from older producers.
            names = fields[tag][: len(values)]
            out.append({"type": tag, **dict(zip(names, values, strict=True))})
    return out
