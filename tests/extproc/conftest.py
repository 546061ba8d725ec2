from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from kvgate.extproc.epp import EppOptions
from kvgate.extproc.epp_runtime import EppRuntime, EppSettings
from kvgate.sim.engine import EngineConfig
from kvgate.sim.fleet import Fleet, FleetConfig
from kvgate.sim.prompts import TokensCodec
from kvgate.sim.timing import PolynomialTiming

REPO = Path(__file__).resolve().parents[2]
SEED_CONFIG = (REPO / "deploy" / "config" / "epp-config-dynamo.yaml").read_text()
MODEL = "Qwen/Qwen3-0.6B"


def loopback_epp_settings(
    qwen3_dir: Path, endpoints_file: Path, env: dict[str, str] | None = None
) -> EppSettings:
    """The seed's config on loopback, plaintext, system-chosen ports, block size 16, seed 7."""
    return EppSettings(
        bind="127.0.0.1",
        grpc_port=0,
        health_port=0,
        metrics_port=0,
        secure=False,
        config_text=SEED_CONFIG,
        endpoints_file=endpoints_file,
        model=MODEL,
        tokenizer=str(qwen3_dir),
        options=EppOptions(max_body_bytes=1_000_000, served_model=MODEL),
        env={"DYNAMO_KV_BLOCK_SIZE": "16", **(env or {})},
        seed=7,
    )


@dataclass
class Stack:
    fleet: Fleet
    runtime: EppRuntime
    channel: grpc.aio.Channel
    endpoints_file: Path

    @property
    def addresses(self) -> list[str]:
        return [w.url.removeprefix("http://") for w in self.fleet.workers]

    def write_endpoints(self, workers: list[int] | None = None) -> None:
        chosen = range(len(self.fleet.workers)) if workers is None else workers
        entries = []
        for i in chosen:
            w = self.fleet.workers[i]
            entries.append(
                {
                    "address": w.url.removeprefix("http://"),
                    "instance_id": w.instance_id,
                    "events": w.events_endpoint,
                    "replay": w.replay_endpoint,
                }
            )
        self.endpoints_file.write_text(json.dumps(entries))

    async def wait_endpoints(self, count: int, timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.runtime.endpoints) != count:
            assert asyncio.get_running_loop().time() < deadline, "endpoint set did not update"
            await asyncio.sleep(0.05)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    codec = TokensCodec.load(str(qwen3_dir))
    config = FleetConfig(
        workers=3,
        base_port=0,
        events_base_port=0,
        replay_base_port=0,
        model=MODEL,
        engine=EngineConfig(num_gpu_blocks=2048, max_model_len=8192),
        timing=PolynomialTiming(speedup=50.0),
    )
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
