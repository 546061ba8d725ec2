"""Runs an `Engine` on a clock inside an asyncio loop and hands tokens to waiting handlers.

The loop is: while there is work, ``step(now)``, sleep for the step's duration, then deliver the
step's outputs to each request's `TokenStream` and its KV events to the publisher. Requests that
arrive during the sleep join the next step, as on a real engine. Many runners share one event
loop; each costs nothing while idle.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from kvgate.events.types import KvEvent
from kvgate.sim.clock import Clock
from kvgate.sim.engine import Engine, FinishReason, SimRequest

EventSink = Callable[[list[KvEvent]], object]
"""Receives each non-empty list of KV events, when they take effect (one call per step)."""


class TokenStream:
    """One request's tokens as the engine produces them; a single consumer awaits `next`.

    A deque plus a future created only while the consumer waits, rather than an
    ``asyncio.Queue``: the server pushes one item per request per step, the hottest path of a
    streamed load. With ``wake_each`` false (non-streamed responses) the consumer is woken once,
    at the finish, instead of once per token.
    """

    __slots__ = ("_items", "_waiter", "_wake_each", "request")

    def __init__(self, request: SimRequest, wake_each: bool = True) -> None:
        self.request = request
        self._items: deque[tuple[int, FinishReason | None]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._wake_each = wake_each

    def push(self, token_id: int, finish_reason: FinishReason | None) -> None:
        self._items.append((token_id, finish_reason))
        waiter = self._waiter
        if waiter is not None and (self._wake_each or finish_reason) and not waiter.done():
            waiter.set_result(None)

    async def next(self) -> tuple[int, FinishReason | None]:
        """The next (token id, finish reason); token id -1 with "abort" if the engine dropped
        the request."""
        while not self._items or not (self._wake_each or self._items[-1][1]):
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class EngineRunner:
    def __init__(self, engine: Engine, clock: Clock, on_events: EventSink | None = None) -> None:
        self.engine = engine
        self.clock = clock
        self.on_events = on_events
        self._streams: dict[str, TokenStream] = {}
        self._wakeup = asyncio.Event()

    def submit(self, request: SimRequest, wake_each: bool = True) -> TokenStream:
        """Queue a request (raises ValueError if the engine refuses it) and return its stream."""
        self.engine.add_request(request, self.clock.now())
        stream = TokenStream(request, wake_each)
        self._streams[request.request_id] = stream
        self._wakeup.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request whose client went away; its blocks return to the cache."""
        self._streams.pop(request_id, None)
        self.engine.abort(request_id, self.clock.now())

    def reset_prefix_cache(self) -> bool:
        ok = self.engine.reset_prefix_cache()
        self._emit(self.engine.take_events())
        return ok

    async def run(self) -> None:
        """Step until cancelled; on the way out, end every open stream with "abort"."""
        engine = self.engine
        clock = self.clock
        try:
            while True:
                if not engine.has_work:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                result = engine.step(clock.now())
                if result.idle:
                    raise RuntimeError("engine has requests but scheduled none")
                await clock.sleep(result.end - clock.now())
                streams = self._streams
                for req in result.outputs:
                    reason = req.finish_reason
                    # A client may have gone (`abort`) while this step ran.
                    stream = (
                        streams.pop(req.request_id, None) if reason else streams.get(req.request_id)
                    )
                    if stream is not None:
                        stream.push(req.token_ids[-1], reason)
                self._emit(result.events)
        finally:
            for request_id, stream in list(self._streams.items()):
                engine.abort(request_id, clock.now())
                stream.push(-1, "abort")
            self._streams.clear()

    def _emit(self, events: list[KvEvent]) -> None:
        if events and self.on_events is not None:
            self.on_events(events)
