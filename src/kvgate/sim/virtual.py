"""Discrete-event driver: many engines in virtual time, no sleeping, no sockets.

Everything that happens is an entry on one heap ordered by (time, insertion order): callbacks
scheduled with `call_at` (request arrivals, a router's timers) and engine step ends. Ties are
broken by insertion order only, never by object identity or hashing, so a run is reproducible
bit for bit.

An engine with work steps at time t: `Engine.step(t)` computes the step and its duration d; at
t + d its result is delivered to ``on_step`` (tokens, finishes, KV events become visible then) and
the next step starts at t + d, after anything else already queued for that instant (so requests
arriving exactly at a step boundary join that step, as they would on a real engine).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from itertools import count

from kvgate.sim.clock import VirtualClock
from kvgate.sim.engine import Engine, SimRequest, StepResult

StepObserver = Callable[[int, StepResult], None]
"""Called with (engine index, result) at the virtual time the step ends."""

# A heap entry's payload: a callback, a step to start (None) or a step result to deliver.
_Payload = Callable[[], None] | StepResult | None


class VirtualDriver:
    def __init__(
        self,
        engines: Sequence[Engine],
        clock: VirtualClock | None = None,
        on_step: StepObserver | None = None,
    ) -> None:
        self.engines = list(engines)
        self.clock = clock or VirtualClock()
        self.on_step = on_step
        self._heap: list[tuple[float, int, int, _Payload]] = []
        self._seq = count()
        self._busy = [False] * len(self.engines)

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` when virtual time reaches ``when`` (not before now)."""
        self._push(max(when, self.clock.now()), -1, callback)

    def submit(self, engine_index: int, request: SimRequest) -> None:
        """Give ``request`` to an engine now; it starts stepping if it was idle."""
        engine = self.engines[engine_index]
        now = self.clock.now()
        engine.add_request(request, now)
        if not self._busy[engine_index]:
            self._busy[engine_index] = True
            self._push(now, engine_index, None)

    def run(self, until: float | None = None) -> None:
        """Process events in time order until none is left (or the next is after ``until``)."""
        heap = self._heap
        clock = self.clock
        while heap:
            when = heap[0][0]
            if until is not None and when > until:
                clock.advance_to(until)
                return
            _, _, index, payload = heapq.heappop(heap)
            clock.advance_to(when)
            if isinstance(payload, StepResult):
                if self.on_step is not None:
                    self.on_step(index, payload)
                self._push(when, index, None)
            elif payload is None:
                self._start_step(index, when)
            else:
                payload()

    def _start_step(self, index: int, now: float) -> None:
        engine = self.engines[index]
        if not engine.has_work:
            self._busy[index] = False
            return
        result = engine.step(now)
        if result.idle:
            # A waiting or running request always gets tokens in a step; stepping again would
            # spin forever at the same instant, so say so instead.
            raise RuntimeError(f"engine {index} has requests but scheduled none at t={now}")
        self._push(result.end, index, result)

    def _push(self, when: float, index: int, payload: _Payload) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), index, payload))
