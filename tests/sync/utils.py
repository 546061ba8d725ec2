"""Builders for the replica-sync tests: replicas that book like the kv-aware-scorer, on a real
NATS server or on an in-memory broker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from kvgate.scheduling.kv_router import KvRouter
from kvgate.scheduling.router_config import KvRouterConfig
from kvgate.sync import ReplicaSync, ReplicaSyncConfig
from kvgate.sync.bus import Connect
from kvgate.sync.config import DEFAULT_NATS_URL

SUBJECT = "kvgate.test.active_sequences"
SCORER = "dyn-kv"

Load = dict[str, tuple[int, int, int]]
"""Per worker: (pending prefill tokens, active blocks, requests in flight)."""


def sync_config(
    router_id: str,
    nats_url: str = DEFAULT_NATS_URL,
    *,
    heartbeat_s: float = 0.2,
    lease_s: float = 0.8,
    snapshot_min_interval_s: float = 0.05,
) -> ReplicaSyncConfig:
    return ReplicaSyncConfig(
        nats_url=nats_url,
        subject=SUBJECT,
        router_id=router_id,
        heartbeat_s=heartbeat_s,
        lease_s=lease_s,
        snapshot_min_interval_s=snapshot_min_interval_s,
    )


class Replica:
    """A router plus its sync, booking like the kv-aware-scorer does."""

    def __init__(self, config: ReplicaSyncConfig, connect: Connect | None = None) -> None:
        self.router = KvRouter(KvRouterConfig(block_size=16))
        self.sync = ReplicaSync({SCORER: self.router}, config, connect=connect)

    def add(self, request_id: str, worker: str, hashes: list[int], prefill: int) -> None:
        self.router.book_key(request_id, worker, hashes, prefill, time.monotonic())
        self.sync.added(SCORER, request_id, worker, hashes, prefill)

    def prefill_done(self, request_id: str) -> None:
        assert self.router.mark_prefill_complete(request_id)
        self.sync.prefill_completed(SCORER, request_id)

    def free(self, request_id: str) -> None:
        assert self.router.free(request_id)
        self.sync.freed(SCORER, request_id)

    def load(self) -> Load:
        active = self.router.active
        workers = set(active.prefill) | set(active.blocks.per_worker)
        return {
            w: (active.prefill_tokens(w), active.active_blocks(w), active.in_flight(w))
            for w in workers
            if active.in_flight(w)
        }


@asynccontextmanager
async def started(*group: Replica) -> AsyncIterator[tuple[Replica, ...]]:
    """Start every replica's sync, wait until each is connected, close them all at the end."""
    for replica in group:
        await replica.sync.start()
    try:
        for replica in group:
            await replica.sync.wait_connected(10)
        yield group
    finally:
        for replica in group:
            await replica.sync.aclose()


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.01)


def peers_synced(replica: Replica, count: int) -> bool:
    peers = replica.sync.status()["peers"]
    return len(peers) == count and all(p["synced"] for p in peers.values())
