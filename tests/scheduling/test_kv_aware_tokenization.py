"""Where the kv-aware-scorer tokenizes: what the segment cache already holds on the event loop,
a long uncached remainder in its tokenizer thread — so a warm prompt never queues behind a cold
one, and the ids are the same either way."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.plugins.kv_aware_scorer import KvAwareScorer
from kvgate.scheduling.request import LLMRequest
from kvgate.scheduling.router_config import KvRouterConfig
from kvgate.tokens import ModelTokenizer

WORKER = Endpoint("10.0.0.1:8000")


def chat(system: str, question: str) -> dict[str, object]:
    return {
        "model": "m",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
    }


def long_text(topic: str) -> str:
    return " ".join(f"{topic} rule {i}: keep block {i * 7} near worker {i % 5}." for i in range(80))


@pytest.fixture
def tokenizer(qwen3_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.load(str(qwen3_dir))  # its own segment cache: starts cold


async def test_warm_prompts_tokenize_on_the_loop_while_the_thread_is_busy(
    tokenizer: ModelTokenizer,
) -> None:
    scorer = KvAwareScorer("kv", KvRouterConfig(block_size=16), tokenizer)
    try:
        system = long_text("routing")
        first = LLMRequest("first", "m", "chat", chat(system, "What is rule 3?"), {})
        await scorer.prepare(first, [WORKER])
        assert first.tokens == tokenizer.tokenize_request(first.body, "chat")
        executor = scorer._executor
        assert executor is not None, "a long uncached prompt is encoded in the tokenizer thread"

        gate = threading.Event()
        busy = executor.submit(gate.wait, 10)
        try:
            # Same system prompt, new question: only the question is left to encode.
            warm = LLMRequest("warm", "m", "chat", chat(system, "And rule 9?"), {})
            await asyncio.wait_for(scorer.prepare(warm, [WORKER]), 5)
            assert warm.tokens == tokenizer.tokenize_request(warm.body, "chat")
            # A new long prompt needs the thread, so it waits for it.
            cold_body = chat(long_text("eviction"), "What is rule 3?")
            cold = LLMRequest("cold", "m", "chat", cold_body, {})
            pending = asyncio.create_task(scorer.prepare(cold, [WORKER]))
            await asyncio.sleep(0.2)
            assert not pending.done()
        finally:
            gate.set()
        assert busy.result(5)
        await asyncio.wait_for(pending, 5)
        assert cold.tokens == tokenizer.tokenize_request(cold_body, "chat")
    finally:
        scorer.close()
