"""The message bus replica sync runs over, as an interface: NATS in production
(`kvgate.sync.nats_bus`), an in-process broker in tests (`kvgate.sync.memory_bus`).

Semantics are core NATS': a message published on a subject reaches every *other* connection
subscribed to it (no echo), at most once, in the order its publisher sent it; nothing is stored.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

Handler = Callable[[bytes], None]
"""Called with each payload received on a subscribed subject, on the event loop."""


class Bus(Protocol):
    """A connected bus. It reconnects by itself, telling its `BusListener`."""

    @property
    def max_payload(self) -> int:
        """Largest payload the server accepts, in bytes."""
        ...

    @property
    def is_connected(self) -> bool: ...

    async def publish(self, subject: str, payload: bytes) -> None:
        """Send (buffered); raises when the connection is gone."""
        ...

    async def subscribe(self, subject: str, handler: Handler) -> None: ...

    async def flush(self, timeout_s: float) -> None:
        """Wait until what was published reached the server."""
        ...

    async def close(self) -> None: ...


class BusListener(Protocol):
    """What the bus tells its user about the connection."""

    async def on_disconnected(self) -> None: ...

    async def on_reconnected(self) -> None: ...

    async def on_error(self, err: Exception) -> None: ...


Connect = Callable[[BusListener], Awaitable[Bus]]
"""Connects, however long the server takes to answer (failures go to ``on_error``); raises only
for what retrying cannot fix, e.g. a refused login."""
