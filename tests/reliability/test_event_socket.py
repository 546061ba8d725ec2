"""Bytes that are not ZMQ on a worker's event port (found by the garbage drill): libzmq may take
random bytes for a ZMTP 1.0 peer, and the protocol error that follows ends the SUB socket's
session for good. It never connects again, so the picker would never hear that worker's events
again, silently, until it restarts or the worker leaves and rejoins. Any peer on that port can
cause it: a port briefly reused by another process while the engine restarts, a health checker,
an endpoints file that names an HTTP port."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest
import zmq.asyncio

from kvgate.events.subscriber import KvEventSubscriber, SubscriberConfig
from kvgate.gateway.local import free_port
from kvgate.index.prefix_index import PrefixIndex
from tests.events.publisher import TestPublisher, stored

pytestmark = pytest.mark.slow


async def garbage_server(port: int, rng: random.Random, seconds: float) -> int:
    """Random bytes to whoever connects to ``port``, for ``seconds``; returns the connections."""
    connections = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.write(rng.randbytes(rng.randrange(1, 4096)))
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", port, reuse_address=True)
    await asyncio.sleep(seconds)
    server.close()
    await server.wait_closed()
    return connections


async def test_the_subscription_outlives_a_peer_that_speaks_no_zmq() -> None:
    context = zmq.asyncio.Context()
    index = PrefixIndex(4)
    port = free_port()
    subscriber = KvEventSubscriber(index, SubscriberConfig(block_size=4), context=context)
    try:
        subscriber.add_source("w", f"tcp://127.0.0.1:{port}")
        await subscriber.start()
        # Seed 1: the bytes that, in this libzmq (4.3.5), pass for a ZMTP 1.0 greeting.
        assert await garbage_server(port, random.Random(1), seconds=2.0) >= 1
        # The engine is back on its port.
        async with TestPublisher(context, bind=f"tcp://127.0.0.1:{port}") as publisher:
            await publisher.wait_subscribed(timeout=10.0)
            publisher.publish([stored([1], block_size=4)])
            async with asyncio.timeout(5.0):
                while index.size("w") == 0:
                    await asyncio.sleep(0.05)
        # Heard again because the dead session was noticed and the endpoint connected again.
        assert subscriber.stats.workers["w"].reconnects >= 1
    finally:
        await subscriber.aclose()
        context.destroy(linger=0)
