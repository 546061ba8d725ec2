"""``cache_salt`` (and LoRA) against vLLM 0.33's own block hashing and publisher, from the wheel.

vLLM keys a request's first block with its ``cache_salt`` (and every block of an adapter with the
adapter), so a salted prompt never reuses unsalted blocks, nor those of another salt. kvgate must
predict exactly that: a request's predicted overlap with a worker is the number of leading blocks
whose vLLM hashes are equal, computed here by vLLM's own code, never more.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import time
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import msgspec
import pytest

from kvgate.events.decode import decode_batch
from kvgate.extproc.epp import EppOptions
from kvgate.extproc.epp_runtime import EppRuntime
from kvgate.scheduling.plugins.kv_aware_scorer import KvAwareScorer
from kvgate.scheduling.request import LLMRequest
from kvgate.scheduling.router_config import KvRouterConfig
from kvgate.tokens import ModelTokenizer
from tests.events.publisher import last_endpoint
from tests.events.vllm_hashing import LoraRequest, Request, block_hashes, load_block_hashing
from tests.events.vllm_hashing import stored_event as vllm_stored_event
from tests.events.vllm_publisher import load_kv_events
from tests.extproc.utils import MODEL, ExtProcStream, loopback_epp_settings

BLOCK = 16
SYSTEM = "You answer questions about the kvgate test suite. " * 12
SALTS = (None, "tenant-a", "tenant-b")
ADAPTERS = (None, "adapter-1")


@pytest.fixture(scope="module")
def vllm() -> types.SimpleNamespace:
    return load_block_hashing()


@pytest.fixture(scope="module")
def kv_events() -> types.ModuleType:
    return load_kv_events()


@pytest.fixture(scope="module")
def tokenizer(qwen3_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.load(qwen3_dir)


def chat(question: str, salt: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
        ],
    }
    if salt is not None:
        body["cache_salt"] = salt
    return body


def engine_request(tokenizer: ModelTokenizer, body: dict[str, Any], adapter: str | None) -> Request:
    """The request as the engine holds it: the prompt's tokens, its salt and adapter."""
    return Request(
        tokenizer.tokenize_chat(body),
        cache_salt=body.get("cache_salt"),
        lora_request=LoraRequest(adapter) if adapter else None,
    )


def leading_equal(a: list[bytes], b: list[bytes]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


async def test_predicted_overlap_is_where_vllm_block_hashes_agree(
    vllm: types.SimpleNamespace, kv_events: types.ModuleType, tokenizer: ModelTokenizer
) -> None:
    """Every combination of two prompts sharing a long system prompt, three salts and two
    adapters: each is stored on its own worker from the BlockStored event vLLM builds (decoded
    by kvgate from vLLM's msgpack), then each is routed through the KV scorer's prepare phase
    (tokenize, salt, hash, match)."""
    config = KvRouterConfig.from_env({"DYNAMO_KV_BLOCK_SIZE": str(BLOCK)})
    scorer = KvAwareScorer("dyn-kv", config, tokenizer)
    index = scorer.router.event_index
    assert index is not None
    variants = list(itertools.product(("first?", "second?"), SALTS, ADAPTERS))
    engine_hashes = {}
    for seq, (question, salt, adapter) in enumerate(variants):
        request = engine_request(tokenizer, chat(question, salt), adapter)
        event = vllm_stored_event(vllm, kv_events, request, BLOCK)
        payload = msgspec.msgpack.encode(kv_events.KVEventBatch(ts=time.time(), events=[event]))
        (decoded,) = decode_batch(seq, payload).events
        worker = f"10.0.0.{seq}:8000"
        index.apply_event(worker, decoded)
        engine_hashes[worker] = block_hashes(vllm, request, BLOCK)
    assert index.stats.malformed_stores == 0
    for number, (question, salt, adapter) in enumerate(variants):
        mine = block_hashes(vllm, engine_request(tokenizer, chat(question, salt), adapter), BLOCK)
        request = LLMRequest(
            request_id=f"r{number}",
            model=adapter or MODEL,
            kind="chat",
            body=chat(question, salt),
            headers={},
            lora_name=adapter,
        )
        await scorer.prepare(request, [])
        overlaps = request.overlaps or {}
        for worker, theirs in engine_hashes.items():
            expected = leading_equal(mine, theirs)
            assert overlaps.get(worker, 0) == expected, (question, salt, adapter, worker)
    # Not vacuous: unsalted prompts share the system prompt's blocks, salted ones do not.
    first, second = engine_hashes["10.0.0.0:8000"], engine_hashes["10.0.0.6:8000"]
    assert variants[0][1:] == variants[6][1:] == (None, None)
    assert leading_equal(first, second) >= 5
    assert leading_equal(first, engine_hashes["10.0.0.2:8000"]) == 0  # tenant-a, same prompt


@contextlib.asynccontextmanager
async def publishers(kv_events: types.ModuleType, count: int) -> AsyncIterator[list[Any]]:
    made = [
        kv_events.ZmqEventPublisher(
            data_parallel_rank=0,
            endpoint="tcp://127.0.0.1:*",
            replay_endpoint="tcp://127.0.0.1:*",
            topic=f"kv@worker{i}@{MODEL}",
        )
        for i in range(count)
    ]
    try:
        yield made
    finally:
        for publisher in made:
            await asyncio.to_thread(publisher.shutdown)


def decision(routed_headers: dict[str, str]) -> dict[str, str]:
    return dict(part.split("=", 1) for part in routed_headers["x-kvgate-decision"].split())


async def test_salted_requests_are_routed_as_the_engines_cache_them(
    vllm: types.SimpleNamespace,
    kv_events: types.ModuleType,
    tokenizer: ModelTokenizer,
    qwen3_dir: Path,
    tmp_path: Path,
) -> None:
    """The whole path: vLLM's publisher → the EPP's subscriber and index; a request through the
    ext_proc stream → tokenizer, salt, hashes, match, decision. Worker A cached the prompt under
    tenant-a's salt, worker B without a salt."""
    body_a, body_plain = (
        chat("Which tests check salts?", "tenant-a"),
        chat("Which tests check salts?", None),
    )
    async with publishers(kv_events, 2) as (pub_a, pub_b):
        addresses = ["127.0.0.1:9", "127.0.0.1:19"]
        endpoints = tmp_path / "endpoints.json"
        endpoints.write_text(
            json.dumps(
                [
                    {"address": address, "events": last_endpoint(pub._pub),
                     "replay": last_endpoint(pub._replay)}
                    for address, pub in zip(addresses, (pub_a, pub_b), strict=True)
                ]
            )
        )  # fmt: skip
        settings = dataclasses.replace(
            loopback_epp_settings(qwen3_dir, endpoints),
            options=EppOptions(served_model=MODEL, decision_header=True),
        )
        async with EppRuntime(settings) as runtime:
            (owner,) = runtime.shared_load.owners.values()
            index = owner.router.index
            stored = {
                addresses[0]: vllm_stored_event(
                    vllm, kv_events, engine_request(tokenizer, body_a, None), BLOCK
                ),
                addresses[1]: vllm_stored_event(
                    vllm, kv_events, engine_request(tokenizer, body_plain, None), BLOCK
                ),
            }
            # PUB/SUB has no handshake: publish (idempotently) until both workers are indexed.
            async with asyncio.timeout(10):
                while any(index.size(a) == 0 for a in addresses):
                    for publisher, address in zip((pub_a, pub_b), addresses, strict=True):
                        publisher.publish(
                            kv_events.KVEventBatch(ts=time.time(), events=[stored[address]])
                        )
                    await asyncio.sleep(0.05)
            blocks = len(stored[addresses[0]].block_hashes)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.bound_ports['grpc']}") as ch:
                expectations = [
                    (body_a, addresses[0], blocks),
                    (body_plain, addresses[1], blocks),
                    (chat("Which tests check salts?", "tenant-b"), None, 0),
                ]
                for body, where, overlap in expectations:
                    stream = ExtProcStream(ch)
                    routed = await stream.route(json.dumps(body).encode())
                    await stream.close()
                    summary = decision(routed.set_headers)
                    assert int(summary["best_overlap_blocks"]) == overlap, summary
                    if where is not None:
                        assert routed.destination == where
                        assert int(summary["overlap_blocks"]) == overlap
