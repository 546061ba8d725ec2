"""More requests in flight than Envoy's default circuit breakers allow (1,024 per cluster): each
one holds an ext_proc stream to the picker for as long as it lasts, so the picker's cluster must
take as many streams as the workers' (found by the soak: past 1,024 the ext_proc streams
overflowed and, failing closed, every further request got a 500)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from kvgate.gateway.local import LocalGateway, LocalGatewayConfig, free_port
from tests.gateway.utils import MODEL

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

IN_FLIGHT = 1200


def test_more_requests_in_flight_than_envoys_default_circuit_breakers(
    qwen3_dir: Path, tmp_path: Path
) -> None:
    # Engine time slowed 20 times: each short answer takes over a second, so all of them are in
    # flight together without much work for this machine.
    config = LocalGatewayConfig(
        workers=2, port=free_port(), tokenizer=str(qwen3_dir), speedup=0.05, run_dir=tmp_path,
    )  # fmt: skip

    async def burst(url: str) -> Counter[int | str]:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def one() -> int | str:
                try:
                    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                        await resp.read()
                        return resp.status
                except aiohttp.ClientError as err:
                    return type(err).__name__

            return Counter(await asyncio.gather(*(one() for _ in range(IN_FLIGHT))))

    with LocalGateway(config) as running:
        statuses = asyncio.run(burst(running.url))
    assert statuses == {200: IN_FLIGHT}, statuses
