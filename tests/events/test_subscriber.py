"""The subscriber against real ZMQ sockets on 127.0.0.1, fed by `TestPublisher`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import zmq
import zmq.asyncio

from kvgate.events.replay import offset_endpoint_port
from kvgate.events.subscriber import KvEventSubscriber, SubscriberConfig
from kvgate.events.types import AllBlocksCleared, BlockRemoved, KvEvent
from tests.events.publisher import TestPublisher, removed, stored
from tests.events.utils import RecordingSink, wait_until

W1 = "127.0.0.1:8000"
W2 = "127.0.0.1:8001"
CONFIG = SubscriberConfig(block_size=4, replay_timeout_s=1.0, warn_interval_s=0.0)


@pytest.fixture
async def stack() -> AsyncIterator[contextlib.AsyncExitStack]:
    async with contextlib.AsyncExitStack() as exit_stack:
        yield exit_stack


async def subscriber(
    stack: contextlib.AsyncExitStack,
    ctx: zmq.asyncio.Context,
    sink: RecordingSink,
    config: SubscriberConfig = CONFIG,
) -> KvEventSubscriber:
    return await stack.enter_async_context(KvEventSubscriber(sink, config, context=ctx))


async def publisher(
    stack: contextlib.AsyncExitStack, ctx: zmq.asyncio.Context, **kwargs: Any
) -> TestPublisher:
    return await stack.enter_async_context(TestPublisher(ctx, **kwargs))


async def connected_pair(
    stack: contextlib.AsyncExitStack,
    ctx: zmq.asyncio.Context,
    sink: RecordingSink,
    *,
    config: SubscriberConfig = CONFIG,
    **publisher_kwargs: Any,
) -> tuple[KvEventSubscriber, TestPublisher]:
    """A started subscriber connected to one publisher (worker W1) that it is listening to.

    With a replay socket, the subscriber's start-up history request (empty here) is answered and
    then forgotten, so that tests see only the replays that gaps cause."""
    sub = await subscriber(stack, ctx, sink, config)
    pub = await publisher(stack, ctx, **publisher_kwargs)
    sub.add_source(W1, pub.endpoint, replay_endpoint=pub.replay_endpoint)
    await pub.wait_subscribed()
    if pub.replay_endpoint is not None:
        await wait_history_answered(pub)
    return sub, pub


async def wait_history_answered(pub: TestPublisher) -> None:
    """Wait until the subscriber's start-up history request to ``pub`` is answered and over,
    then forget it. A history answer that raced the first live batches would otherwise take
    the place of the gap replay a test is about."""
    await wait_until(lambda: pub.replay_requests == [0])
    await wait_until(lambda: not any(t.get_name().startswith("kv-events history")
                                     for t in asyncio.all_tasks()))  # fmt: skip
    pub.replay_requests.clear()


def batch_events(index: int) -> list[KvEvent]:
    """Distinct, recognisable events for the index-th batch of a test."""
    return [stored([1000 + index], parent=None if index == 0 else 999 + index), removed([index])]


# -- the normal path -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["map", "array", "mocker"])
@pytest.mark.parametrize("hashes", ["int", "bytes"])
async def test_batches_reach_the_sink_in_order(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context, layout: Any, hashes: Any
) -> None:
    sink = RecordingSink()
    sub, pub = await connected_pair(
        stack, zmq_ctx, sink, layout=layout, hashes=hashes, topic=b"kv@x@m"
    )
    events: list[KvEvent] = [
        stored([1, 2], medium=None),
        removed([1], medium=None),
        AllBlocksCleared(),
    ]
    for event in events:
        pub.publish([event])
    await wait_until(lambda: len(sink.calls) == 3)
    assert sink.events(W1) == events
    stats = sub.stats.workers[W1]
    assert (stats.batches, stats.events, stats.blocks_stored, stats.blocks_removed) == (3, 3, 2, 1)
    assert (stats.gaps, stats.resets, stats.malformed) == (0, 0, 0)


async def test_a_burst_is_drained_completely_and_in_order(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    sink = RecordingSink()
    config = SubscriberConfig(block_size=4, max_drain=100, warn_interval_s=0.0)
    sub, pub = await connected_pair(stack, zmq_ctx, sink, config=config)
    for index in range(5_000):
        pub.publish([removed([index])])
    await wait_until(lambda: len(sink.calls) == 5_000, timeout=20)
    assert sink.events(W1) == [removed([index]) for index in range(5_000)]
    assert sub.stats.workers[W1].gaps == 0


async def test_subscribing_to_a_topic_prefix_filters_other_topics(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    sink = RecordingSink()
    sub = await subscriber(stack, zmq_ctx, sink)
    other = await publisher(stack, zmq_ctx, topic=b"metrics")
    ours = await publisher(stack, zmq_ctx, topic=b"kv@" + W2.encode() + b"@m")
    sub.add_source(W1, other.endpoint, subscribe=b"kv@")
    sub.add_source(W2, ours.endpoint, subscribe=b"kv@")
    await asyncio.gather(other.wait_subscribed(), ours.wait_subscribed())
    other.publish([AllBlocksCleared()])
    ours.publish([AllBlocksCleared()])
    await wait_until(lambda: len(sink.events(W2)) == 1)
    assert sink.events(W1) == []


# -- malformed input -------------------------------------------------------------------------------


async def test_wrong_frame_counts_are_counted_and_skipped(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    sink = RecordingSink()
    sub, pub = await connected_pair(stack, zmq_ctx, sink)
    pub.send_frames([b"", (0).to_bytes(8, "big")])
    pub.send_frames([b"", (0).to_bytes(8, "big"), b"\x92\x00\x90", b"extra"])
    pub.publish([AllBlocksCleared()])
    await wait_until(lambda: len(sink.calls) == 1)
    assert sub.stats.workers[W1].malformed == 2


async def test_a_malformed_payload_is_treated_as_a_lost_message(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    """The bad batch is not applied and leaves a gap: the worker is cleared, not left stale."""
    sink = RecordingSink()
    sub, pub = await connected_pair(stack, zmq_ctx, sink)
    pub.publish(batch_events(0))
    pub.publish_payload(b"\xc1 garbage")
    pub.publish(batch_events(2))
    await wait_until(lambda: len(sink.calls) == 5)
    assert [kind for kind, _, _ in sink.calls] == ["apply", "apply", "clear", "apply", "apply"]
    stats = sub.stats.workers[W1]
    assert (stats.malformed, stats.gaps, stats.resets) == (1, 1, 1)


async def test_a_bad_seq_frame_is_malformed(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    sink = RecordingSink()
    sub, pub = await connected_pair(stack, zmq_ctx, sink)
    pub.send_frames([b"", b"\x00\x01", b"\x92\x00\x90"])
    pub.publish([AllBlocksCleared()])
    await wait_until(lambda: len(sink.calls) == 1)
    assert sub.stats.workers[W1].malformed == 1


# -- sequence numbers, gaps and replay -------------------------------------------------------------


async def test_a_gap_is_filled_by_replay(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    sink = RecordingSink()
    sub, pub = await connected_pair(stack, zmq_ctx, sink, replay=True)
    pub.publish(batch_events(0))
    pub.publish(batch_events(1), send=False)
    pub.publish(batch_events(2), send=False)
    pub.publish(batch_events(3))
    pub.publish(batch_events(4))
    await wait_until(lambda: len(sink.calls) == 10)
    assert sink.events(W1) == [e for i in range(5) for e in batch_events(i)]
    assert pub.replay_requests == [1]
    stats = sub.stats.workers[W1]
    assert (stats.gaps, stats.replays_ok, stats.replays_failed, stats.resets) == (1, 1, 0, 0)
    assert stats.batches == 5


async def test_a_gap_without_replay_clears_the_worker_and_resumes(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    sink = RecordingSink()
    sub, pub = await connected_pair(stack, zmq_ctx, sink)
    pub.publish(batch_events(0))
    pub.publish(batch_events(1), send=False)
    pub.publish(batch_events(2))
    pub.publish(batch_events(3))
    await wait_until(lambda: len(sink.calls) == 7)
    assert sink.calls[2] == ("clear", W1, None)
    assert sink.events(W1) == batch_events(0) + batch_events(2) + batch_events(3)
    stats = sub.stats.workers[W1]
    assert (stats.gaps, stats.replays_ok, stats.replays_failed, stats.resets) == (1, 0, 0, 1)


async def test_a_replay_that_times_out_clears_the_worker(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    sink = RecordingSink()
    config = SubscriberConfig(block_size=4, replay_timeout_s=0.2, warn_interval_s=0.0)
    sub, pub = await connected_pair(stack, zmq_ctx, sink, config=config, replay=True)
    pub.replay_enabled = False
    pub.publish(batch_events(0))
    pub.publish(batch_events(1), send=False)
    pub.publish(batch_events(2))
    await wait_until(lambda: len(sink.calls) == 5)
    assert sink.calls[2] == ("clear", W1, None)
    stats = sub.stats.workers[W1]
    assert (stats.gaps, stats.replays_ok, stats.replays_failed, stats.resets) == (1, 0, 1, 1)


async def test_a_replay_that_does_not_reach_back_far_enough_clears_the_worker(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    sink = RecordingSink()
    sub, pub = await connected_pair(stack, zmq_ctx, sink, replay=True, replay_buffer=2)
    pub.publish(batch_events(0))
    pub.publish(batch_events(1), send=False)  # evicted from the 2-batch buffer by 2 and 3
    pub.publish(batch_events(2), send=False)
    pub.publish(batch_events(3))
    await wait_until(lambda: len(sink.calls) == 5)
    assert sink.calls[2] == ("clear", W1, None)
    assert sink.events(W1) == batch_events(0) + batch_events(3)
    stats = sub.stats.workers[W1]
    assert (stats.replays_ok, stats.replays_failed, stats.resets) == (0, 1, 1)


async def test_a_replay_against_an_unreachable_endpoint_clears_the_worker(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    sink = RecordingSink()
    config = SubscriberConfig(block_size=4, replay_timeout_s=0.2, warn_interval_s=0.0)
    sub = await subscriber(stack, zmq_ctx, sink, config)
    pub = await publisher(stack, zmq_ctx)
    # A port nothing listens on: ZMQ keeps retrying the connection until the timeout.
    sub.add_source(W1, pub.endpoint, replay_endpoint="tcp://127.0.0.1:1")
    await pub.wait_subscribed()
    pub.publish(batch_events(0))
    pub.publish(batch_events(1), send=False)
    pub.publish(batch_events(2))
    await wait_until(lambda: len(sink.calls) == 5)
    assert sub.stats.workers[W1].replays_failed == 1


@pytest.mark.parametrize("restart_seq", [0, 1], ids=["back-to-0", "back-to-1-first-one-missed"])
async def test_a_publisher_restart_clears_the_worker(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context, restart_seq: int
) -> None:
    sink = RecordingSink()
    sub, pub = await connected_pair(stack, zmq_ctx, sink, replay=True)
    for index in range(3):
        pub.publish(batch_events(index))
    pub.restart()
    pub.next_seq = restart_seq
    pub.publish(batch_events(10))
    pub.publish(batch_events(11))
    await wait_until(lambda: len(sink.calls) == 11)
    assert sink.calls[6] == ("clear", W1, None)
    assert sink.events(W1)[6:] == batch_events(10) + batch_events(11)
    stats = sub.stats.workers[W1]
    assert (stats.resets, stats.gaps, pub.replay_requests) == (1, 0, [])


async def test_joining_a_stream_under_way_rebuilds_the_index_from_replay(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    # The engine served requests before kvgate (re)started: batches 0..4 went to nobody.
    sink = RecordingSink()
    sub, pub = await connected_pair(stack, zmq_ctx, sink, replay=True)
    for index in range(5):
        pub.publish(batch_events(index), send=False)
    pub.publish(batch_events(5))
    await wait_until(lambda: len(sink.calls) == 12)
    assert sink.events(W1) == [e for i in range(6) for e in batch_events(i)]
    stats = sub.stats.workers[W1]
    assert (stats.backfills, stats.cold_starts, stats.resets, stats.gaps) == (1, 0, 0, 0)
    assert pub.replay_requests == [0]  # at its first batch (the start-up one found nothing)
    pub.publish(batch_events(6))
    await wait_until(lambda: len(sink.calls) == 14)


async def test_a_replay_buffer_that_lost_the_oldest_batches_still_backfills_the_rest(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context, caplog: Any
) -> None:
    sink = RecordingSink()
    sub, pub = await connected_pair(stack, zmq_ctx, sink, replay=True, replay_buffer=3)
    for index in range(6):
        pub.publish(batch_events(index), send=False)
    caplog.set_level(logging.INFO, logger="kvgate.events.subscriber")
    pub.publish(batch_events(6))  # the buffer now holds batches 4, 5, 6
    await wait_until(lambda: len(sink.calls) == 6)
    assert sink.events(W1) == batch_events(4) + batch_events(5) + batch_events(6)
    assert sub.stats.workers[W1].backfills == 1
    assert "blocks stored before batch 4 are unknown" in caplog.text


async def test_joining_a_stream_under_way_without_replay_starts_empty_and_says_so(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context, caplog: Any
) -> None:
    sink = RecordingSink()
    sub, pub = await connected_pair(stack, zmq_ctx, sink)
    pub.next_seq = 12_345
    pub.publish(batch_events(0))
    pub.publish(batch_events(1))
    await wait_until(lambda: len(sink.calls) == 4)
    stats = sub.stats.workers[W1]
    assert (stats.gaps, stats.resets, stats.backfills, stats.cold_starts) == (0, 0, 0, 1)
    assert "its index starts empty" in caplog.text
    assert "no replay endpoint is configured" in caplog.text


# -- block size ------------------------------------------------------------------------------------


async def test_a_block_size_mismatch_is_refused_counted_and_explained_once(
    stack: contextlib.AsyncExitStack,
    zmq_ctx: zmq.asyncio.Context,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = RecordingSink()
    config = SubscriberConfig(block_size=16, warn_interval_s=0.0)
    sub, pub = await connected_pair(stack, zmq_ctx, sink, config=config)
    with caplog.at_level(logging.ERROR, logger="kvgate.events.subscriber"):
        pub.publish([stored([1], block_size=32), removed([5])])
        pub.publish([stored([2], block_size=32), stored([3], block_size=16)])
        await wait_until(lambda: len(sink.calls) == 2)
    assert sink.events(W1) == [removed([5]), stored([3], block_size=16)]
    assert sub.stats.workers[W1].block_size_mismatch == 2
    assert sub.stats.workers[W1].blocks_stored == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        f"worker {W1} reports block_size=32 but kvgate is configured with 16: "
        "set DYNAMO_KV_BLOCK_SIZE=32 (or the engine's --block-size to 16); "
        "its BlockStored events are ignored until then"
    ]


# -- the sink --------------------------------------------------------------------------------------


async def test_a_failing_sink_is_counted_and_the_stream_goes_on(
    stack: contextlib.AsyncExitStack,
    zmq_ctx: zmq.asyncio.Context,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = RecordingSink(fail_on=lambda event: isinstance(event, BlockRemoved))
    sub, pub = await connected_pair(stack, zmq_ctx, sink)
    with caplog.at_level(logging.ERROR, logger="kvgate.events.subscriber"):
        pub.publish([removed([1]), stored([1])])
        pub.publish([stored([2]), removed([2]), AllBlocksCleared()])
        await wait_until(lambda: len(sink.calls) == 3)
    assert sink.events(W1) == [stored([1]), stored([2]), AllBlocksCleared()]
    assert sub.stats.workers[W1].sink_errors == 2
    assert sub.stats.workers[W1].batches == 2
    assert any("apply_event failed for worker" in r.getMessage() for r in caplog.records)


async def test_data_parallel_ranks_on_consecutive_ports_with_their_own_replay(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    """vLLM's layout: rank r publishes on port + r and answers replays on replay port + r."""
    for _attempt in range(20):
        rank0 = await publisher(stack, zmq_ctx, dp_rank=0, replay=True)
        assert rank0.replay_endpoint is not None
        try:
            rank1 = await publisher(
                stack,
                zmq_ctx,
                dp_rank=1,
                replay=True,
                bind=offset_endpoint_port(rank0.endpoint, 1),
                replay_bind=offset_endpoint_port(rank0.replay_endpoint, 1),
            )
        except zmq.ZMQError:
            continue  # a neighbouring port was taken: try another pair
        break
    else:
        pytest.fail("found no two consecutive free port pairs")
    sink = RecordingSink()
    sub = await subscriber(stack, zmq_ctx, sink)
    sub.add_source(W1, rank0.endpoint, replay_endpoint=rank0.replay_endpoint, data_parallel_size=2)
    await asyncio.gather(rank0.wait_subscribed(), rank1.wait_subscribed())
    rank0.publish([removed([100])])
    rank1.publish([removed([200])])
    rank1.publish([removed([201])], send=False)
    rank1.publish([removed([202])])
    rank0.publish([removed([101])])
    await wait_until(lambda: len(sink.calls) == 5)
    hashes = [e.block_hashes[0] for e in sink.events(W1) if isinstance(e, BlockRemoved)]
    assert [h for h in hashes if h < 200] == [100, 101]
    assert [h for h in hashes if h >= 200] == [200, 201, 202]
    # Rank 0 was also asked for its history at start-up; rank 1 only for its gap.
    assert (rank0.replay_requests, rank1.replay_requests) == ([0], [1])
    stats = sub.stats.workers[W1]
    assert (stats.gaps, stats.replays_ok, stats.resets) == (1, 1, 0)


# -- central bound socket --------------------------------------------------------------------------


async def test_central_socket_routes_by_topic_and_drops_unknown_topics(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    sink = RecordingSink()
    sub = await subscriber(stack, zmq_ctx, sink)
    endpoint = sub.bind("tcp://127.0.0.1:*")
    sub.add_source(W1)
    sub.add_source(W2)
    pubs = {
        worker: await publisher(stack, zmq_ctx, connect=endpoint, topic=topic)
        for worker, topic in [
            (W1, f"kv@{W1}@Qwen/Qwen3-0.6B".encode()),
            (W2, f"kv@{W2}@Qwen/Qwen3-0.6B".encode()),
            ("stranger", b"kv@10.9.9.9:8000@Qwen/Qwen3-0.6B"),
            ("no-worker", b"plain-topic"),
        ]
    }
    await asyncio.gather(*(pub.wait_subscribed() for pub in pubs.values()))
    for index in range(3):
        for pub in pubs.values():
            pub.publish(batch_events(index))
    await wait_until(lambda: len(sink.calls) == 12)
    assert sink.events(W1) == sink.events(W2) == [e for i in range(3) for e in batch_events(i)]
    await wait_until(lambda: sub.stats.unknown_topic == 6)
    assert (sub.stats.workers[W1].gaps, sub.stats.workers[W2].gaps) == (0, 0)


async def test_central_socket_tracks_seq_per_data_parallel_rank(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    sink = RecordingSink()
    sub = await subscriber(stack, zmq_ctx, sink)
    endpoint = sub.bind("tcp://127.0.0.1:*")
    sub.add_source(W1)
    topic = f"kv@{W1}@m".encode()
    ranks = [
        await publisher(stack, zmq_ctx, connect=endpoint, topic=topic, dp_rank=r) for r in (0, 1)
    ]
    await asyncio.gather(*(pub.wait_subscribed() for pub in ranks))
    for index in range(4):
        ranks[index % 2].publish(batch_events(index))
    await wait_until(lambda: len(sink.calls) == 8)
    stats = sub.stats.workers[W1]
    assert (stats.resets, stats.gaps) == (0, 0)


async def test_a_gap_on_the_central_socket_uses_the_workers_replay_endpoint(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    sink = RecordingSink()
    sub = await subscriber(stack, zmq_ctx, sink)
    endpoint = sub.bind("tcp://127.0.0.1:*")
    pub = await publisher(
        stack, zmq_ctx, connect=endpoint, topic=f"kv@{W1}@m".encode(), replay=True
    )
    sub.add_source(W1, replay_endpoint=pub.replay_endpoint)
    await pub.wait_subscribed()
    await wait_history_answered(pub)
    pub.publish(batch_events(0))
    pub.publish(batch_events(1), send=False)
    pub.publish(batch_events(2))
    await wait_until(lambda: len(sink.calls) == 6)
    assert sink.events(W1) == [e for i in range(3) for e in batch_events(i)]
    assert sub.stats.workers[W1].replays_ok == 1


# -- sources coming and going ----------------------------------------------------------------------


async def test_sources_can_be_added_and_removed_at_runtime(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    sink = RecordingSink()
    sub, pub1 = await connected_pair(stack, zmq_ctx, sink)
    pub2 = await publisher(stack, zmq_ctx)
    sub.add_source(W2, pub2.endpoint)
    await pub2.wait_subscribed()
    pub1.publish([removed([1])])
    pub2.publish([removed([2])])
    await wait_until(lambda: len(sink.calls) == 2)

    sub.remove_source(W1)
    assert W1 not in sub.stats.workers
    pub1.publish([removed([3])])
    pub2.publish([removed([4])])
    await wait_until(lambda: len(sink.events(W2)) == 2)
    await asyncio.sleep(0.05)
    assert sink.events(W1) == [removed([1])]
    assert sub.stats.total().batches == 3  # W1's counts survive in `departed`

    sub.add_source(W1, pub1.endpoint)  # the worker comes back: a fresh stream
    await pub1.wait_subscribed(count=2)
    pub1.publish([removed([5])])
    await wait_until(lambda: len(sink.events(W1)) == 2)
    assert sub.stats.workers[W1].gaps == 0


async def test_a_removed_central_worker_becomes_an_unknown_topic(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    sink = RecordingSink()
    sub = await subscriber(stack, zmq_ctx, sink)
    endpoint = sub.bind("tcp://127.0.0.1:*")
    sub.add_source(W1)
    pub = await publisher(stack, zmq_ctx, connect=endpoint, topic=f"kv@{W1}@m".encode())
    await pub.wait_subscribed()
    pub.publish([removed([1])])
    await wait_until(lambda: len(sink.calls) == 1)
    sub.remove_source(W1)
    pub.publish([removed([2])])
    await wait_until(lambda: sub.stats.unknown_topic == 1)
    assert len(sink.calls) == 1


async def test_removing_a_source_during_a_replay_stops_its_events(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    sink = RecordingSink()
    config = SubscriberConfig(block_size=4, replay_timeout_s=30.0, warn_interval_s=0.0)
    sub, pub = await connected_pair(stack, zmq_ctx, sink, config=config, replay=True)
    pub.replay_enabled = False
    pub.publish(batch_events(0))
    pub.publish(batch_events(1), send=False)
    pub.publish(batch_events(2))
    await wait_until(lambda: pub.replay_requests == [1])
    sub.remove_source(W1)
    await asyncio.sleep(0.05)
    assert sink.calls == [("apply", W1, e) for e in batch_events(0)]


async def test_aclose_during_a_pending_replay_returns_promptly(
    zmq_ctx: zmq.asyncio.Context,
) -> None:
    sink = RecordingSink()
    config = SubscriberConfig(block_size=4, replay_timeout_s=30.0, warn_interval_s=0.0)
    async with TestPublisher(zmq_ctx, replay=True) as pub:
        sub = KvEventSubscriber(sink, config)  # owns its context
        await sub.start()
        sub.add_source(W1, pub.endpoint, replay_endpoint=pub.replay_endpoint)
        await pub.wait_subscribed()
        await wait_until(lambda: pub.replay_requests == [0])  # start-up history: empty
        pub.replay_enabled = False
        pub.publish(batch_events(0))
        pub.publish(batch_events(1), send=False)
        pub.publish(batch_events(2))
        await wait_until(lambda: pub.replay_requests == [0, 1])
        started = time.monotonic()
        await asyncio.wait_for(sub.aclose(), timeout=2)
        assert time.monotonic() - started < 1
        await sub.aclose()  # idempotent
        with pytest.raises(RuntimeError, match="closed"):
            sub.add_source(W2, pub.endpoint)


async def test_sources_added_before_start_are_read_once_started(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    sink = RecordingSink()
    sub = KvEventSubscriber(sink, CONFIG, context=zmq_ctx)
    stack.push_async_callback(sub.aclose)
    pub = await publisher(stack, zmq_ctx)
    sub.add_source(W1, pub.endpoint)
    await pub.wait_subscribed()  # ZMQ subscribes even before anyone reads
    pub.publish([removed([1])])
    await asyncio.sleep(0.02)
    assert sink.calls == []
    await sub.start()
    await wait_until(lambda: len(sink.calls) == 1)


# -- configuration errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_size": 0}, "block_size: got 0; must be >= 1"),
        ({"block_size": 16, "replay_timeout_s": 0}, "replay_timeout_s"),
        ({"block_size": 16, "max_drain": 0}, "max_drain"),
        ({"block_size": 16, "rcvhwm": -1}, "rcvhwm"),
    ],
    ids=["zero-block-size", "zero-replay-timeout", "zero-drain", "negative-hwm"],
)
def test_invalid_config_is_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SubscriberConfig(**kwargs)


async def test_source_misuse_is_refused(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    sub = await subscriber(stack, zmq_ctx, RecordingSink())
    sub.add_source(W1, "tcp://127.0.0.1:5999")
    with pytest.raises(ValueError, match="already a source"):
        sub.add_source(W1, "tcp://127.0.0.1:5999")
    with pytest.raises(ValueError, match="central socket"):
        sub.add_source(W2, subscribe=b"kv@")
    with pytest.raises(ValueError, match="cannot connect"):
        sub.add_source(W2, "nonsense")
    sub.remove_source("never-added")


def test_replay_port_offset_follows_vllm() -> None:
    assert offset_endpoint_port("tcp://10.0.0.1:5557", None) == "tcp://10.0.0.1:5557"
    assert offset_endpoint_port("tcp://10.0.0.1:5557", 0) == "tcp://10.0.0.1:5557"
    assert offset_endpoint_port("tcp://10.0.0.1:5557", 2) == "tcp://10.0.0.1:5559"
    with pytest.raises(ValueError, match="tcp://host:port"):
        offset_endpoint_port("ipc:///tmp/x", 1)


async def test_a_new_source_with_history_is_replayed_before_any_live_batch(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    # kvgate (re)starts next to an engine that served before and is idle now: its history is
    # fetched at once, not at its next batch.
    sink = RecordingSink()
    sub = await subscriber(stack, zmq_ctx, sink)
    pub = await publisher(stack, zmq_ctx, replay=True)
    for index in range(4):
        pub.publish(batch_events(index), send=False)
    sub.add_source(W1, pub.endpoint, replay_endpoint=pub.replay_endpoint)
    await wait_until(lambda: len(sink.calls) == 8)
    assert sink.events(W1) == [e for i in range(4) for e in batch_events(i)]
    assert sub.stats.workers[W1].backfills == 1
    await pub.wait_subscribed()
    # Live batches go on from there, each applied once.
    pub.publish(batch_events(4))
    await wait_until(lambda: len(sink.calls) == 10)
    assert sink.events(W1)[8:] == batch_events(4)
    stats = sub.stats.workers[W1]
    assert (stats.resets, stats.gaps) == (0, 0)


async def test_live_batches_that_the_start_up_replay_already_applied_are_skipped(
    stack: contextlib.AsyncExitStack, zmq_ctx: zmq.asyncio.Context
) -> None:
    sink = RecordingSink()
    sub = await subscriber(stack, zmq_ctx, sink)
    pub = await publisher(stack, zmq_ctx, replay=True)
    for index in range(3):
        pub.publish(batch_events(index), send=False)
    # Batch 3 is both live and in the replay: whichever arrives first, it is applied once.
    sub.add_source(W1, pub.endpoint, replay_endpoint=pub.replay_endpoint)
    await pub.wait_subscribed()
    pub.publish(batch_events(3))
    pub.publish(batch_events(4))
    await wait_until(lambda: len(sink.calls) >= 10)
    await asyncio.sleep(0.1)
    assert sink.events(W1) == [e for i in range(5) for e in batch_events(i)]
    stats = sub.stats.workers[W1]
    assert (stats.resets, stats.backfills) == (0, 1)
