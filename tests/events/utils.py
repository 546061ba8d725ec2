"""Shared helpers for the event tests: a recording sink and a bounded wait."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from kvgate.events.types import KvEvent


@dataclass
class RecordingSink:
    """Records every call in order; `fail_on` makes apply_event raise for matching events."""

    calls: list[tuple[str, str, KvEvent | None]] = field(default_factory=list)
    fail_on: Callable[[KvEvent], bool] | None = None

    def apply_event(self, worker: str, event: KvEvent) -> None:
        if self.fail_on is not None and self.fail_on(event):
            raise RuntimeError("sink refuses this event")
        self.calls.append(("apply", worker, event))

    def clear_worker(self, worker: str) -> None:
        self.calls.append(("clear", worker, None))

    def events(self, worker: str) -> list[KvEvent]:
        return [e for kind, w, e in self.calls if kind == "apply" and w == worker and e]

    def clears(self, worker: str) -> int:
        return sum(1 for kind, w, _ in self.calls if kind == "clear" and w == worker)


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `condition` until true; fail the test after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.002)
