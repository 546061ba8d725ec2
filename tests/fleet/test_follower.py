"""FleetFollower with a real KvEventSubscriber feeding a real PrefixIndex."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import pytest
import zmq.asyncio

from kvgate.events.subscriber import KvEventSubscriber, SubscriberConfig
from kvgate.fleet.endpoint import Endpoint, EndpointSet
from kvgate.fleet.follower import FleetFollower
from kvgate.index.prefix_index import PrefixIndex
from tests.events.publisher import TestPublisher, stored
from tests.fleet.utils import wait_until

BLOCK = 4
W1 = "10.0.0.1:8000"
W2 = "10.0.0.2:8000"


@pytest.fixture
def zmq_ctx() -> Iterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


async def subscriber(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context, index: PrefixIndex
) -> KvEventSubscriber:
    sub = KvEventSubscriber(index, SubscriberConfig(block_size=BLOCK), context=zmq_ctx)
    await stack.enter_async_context(sub)
    return sub


async def publisher(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context, **kwargs: object
) -> TestPublisher:
    return await stack.enter_async_context(TestPublisher(zmq_ctx, **kwargs))  # type: ignore[arg-type]


async def test_joining_and_leaving_endpoints_add_and_remove_sources_and_index_state(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    index = PrefixIndex(BLOCK)
    sub = await subscriber(stack, zmq_ctx, index)
    pub1, pub2 = await publisher(stack, zmq_ctx), await publisher(stack, zmq_ctx)
    endpoints = EndpointSet()
    left: list[str] = []
    FleetFollower(endpoints, sub, on_left=[index.remove_worker, left.append])

    endpoints.replace(
        [Endpoint(W1, events_endpoint=pub1.endpoint), Endpoint(W2, events_endpoint=pub2.endpoint)]
    )
    assert set(sub.stats.workers) == {W1, W2}
    await pub1.wait_subscribed()
    await pub2.wait_subscribed()
    pub1.publish([stored([1, 2])])
    pub2.publish([stored([3])])
    await wait_until(lambda: index.size(W1) == 2 and index.size(W2) == 1)

    endpoints.replace([endpoints.get(W2)])  # type: ignore[list-item]
    assert set(sub.stats.workers) == {W2}
    assert left == [W1]
    assert index.size(W1) == 0 and W1 not in index
    pub1.publish([stored([4], parent=None, first_token=100)])  # W1 keeps publishing: ignored
    pub2.publish([stored([5], first_token=200)])
    await wait_until(lambda: index.size(W2) == 2)
    await asyncio.sleep(0.05)
    assert W1 not in index


async def test_central_mode_accepts_the_topics_of_current_endpoints_only(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    index = PrefixIndex(BLOCK)
    sub = await subscriber(stack, zmq_ctx, index)
    central = sub.bind("tcp://127.0.0.1:*", subscribe=b"kv@")
    pub = await publisher(stack, zmq_ctx, connect=central, topic=f"kv@{W1}@m".encode())
    endpoints = EndpointSet()
    FleetFollower(endpoints, sub, central=True, on_left=[index.remove_worker])

    # An events endpoint on the entry is irrelevant in central mode.
    endpoints.replace([Endpoint(W1, events_endpoint="tcp://10.0.0.1:5557")])
    await pub.wait_subscribed()
    pub.publish([stored([1])])
    await wait_until(lambda: index.size(W1) == 1)

    endpoints.replace([])
    assert index.size(W1) == 0
    pub.publish([stored([2], first_token=50)])
    await wait_until(lambda: sub.stats.unknown_topic == 1)
    assert W1 not in index


async def test_endpoints_present_at_construction_are_followed(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    index = PrefixIndex(BLOCK)
    sub = await subscriber(stack, zmq_ctx, index)
    pub = await publisher(stack, zmq_ctx)
    endpoints = EndpointSet([Endpoint(W1, events_endpoint=pub.endpoint)])
    FleetFollower(endpoints, sub)
    await pub.wait_subscribed()
    pub.publish([stored([1])])
    await wait_until(lambda: index.size(W1) == 1)


async def test_a_changed_events_endpoint_resubscribes_and_drops_the_old_state(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    index = PrefixIndex(BLOCK)
    sub = await subscriber(stack, zmq_ctx, index)
    old, new = await publisher(stack, zmq_ctx), await publisher(stack, zmq_ctx)
    endpoints = EndpointSet([Endpoint(W1, events_endpoint=old.endpoint)])
    left: list[str] = []
    FleetFollower(endpoints, sub, on_left=[index.remove_worker, left.append])
    await old.wait_subscribed()
    old.publish([stored([1])])
    await wait_until(lambda: index.size(W1) == 1)

    endpoints.replace([Endpoint(W1, events_endpoint=new.endpoint)])
    assert left == [W1]
    assert index.size(W1) == 0
    await new.wait_subscribed()
    new.publish([stored([7, 8])])
    await wait_until(lambda: index.size(W1) == 2)
    assert sub.stats.workers[W1].batches == 1  # a fresh stream


async def test_endpoints_without_events_get_no_source_but_still_leave(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    sub = await subscriber(stack, zmq_ctx, PrefixIndex(BLOCK))
    endpoints = EndpointSet([Endpoint(W1)])
    left: list[str] = []
    FleetFollower(endpoints, sub, on_left=[left.append])
    assert sub.stats.workers == {}
    endpoints.replace([])
    assert left == [W1]


async def test_one_failure_does_not_stop_the_others(
    stack: contextlib.AsyncExitStack,
    zmq_ctx: zmq.asyncio.Context,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sub = await subscriber(stack, zmq_ctx, PrefixIndex(BLOCK))
    pub = await publisher(stack, zmq_ctx)
    endpoints = EndpointSet()
    left: list[str] = []

    def broken(_address: str) -> None:
        raise RuntimeError("plugin bug")

    FleetFollower(endpoints, sub, on_left=[broken, left.append])
    with caplog.at_level(logging.ERROR, logger="kvgate.fleet.follower"):
        endpoints.replace(
            [
                Endpoint(W1, events_endpoint="tcp://no-such-host-name.invalid:x"),
                Endpoint(W2, events_endpoint=pub.endpoint),
            ]
        )
        assert set(sub.stats.workers) == {W2}
        assert any(
            f"cannot subscribe to the KV events of {W1}" in r.message for r in caplog.records
        )

        endpoints.replace([])
    assert left == [W1, W2]
    assert sum("on_left callback" in r.message for r in caplog.records) == 2
    assert sub.stats.workers == {}
