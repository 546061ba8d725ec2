"""Time sources for the simulated engine.

The engine itself never reads a clock: every call that depends on time takes ``now`` as an
argument. A *driver* owns a clock and feeds it in. `WallClock` is what the HTTP server uses;
`VirtualClock` is advanced by hand (by `kvgate.sim.virtual.VirtualDriver`, or a test), so a
simulation of hours of traffic runs as fast as the CPU allows and repeats exactly.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """Seconds on a monotonic time line, and a way to wait on it."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class WallClock:
    """Real time (``time.monotonic``); `sleep` yields to the event loop."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class VirtualClock:
    """Time that moves only when told to.

    `sleep` advances the clock instantly, which is exact for a single coroutine driving one
    engine (the runner of `kvgate.sim.runner` under test). Several concurrent sleepers would each
    advance the shared time line, so multi-engine simulations use `VirtualDriver`, which orders
    everything on one event heap and calls `advance_to` itself.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance_to(self, when: float) -> None:
        if when < self._now:
            raise ValueError(f"virtual time cannot go back from {self._now} to {when}")
        self._now = when

    async def sleep(self, seconds: float) -> None:
        self._now += max(0.0, seconds)
        # Still a scheduling point, so other tasks (HTTP handlers in a test) get to run.
        await asyncio.sleep(0)
