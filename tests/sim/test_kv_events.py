"""KV events on the wire: frames, both layouts, eviction through the API, replay of a gap.

Payloads are decoded with the test's own msgpack reader, never with kvgate's decoder.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio

from kvgate.events.types import AllBlocksCleared, BlockRemoved, BlockStored, EngineHash
from kvgate.sim.engine import EngineConfig
from kvgate.sim.prompts import TokensCodec
from kvgate.sim.publisher import KvEventPublisher
from kvgate.sim.wire import encode_batch
from tests.sim.msgpack_reader import unpack
from tests.sim.utils import MODEL, Subscriber, WorkerFactory, events_of, stream

H = EngineHash


def test_map_layout_bytes() -> None:
    stored = BlockStored([H(1), H(2**64 - 1)], None, [5, 6, 7, 8], 2, medium="GPU")
    batch = unpack(encode_batch(1.5, [stored, BlockRemoved([H(3)], "GPU"), AllBlocksCleared()]))
    assert batch == [
        1.5,
        [
            {
                "type": "BlockStored",
                "block_hashes": [1, 2**64 - 1],
                "parent_block_hash": None,
                "token_ids": [5, 6, 7, 8],
                "block_size": 2,
                "lora_id": None,
                "medium": "GPU",
                "lora_name": None,
            },
            {"type": "BlockRemoved", "block_hashes": [3], "medium": "GPU"},
            {"type": "AllBlocksCleared"},
        ],
        None,
    ]


def test_array_layout_bytes() -> None:
    stored = BlockStored([H(9)], H(8), [1, 2], 2, medium="GPU")
    batch = unpack(encode_batch(2.0, [stored, BlockRemoved([H(9)], "GPU")], "array", 0))
    assert batch == [
        2.0,
        [
            ["BlockStored", [9], 8, [1, 2], 2, None, "GPU", None],
            ["BlockRemoved", [9], "GPU"],
        ],
        0,
    ]


async def test_publisher_frames_and_replay_fill_a_gap(
    zmq_context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    publisher = KvEventPublisher(
        zmq_context,
        "tcp://127.0.0.1:*",
        "kv@127.0.0.1:1@m",
        replay_endpoint="tcp://127.0.0.1:*",
        buffer_steps=4,
    )
    replay_task = asyncio.create_task(publisher.serve_replay())
    first = Subscriber(zmq_context, publisher.endpoint)
    try:
        await first.ready()
        for i in range(2):
            publisher.publish([BlockRemoved([H(i)], "GPU")], float(i))
        received = [await first.recv() for _ in range(2)]
        assert [(topic, seq) for topic, seq, _ in received] == [
            (b"kv@127.0.0.1:1@m", 0),
            (b"kv@127.0.0.1:1@m", 1),
        ]
        first.close()

        # Batches 2 and 3 go out while nobody listens; a new subscriber sees 4 and a gap.
        for i in range(2, 4):
            publisher.publish([BlockRemoved([H(i)], "GPU")], float(i))
        second = Subscriber(zmq_context, publisher.endpoint)
        await second.ready()
        publisher.publish([BlockRemoved([H(4)], "GPU")], 4.0)
        _, seq, _ = await second.recv()
        second.close()
        assert seq == 4

        dealer = zmq.asyncio.Context(zmq_context).socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(publisher.replay_endpoint or "")
        try:
            await dealer.send_multipart([b"", (2).to_bytes(8, "big")])
            replies = []
            while True:
                frames = await asyncio.wait_for(dealer.recv_multipart(), 5)
                assert len(frames) == 4 and frames[0] == b""
                if frames[2] == (-1).to_bytes(8, "big", signed=True):
                    assert frames[1] == frames[3] == b""
                    break
                assert frames[1] == b"kv@127.0.0.1:1@m"
                replies.append((int.from_bytes(frames[2], "big"), unpack(frames[3])))
            # Asking from 0: the buffer (4 batches) starts at 1.
            await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
            oldest = await asyncio.wait_for(dealer.recv_multipart(), 5)
        finally:
            dealer.close(linger=0)
    finally:
        replay_task.cancel()
        publisher.close()
    assert [seq for seq, _ in replies] == [2, 3, 4]
    assert [events_of(batch)[0]["block_hashes"] for _, batch in replies] == [[2], [3], [4]]
    assert int.from_bytes(oldest[2], "big") == 1


def full_blocks(tokens: list[int], block_size: int = 16) -> list[int]:
    return tokens[: len(tokens) // block_size * block_size]


@pytest.mark.parametrize("layout", ["map", "array"])
async def test_served_request_stores_its_prompt_blocks(
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
    zmq_context: zmq.Context[zmq.Socket[bytes]],
    codec: TokensCodec,
    layout: str,
) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "blocks " * 100}],
        "max_tokens": 1,
    }
    prompt = codec.tokenize(body, "chat")
    async with make_worker(events_port=0, event_layout=layout) as worker:
        assert worker.events_endpoint and worker.events_endpoint.startswith("tcp://127.0.0.1:")
        sub = Subscriber(zmq_context, worker.events_endpoint)
        await sub.ready()
        async with http.post(worker.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
        messages = await sub.drain()
        sub.close()
    assert [seq for _, seq, _ in messages] == list(range(len(messages)))
    assert {topic for topic, _, _ in messages} == {f"kv@{worker.address}@{MODEL}".encode()}
    events = [e for _, _, batch in messages for e in events_of(batch)]
    assert {e["type"] for e in events} == {"BlockStored"}
    assert [t for e in events for t in e["token_ids"]] == full_blocks(prompt)
    hashes = [h for e in events for h in e["block_hashes"]]
    assert len(set(hashes)) == len(hashes) == len(prompt) // 16
    assert events[0]["parent_block_hash"] is None
    assert all(e["block_size"] == 16 and e["medium"] == "GPU" for e in events)


@pytest.mark.parametrize("layout", ["map", "array"])
async def test_salted_request_caches_other_blocks_and_says_why(
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
    zmq_context: zmq.Context[zmq.Socket[bytes]],
    layout: str,
) -> None:
    """As vLLM does: a ``cache_salt`` keys the prompt's first block, so the salted prompt is
    cached apart from the unsalted one (no hit between them), and its first BlockStored carries
    the salt in ``extra_keys``."""

    def body(salt: str | None) -> dict[str, Any]:
        out = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "salt " * 100}],
            "max_tokens": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return out if salt is None else {**out, "cache_salt": salt}

    async with make_worker(events_port=0, event_layout=layout) as worker:
        sub = Subscriber(zmq_context, worker.events_endpoint or "")
        await sub.ready()
        cached = []
        for salt in ("tenant-a", None, "tenant-a", "tenant-b"):
            reply = await stream(http, worker.url + "/v1/chat/completions", body(salt))
            cached.append(reply.usage["prompt_tokens_details"]["cached_tokens"])
        messages = await sub.drain()
        sub.close()
    assert cached[0] == cached[1] == cached[3] == 0
    assert cached[2] > 0
    firsts = [
        e
        for _, _, batch in messages
        for e in events_of(batch)
        if e["type"] == "BlockStored" and e["parent_block_hash"] is None
    ]
    blocks = len(firsts[0]["block_hashes"])
    assert [e.get("extra_keys") for e in firsts] == [
        [["tenant-a"], *[None] * (blocks - 1)],
        None,
        [["tenant-b"], *[None] * (blocks - 1)],
    ]
    assert len({e["block_hashes"][0] for e in firsts}) == 3


async def test_eviction_under_pressure_removes_exactly_the_evicted_blocks(
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
    zmq_context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    """A cache of 40 blocks; each request needs ~13 blocks. After a few requests the oldest
    blocks must go, leaf first: the removals name them, and re-sending the first prompt hits
    exactly the blocks that were not removed."""
    engine = EngineConfig(num_gpu_blocks=40, max_model_len=600, watermark=0.0)

    def body(topic: str) -> dict[str, Any]:
        return {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"{topic}: " + "facts " * 190}],
            "max_tokens": 1,
        }

    async with make_worker(engine=engine, events_port=0) as worker:
        sub = Subscriber(zmq_context, worker.events_endpoint or "")
        await sub.ready()
        url = worker.url + "/v1/chat/completions"
        for topic in ("alpha", "beta", "gamma", "delta"):
            async with http.post(url, json=body(topic)) as resp:
                assert resp.status == 200
        messages = await sub.drain()
        async with http.post(url, json=body("alpha")) as resp:
            again = await resp.json()
        sub.close()
    events = [e for _, _, batch in messages for e in events_of(batch)]
    stored_order: list[int] = []
    per_request: list[list[int]] = []
    for event in events:
        if event["type"] == "BlockStored":
            if event["parent_block_hash"] is None:
                per_request.append([])
            per_request[-1].extend(event["block_hashes"])
            stored_order.extend(event["block_hashes"])
    removed = [h for e in events if e["type"] == "BlockRemoved" for h in e["block_hashes"]]
    alpha = per_request[0]
    assert removed, "four requests of ~13 blocks overflow 40 blocks"
    # LRU by release, leaf first: alpha finished first, so its chain goes from the tail.
    assert removed == alpha[::-1][: len(removed)]
    kept = len(alpha) - len(removed)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == kept * 16


async def test_reset_prefix_cache_emits_all_blocks_cleared(
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
    zmq_context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    async with make_worker(events_port=0) as worker:
        sub = Subscriber(zmq_context, worker.events_endpoint or "")
        await sub.ready()
        body = {"prompt": "x " * 40, "max_tokens": 1}
        async with http.post(worker.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
        async with http.post(worker.url + "/reset_prefix_cache") as resp:
            assert resp.status == 200
        messages = await sub.drain()
        sub.close()
    assert events_of(messages[-1][2]) == [{"type": "AllBlocksCleared"}]
    assert worker.engine.cache.num_cached_blocks == 0


async def test_worker_replay_endpoint(
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
    zmq_context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    """Nobody subscribed while the request ran; replay from 0 returns its whole history."""
    async with make_worker(events_port=0, replay_port=0) as worker:
        body = {"prompt": "y " * 40, "max_tokens": 1}
        async with http.post(worker.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
        dealer = zmq.asyncio.Context(zmq_context).socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(worker.replay_endpoint or "")
        await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        frames = [await asyncio.wait_for(dealer.recv_multipart(), 5) for _ in range(2)]
        dealer.close(linger=0)
    assert int.from_bytes(frames[0][2], "big") == 0
    assert events_of(unpack(frames[0][3]))[0]["type"] == "BlockStored"
    assert frames[1][2] == (-1).to_bytes(8, "big", signed=True)
