"""The Dynamo mocker's own KV events (map layout) and replay socket, decoded by kvgate: the blocks
a worker reports are the blocks kvgate computes for the same request, live and after the fact."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio

from kvgate.dynamo.processes import DynamoFleet, MockerWorker
from kvgate.events.decode import decode_batch, parse_seq
from kvgate.events.subscriber import KvEventSubscriber, SubscriberConfig
from kvgate.events.types import BlockStored
from kvgate.index.prefix_index import PrefixIndex
from kvgate.tokens import ModelTokenizer
from kvgate.tokens.hashing import sequence_hashes_of
from tests.dynamo.helpers import chat_body, system_prompt

pytestmark = pytest.mark.slow

BLOCK = 16


async def pinned(fleet: DynamoFleet, worker: MockerWorker, body: dict[str, Any]) -> dict[str, Any]:
    """POST straight to the direct-mode frontend, pinned to ``worker`` by header."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{fleet.frontend('direct').url}/v1/chat/completions",
            json=body,
            headers={"x-worker-instance-id": str(worker.instance_id)},
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


async def wait_overlap(index: PrefixIndex, hashes: list[int], worker: str, want: int) -> int:
    for _ in range(100):
        got = index.find_matches(hashes).get(worker, 0)
        if got >= want:
            return got
        await asyncio.sleep(0.02)
    return index.find_matches(hashes).get(worker, 0)


async def test_map_layout_events_decode_into_the_blocks_kvgate_computes(
    agg_fleet: DynamoFleet, qwen3_dir: Path
) -> None:
    worker = agg_fleet.workers[0]
    tokenizer = ModelTokenizer.load(str(qwen3_dir))
    body = chat_body("Which block is this?", system_prompt(101))
    tokens = tokenizer.tokenize_request(body, "chat")
    hashes = sequence_hashes_of(tokens, BLOCK)

    context = zmq.asyncio.Context()
    raw = context.socket(zmq.SUB)
    raw.setsockopt(zmq.SUBSCRIBE, b"")
    raw.connect(worker.events_endpoint)
    index = PrefixIndex(BLOCK)
    async with KvEventSubscriber(index, SubscriberConfig(block_size=BLOCK)) as live:
        live.add_source(worker.address, worker.events_endpoint)
        await asyncio.sleep(0.5)  # a SUB socket misses what is published before it connects
        answer = await pinned(agg_fleet, worker, body)
        frames = await asyncio.wait_for(raw.recv_multipart(), 10)
        # The exact prompt the engine saw is the one kvgate tokenized.
        assert answer["usage"]["prompt_tokens"] == len(tokens)
        assert await wait_overlap(index, hashes, worker.address, len(tokens) // BLOCK) == (
            len(tokens) // BLOCK
        )
        assert live.stats.total().malformed == 0
    context.destroy(linger=0)

    # What the mocker sends: 3 frames, an empty topic, msgpack [ts, [maps...], dp_rank], each
    # event a map with "type" and "group_idx" and no lora_id / medium.
    topic, seq, payload = frames
    assert topic == b""
    events = msgspec.msgpack.decode(payload)[1]
    assert all(isinstance(e, dict) and "type" in e for e in events)
    stored = [e for e in events if e["type"] == "BlockStored"]
    assert stored and "group_idx" in stored[0] and "lora_id" not in stored[0]
    batch = decode_batch(parse_seq(seq), payload)
    decoded = [e for e in batch.events if isinstance(e, BlockStored)]
    assert [e.token_ids for e in decoded] == [e["token_ids"] for e in stored]


async def test_replay_rebuilds_a_late_subscribers_index(
    agg_fleet: DynamoFleet, qwen3_dir: Path
) -> None:
    worker = agg_fleet.workers[1]
    tokenizer = ModelTokenizer.load(str(qwen3_dir))
    body = chat_body("Replay me.", system_prompt(102))
    await pinned(agg_fleet, worker, body)
    hashes = sequence_hashes_of(tokenizer.tokenize_request(body, "chat"), BLOCK)

    # A subscriber that was not listening (an EPP started afterwards) learns it from the
    # worker's replay socket alone: nothing is published while it connects.
    index = PrefixIndex(BLOCK)
    async with KvEventSubscriber(index, SubscriberConfig(block_size=BLOCK)) as late:
        late.add_source(
            worker.address, worker.events_endpoint, replay_endpoint=worker.replay_endpoint
        )
        assert await wait_overlap(index, hashes, worker.address, len(hashes)) == len(hashes)
        stats = late.stats.workers[worker.address]
        assert stats.backfills == 1
        assert stats.malformed == 0
