"""A fleet of simulated workers in one process and one event loop.

Worker i serves HTTP on ``base_port + i``, publishes KV events on ``events_base_port + i`` and
answers replay on ``replay_base_port + i`` (a base of 0 gives every worker a free port). All
workers share one tokenizer, one output vocabulary and one ZMQ context (one I/O thread), so a
worker costs an engine, two sockets and an idle task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from kvgate.sim.engine import Engine, EngineConfig
from kvgate.sim.http import SimWorker, WorkerConfig
from kvgate.sim.prompts import PromptCodec, output_vocabulary
from kvgate.sim.timing import PolynomialTiming, StepTiming
from kvgate.sim.wire import EventLayout


@dataclass(frozen=True, slots=True)
class FleetConfig:
    workers: int = 1
    base_port: int = 8000
    host: str = "127.0.0.1"
    model: str = "Qwen/Qwen3-0.6B"
    tokenizer: str = ""
    events_base_port: int | None = 5557
    """None disables KV events."""
    replay_base_port: int | None = None
    """None: right after the event ports (``events_base_port + workers``), or free ports if
    events use free ports."""
    event_layout: EventLayout = "map"
    instance_id_base: int | None = None
    """Worker i gets instance id ``instance_id_base + i``; None: its HTTP port."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    timing: StepTiming = field(default_factory=PolynomialTiming)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        bases = (self.base_port, self.events_base_port, self.replay_base_port)
        for base in bases:
            if base is not None and not 0 <= base <= 65535 - self.workers:
                raise ValueError(f"port base {base} leaves no room for {self.workers} workers")

    def worker(self, index: int) -> WorkerConfig:
        def port(base: int | None) -> int | None:
            return None if base is None else (base and base + index)

        replay_base = self.replay_base_port
        if replay_base is None and self.events_base_port is not None:
            replay_base = self.events_base_port and self.events_base_port + self.workers
        return WorkerConfig(
            model=self.model,
            tokenizer=self.tokenizer,
            host=self.host,
            port=self.base_port and self.base_port + index,
            instance_id=None if self.instance_id_base is None else self.instance_id_base + index,
            events_port=port(self.events_base_port),
            replay_port=None if self.events_base_port is None else port(replay_base),
            event_layout=self.event_layout,
        )


class Fleet:
    """Starts and stops the workers of a `FleetConfig`; ``async with Fleet(...) as fleet``."""

    def __init__(self, config: FleetConfig, codec: PromptCodec) -> None:
        self.config = config
        self.codec = codec
        self.workers: list[SimWorker] = []
        self._zmq = zmq.Context()

    async def __aenter__(self) -> Fleet:
        vocab = output_vocabulary(self.codec)
        try:
            for i in range(self.config.workers):
                engine = Engine(self.config.engine, self.config.timing, tuple(vocab))
                worker = SimWorker(
                    engine,
                    self.codec,
                    self.config.worker(i),
                    token_text=vocab,
                    zmq_context=self._zmq,
                )
                # Listed before starting, so a failed start is cleaned up with the rest.
                self.workers.append(worker)
                await worker.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers))
        self.workers.clear()
        # destroy, not term: a socket still open somewhere must not hang shutdown.
        self._zmq.destroy(linger=0)

    def describe(self) -> list[str]:
        """One line per worker: index, URL, events and replay endpoints, instance id, topic."""
        return [
            f"worker {i} url={w.url} events={w.events_endpoint or '-'} "
            f"replay={w.replay_endpoint or '-'} instance_id={w.instance_id} topic={w.topic}"
            for i, w in enumerate(self.workers)
        ]


async def serve(
    config: FleetConfig, codec: PromptCodec, announce: Callable[[str], None], stop: asyncio.Event
) -> None:
    """Run a fleet until ``stop`` is set, announcing each worker and then ``ready``."""
    async with Fleet(config, codec) as fleet:
        for line in fleet.describe():
            announce(line)
        announce(f"ready workers={len(fleet.workers)}")
        await stop.wait()
