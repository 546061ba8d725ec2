from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
import zmq

from kvgate.sim.engine import Engine, EngineConfig
from kvgate.sim.http import SimWorker, WorkerConfig
from kvgate.sim.prompts import TokensCodec, output_vocabulary
from kvgate.sim.timing import PolynomialTiming
from tests.sim.utils import MODEL, WorkerFactory

# Big enough for the tests' prompts, small enough that eviction tests fill it quickly.
TEST_ENGINE = EngineConfig(num_gpu_blocks=512, max_model_len=4096)


@pytest.fixture(scope="session")
def codec(qwen3_dir: Path) -> TokensCodec:
    return TokensCodec.load(str(qwen3_dir))


@pytest.fixture(scope="session")
def vocab(codec: TokensCodec) -> dict[int, str]:
    return output_vocabulary(codec)


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.term()


@pytest.fixture
def make_worker(
    codec: TokensCodec, vocab: dict[int, str], zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> WorkerFactory:
    """``async with make_worker(engine=..., speedup=..., **WorkerConfig fields) as worker``."""

    @asynccontextmanager
    async def factory(
        engine: EngineConfig = TEST_ENGINE, speedup: float = 20.0, **config: object
    ) -> AsyncIterator[SimWorker]:
        worker = SimWorker(
            Engine(engine, PolynomialTiming(speedup=speedup), tuple(vocab)),
            codec,
            WorkerConfig(model=MODEL, **config),  # type: ignore[arg-type]
            token_text=vocab,
            zmq_context=zmq_context,
        )
        async with worker:
            yield worker

    return factory


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session
