"""Admission without workers that answer: zero endpoints, and sheddable requests when the pool
looks saturated (metrics that never arrive are stale, and stale endpoints count as saturated)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from kvgate.extproc.epp import EppOptions
from kvgate.extproc.epp_runtime import EppRuntime, EppSettings
from tests.extproc.utils import SEED_CONFIG, ExtProcStream, chat_body


def settings(qwen3_dir: Path, endpoints: str) -> EppSettings:
    return EppSettings(
        bind="127.0.0.1",
        grpc_port=0,
        health_port=0,
        metrics_port=0,
        secure=False,
        config_text=SEED_CONFIG,
        endpoints=endpoints,
        tokenizer=str(qwen3_dir),
        options=EppOptions(priorities={"batch": -1, "chat": 2}),
        env={"DYNAMO_KV_BLOCK_SIZE": "16"},
    )


@pytest_asyncio.fixture
async def channel_for(qwen3_dir: Path) -> AsyncIterator[object]:
    runtimes: list[tuple[EppRuntime, grpc.aio.Channel]] = []

    async def make(endpoints: str) -> grpc.aio.Channel:
        runtime = EppRuntime(settings(qwen3_dir, endpoints))
        await runtime.__aenter__()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{runtime.bound_ports['grpc']}")
        runtimes.append((runtime, channel))
        return channel

    yield make
    for runtime, channel in runtimes:
        await channel.close()
        await runtime.__aexit__(None, None, None)


@pytest.mark.slow
async def test_zero_endpoints_serves_and_answers_503(channel_for) -> None:  # type: ignore[no-untyped-def]
    channel = await channel_for("")
    stream = ExtProcStream(channel)
    routed = await stream.route(chat_body("anyone there?"))
    await stream.close()
    assert routed.immediate_status == 503


@pytest.mark.slow
async def test_sheddable_request_dropped_when_saturated(channel_for) -> None:  # type: ignore[no-untyped-def]
    # Nothing listens on these ports: their metrics are stale, so the pool counts as saturated.
    channel = await channel_for("127.0.0.1:9,127.0.0.1:19")
    shed = ExtProcStream(channel)
    routed = await shed.route(chat_body("bulk job"), {"x-gateway-inference-objective": "batch"})
    await shed.close()
    assert routed.immediate_status == 429
    kept = ExtProcStream(channel)
    routed = await kept.route(chat_body("interactive"), {"x-gateway-inference-objective": "chat"})
    await kept.close()
    assert routed.destination in {"127.0.0.1:9", "127.0.0.1:19"}
