"""The fleet in process: ports, lines, identity."""

from __future__ import annotations

import asyncio
import socket
import threading

import aiohttp
import pytest
import zmq

from kvgate.sim.engine import EngineConfig
from kvgate.sim.fleet import Fleet, FleetConfig
from kvgate.sim.http import INSTANCE_HEADER, WORKER_HEADER
from kvgate.sim.prompts import TokensCodec
from kvgate.sim.publisher import KvEventPublisher
from kvgate.sim.timing import PolynomialTiming
from tests.sim.utils import WORKER_LINE


def test_ports_follow_the_bases() -> None:
    config = FleetConfig(workers=3, base_port=9000, events_base_port=6000, instance_id_base=70)
    worker = config.worker(2)
    assert (worker.port, worker.events_port, worker.replay_port) == (9002, 6002, 6005)
    assert worker.instance_id == 72
    free = FleetConfig(workers=2, base_port=0, events_base_port=0).worker(1)
    assert (free.port, free.events_port, free.replay_port) == (0, 0, 0)
    off = FleetConfig(workers=2, events_base_port=None).worker(1)
    assert (off.events_port, off.replay_port) == (None, None)
    with pytest.raises(ValueError, match="workers"):
        FleetConfig(workers=0)
    with pytest.raises(ValueError, match="port base"):
        FleetConfig(workers=4, base_port=65534)


async def test_fleet_workers_are_distinct(codec: TokensCodec) -> None:
    config = FleetConfig(
        workers=3,
        base_port=0,
        events_base_port=0,
        engine=EngineConfig(num_gpu_blocks=256, max_model_len=2048),
        timing=PolynomialTiming(speedup=50),
    )
    async with Fleet(config, codec) as fleet, aiohttp.ClientSession() as http:
        lines = fleet.describe()
        seen = set()
        for line in lines:
            match = WORKER_LINE.fullmatch(line)
            assert match, line
            url, instance = match.group(2), match.group(5)
            body = {"prompt": "hello", "max_tokens": 2}
            async with http.post(url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                assert resp.headers[INSTANCE_HEADER] == instance
                seen.add(resp.headers[WORKER_HEADER])
    assert len(seen) == 3
    assert fleet.workers == []


async def test_a_taken_replay_port_fails_the_start_and_releases_every_socket(
    codec: TokensCodec,
) -> None:
    # The events port binds, the replay port is taken: the start must fail promptly and leave
    # no socket open (an open one made the context's shutdown wait forever under `kvgate up`).
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        replay_port = taken.getsockname()[1]
        config = FleetConfig(
            workers=1,
            base_port=0,
            events_base_port=0,
            replay_base_port=replay_port,
            engine=EngineConfig(num_gpu_blocks=256, max_model_len=2048),
            timing=PolynomialTiming(speedup=50),
        )
        with pytest.raises(zmq.ZMQError, match="Address already in use"):
            await asyncio.wait_for(Fleet(config, codec).__aenter__(), timeout=10)


def test_a_publisher_whose_replay_bind_fails_closes_its_pub_socket() -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(zmq.ZMQError):
            KvEventPublisher(
                context, "tcp://127.0.0.1:*", "t", replay_endpoint=f"tcp://127.0.0.1:{port}"
            )
    # term() returns only once every socket of the context is closed.
    done = threading.Event()
    threading.Thread(target=lambda: (context.term(), done.set()), daemon=True).start()
    assert done.wait(5), "a socket of the failed publisher is still open"
