from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from kvgate.extproc.epp_runtime import EppRuntime
from kvgate.sim.fleet import Fleet
from kvgate.sim.prompts import TokensCodec
from tests.extproc.utils import Stack, loopback_epp_settings, loopback_fleet_config


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    codec = TokensCodec.load(str(qwen3_dir))
    config = loopback_fleet_config(3)
    endpoints_file = tmp_path_factory.mktemp("epp") / "endpoints.json"
    async with Fleet(config, codec) as fleet:
        settings = loopback_epp_settings(qwen3_dir, endpoints_file)
        stack = Stack(fleet, None, None, endpoints_file)  # type: ignore[arg-type]
        stack.write_endpoints()
        async with EppRuntime(settings) as runtime:
            stack.runtime = runtime
            await stack.wait_endpoints(3)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{runtime.bound_ports['grpc']}")
            stack.channel = channel
            try:
                yield stack
            finally:
                await channel.close()
