"""Simulated vLLM-compatible engine: the model and its virtual-time driver.

The engine model (scheduler, paged prefix cache, step timing) is pure Python with no I/O and is
exported here. The protocol adapters import aiohttp and pyzmq and live in their own modules:
`kvgate.sim.http` (one worker's HTTP API), `kvgate.sim.publisher` (ZMQ KV events and replay),
`kvgate.sim.fleet` (N workers in one loop, run by ``kvgate sim``).
"""

from kvgate.sim.blocks import BlockTable, PrefixCache, block_id
from kvgate.sim.clock import Clock, VirtualClock, WallClock
from kvgate.sim.engine import (
    ContextLengthError,
    Engine,
    EngineConfig,
    FinishReason,
    SimRequest,
    StepResult,
)
from kvgate.sim.stats import EngineStats, Histogram
from kvgate.sim.timing import BatchShape, LinearTiming, PolynomialTiming, StepTiming
from kvgate.sim.virtual import StepObserver, VirtualDriver
from kvgate.sim.wire import EventLayout, encode_batch

__all__ = [
    "BatchShape",
    "BlockTable",
    "Clock",
    "ContextLengthError",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "EventLayout",
    "FinishReason",
    "Histogram",
    "LinearTiming",
    "PolynomialTiming",
    "PrefixCache",
    "SimRequest",
    "StepObserver",
    "StepResult",
    "StepTiming",
    "VirtualClock",
    "VirtualDriver",
    "WallClock",
    "block_id",
    "encode_batch",
]
