"""The subscriber against vLLM's own `ZmqEventPublisher` and msgspec structs (vllm 0.33.0).

Skipped, with the command to fix it, when the vLLM wheel is not available (see vllm_publisher.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import types
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import zmq
import zmq.asyncio

from kvgate.events.decode import decode_batch
from kvgate.events.subscriber import KvEventSubscriber, SubscriberConfig
from kvgate.events.types import AllBlocksCleared, KvEvent
from tests.events.publisher import last_endpoint, removed, stored
from tests.events.utils import RecordingSink, wait_until
from tests.events.vllm_publisher import load_kv_events

W1 = "127.0.0.1:8000"
TOPIC = f"kv@{W1}@Qwen/Qwen3-0.6B"
CONFIG = SubscriberConfig(block_size=16, replay_timeout_s=2.0, warn_interval_s=0.0)
DIGEST = bytes(range(100, 132))


@pytest.fixture(scope="module")
def kv_events() -> types.ModuleType:
    return load_kv_events()


@pytest.fixture
def vllm_publisher(kv_events: types.ModuleType) -> Iterator[Any]:
    publisher = kv_events.ZmqEventPublisher(
        data_parallel_rank=0,
        endpoint="tcp://127.0.0.1:*",
        replay_endpoint="tcp://127.0.0.1:*",
        topic=TOPIC,
    )
    yield publisher
    publisher.shutdown()


def endpoints(publisher: Any) -> tuple[str, str]:
    """The PUB and replay endpoints the publisher actually bound (it keeps the wildcard form)."""
    return last_endpoint(publisher._pub), last_endpoint(publisher._replay)


def vllm_events(kv_events: types.ModuleType, index: int) -> list[Any]:
    """vLLM 0.33 events, including the newer optional fields and a bytes hash."""
    return [
        kv_events.BlockStored(
            block_hashes=[10 * index + 1, DIGEST],
            parent_block_hash=None if index == 0 else 10 * index - 9,
            token_ids=list(range(32)),
            block_size=16,
            lora_id=None,
            medium="GPU",
            lora_name=None,
            group_idx=0,
            kv_cache_spec_kind="full_attention",
        ),
        kv_events.BlockRemoved(block_hashes=[10 * index + 1], medium="GPU", group_idx=0),
    ]


def expected_events(index: int) -> list[KvEvent]:
    digest_id = int.from_bytes(DIGEST[-8:], "big")
    return [
        stored(
            [10 * index + 1, digest_id],
            parent=None if index == 0 else 10 * index - 9,
            tokens=list(range(32)),
            block_size=16,
        ),
        removed([10 * index + 1]),
    ]


def publish(kv_events: types.ModuleType, publisher: Any, events: list[Any]) -> None:
    publisher.publish(kv_events.KVEventBatch(ts=time.time(), events=events))


async def warm_up(kv_events: types.ModuleType, publisher: Any, sink: RecordingSink) -> int:
    """Publish AllBlocksCleared until one arrives (PUB/SUB has no handshake); return how many."""
    published = 0
    async with asyncio.timeout(5):
        while not sink.calls:
            publish(kv_events, publisher, [kv_events.AllBlocksCleared()])
            published += 1
            await asyncio.sleep(0.02)
    # Let the batches still in flight arrive, then forget the warm-up.
    await asyncio.sleep(0.1)
    sink.calls.clear()
    return published


@pytest.fixture
async def stack() -> AsyncIterator[contextlib.AsyncExitStack]:
    async with contextlib.AsyncExitStack() as exit_stack:
        yield exit_stack


def test_vllm_payload_decodes(kv_events: types.ModuleType) -> None:
    import msgspec

    payload = msgspec.msgpack.encode(
        kv_events.KVEventBatch(
            ts=1.5,
            events=[*vllm_events(kv_events, 1), kv_events.AllBlocksCleared()],
            data_parallel_rank=2,
        )
    )
    batch = decode_batch(3, payload)
    assert (batch.seq, batch.ts, batch.data_parallel_rank) == (3, 1.5, 2)
    assert batch.events == [*expected_events(1), AllBlocksCleared()]


async def test_subscriber_connected_to_the_vllm_publisher(
    stack: contextlib.AsyncExitStack,
    zmq_ctx: zmq.asyncio.Context,
    kv_events: types.ModuleType,
    vllm_publisher: Any,
) -> None:
    sink = RecordingSink()
    sub = await stack.enter_async_context(KvEventSubscriber(sink, CONFIG, context=zmq_ctx))
    pub_endpoint, replay_endpoint = endpoints(vllm_publisher)
    sub.add_source(W1, pub_endpoint, replay_endpoint=replay_endpoint)
    await warm_up(kv_events, vllm_publisher, sink)
    for index in range(3):
        publish(kv_events, vllm_publisher, vllm_events(kv_events, index))
    await wait_until(lambda: len(sink.calls) == 6)
    assert sink.events(W1) == [e for i in range(3) for e in expected_events(i)]
    stats = sub.stats.workers[W1]
    assert (stats.gaps, stats.resets, stats.malformed, stats.unknown_events) == (0, 0, 0, 0)


async def test_central_socket_with_the_vllm_publisher_connecting(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context, kv_events: types.ModuleType
) -> None:
    sink = RecordingSink()
    sub = await stack.enter_async_context(KvEventSubscriber(sink, CONFIG, context=zmq_ctx))
    central = sub.bind("tcp://127.0.0.1:*", subscribe=b"kv@")
    sub.add_source(W1)
    # No wildcard in the endpoint: vLLM connects instead of binding.
    publisher = kv_events.ZmqEventPublisher(data_parallel_rank=0, endpoint=central, topic=TOPIC)
    stack.push_async_callback(asyncio.to_thread, publisher.shutdown)
    await warm_up(kv_events, publisher, sink)
    publish(kv_events, publisher, vllm_events(kv_events, 0))
    await wait_until(lambda: len(sink.calls) == 2)
    assert sink.events(W1) == expected_events(0)
    assert sub.stats.unknown_topic == 0


async def test_a_gap_is_filled_from_the_vllm_replay_socket(
    stack: contextlib.AsyncExitStack,
    zmq_ctx: zmq.asyncio.Context,
    kv_events: types.ModuleType,
    vllm_publisher: Any,
) -> None:
    """A relay between vLLM and the subscriber loses two batches; vLLM's ROUTER replays them."""
    pub_endpoint, replay_endpoint = endpoints(vllm_publisher)
    dropped: set[int] = set()
    relay_in = zmq_ctx.socket(zmq.SUB)
    relay_in.setsockopt(zmq.SUBSCRIBE, b"")
    relay_in.connect(pub_endpoint)
    relay_out = zmq_ctx.socket(zmq.PUB)
    relay_out.bind("tcp://127.0.0.1:*")
    for socket in (relay_in, relay_out):
        stack.callback(socket.close, 0)

    async def relay() -> None:
        while True:
            frames = await relay_in.recv_multipart()
            if int.from_bytes(frames[1], "big") not in dropped:
                await relay_out.send_multipart(frames)

    relay_task = asyncio.get_running_loop().create_task(relay())

    async def stop_relay() -> None:
        relay_task.cancel()
        await asyncio.gather(relay_task, return_exceptions=True)

    stack.push_async_callback(stop_relay)

    sink = RecordingSink()
    sub = await stack.enter_async_context(KvEventSubscriber(sink, CONFIG, context=zmq_ctx))
    sub.add_source(W1, last_endpoint(relay_out), replay_endpoint=replay_endpoint)
    first = await warm_up(kv_events, vllm_publisher, sink)
    dropped.update({first + 1, first + 2})
    for index in range(4):
        publish(kv_events, vllm_publisher, vllm_events(kv_events, index))
    await wait_until(lambda: len(sink.calls) == 8)
    assert sink.events(W1) == [e for i in range(4) for e in expected_events(i)]
    stats = sub.stats.workers[W1]
    assert (stats.gaps, stats.replays_ok, stats.replays_failed, stats.resets) == (1, 1, 0, 0)
