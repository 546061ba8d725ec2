"""`kvgate.sync.bus.Bus` over a NATS server (nats-py), as replica sync uses it in production."""

from __future__ import annotations

import asyncio
from typing import Any

from kvgate.sync.bus import BusListener, Handler
from kvgate.sync.config import ReplicaSyncConfig

_DEFAULT_MAX_PAYLOAD = 1 << 20


class NatsBus:
    def __init__(self, client: Any) -> None:
        self._nc = client

    @property
    def max_payload(self) -> int:
        return int(getattr(self._nc, "max_payload", 0) or _DEFAULT_MAX_PAYLOAD)

    @property
    def is_connected(self) -> bool:
        return bool(self._nc.is_connected)

    async def publish(self, subject: str, payload: bytes) -> None:
        await self._nc.publish(subject, payload)

    async def subscribe(self, subject: str, handler: Handler) -> None:
        async def deliver(msg: Any) -> None:
            handler(msg.data)

        await self._nc.subscribe(subject, cb=deliver)

    async def flush(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._nc.flush(), timeout_s)

    async def close(self) -> None:
        await self._nc.close()


async def connect_nats(config: ReplicaSyncConfig, listener: BusListener) -> NatsBus:
    """A connection that retries for ever and reconnects by itself (see `kvgate.sync.bus`)."""
    import nats  # only replicas that sync pay for importing it

    client = await nats.connect(
        servers=[config.nats_url],
        name=f"kvgate-epp {config.router_id}",
        no_echo=True,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=config.connect_timeout_s,
        ping_interval=max(1, int(config.lease_s)),
        max_outstanding_pings=2,
        disconnected_cb=listener.on_disconnected,
        reconnected_cb=listener.on_reconnected,
        error_cb=listener.on_error,
    )
    return NatsBus(client)
