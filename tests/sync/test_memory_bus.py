"""ReplicaSync over the in-memory broker: the protocol's behaviour in milliseconds, no server.
(`test_replica_sync.py` runs the same kind of scenarios through a real nats-server.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from kvgate.sync.memory_bus import MemoryBroker
from kvgate.sync.messages import Deltas, SyncRequest, decode
from tests.sync.utils import SUBJECT, Replica, eventually, peers_synced, started, sync_config


@asynccontextmanager
async def replicas(broker: MemoryBroker, *names: str) -> AsyncIterator[tuple[Replica, ...]]:
    group = (
        Replica(
            sync_config(name, heartbeat_s=0.05, lease_s=0.4, snapshot_min_interval_s=0.01),
            connect=broker.connect,
        )
        for name in names
    )
    async with started(*group) as replicas:
        yield replicas


def sync_requests(broker: MemoryBroker) -> list[SyncRequest]:
    messages = (decode(payload) for _, payload in broker.published)
    return [m for m in messages if isinstance(m, SyncRequest)]


async def test_three_replicas_each_see_the_sum_of_all_loads() -> None:
    broker = MemoryBroker()
    async with replicas(broker, "A", "B", "C") as (a, b, c):
        await eventually(lambda: all(peers_synced(r, 2) for r in (a, b, c)))
        a.add("r1", "w1", [1, 2, 3], 48)
        b.add("r2", "w1", [1, 2, 4], 32)
        c.add("r3", "w2", [9], 16)
        expected = {"w1": (80, 4, 2), "w2": (16, 1, 1)}
        await eventually(lambda: a.load() == b.load() == c.load() == expected)
        a.prefill_done("r1")
        c.free("r3")
        await eventually(lambda: a.load() == b.load() == c.load() == {"w1": (32, 4, 2)})
        a.free("r1")
        b.free("r2")
        await eventually(lambda: a.load() == b.load() == c.load() == {})
        assert a.sync.status()["peers"]["B"]["in_flight"] == 0


async def test_a_lost_delta_asks_its_sender_for_a_snapshot_that_repairs_the_copy() -> None:
    broker = MemoryBroker()
    async with replicas(broker, "A", "B") as (a, b):
        await eventually(lambda: peers_synced(b, 1))
        lost: list[int] = []

        def lose_first_delta(subject: str, payload: bytes) -> bool:
            message = decode(payload)
            if not lost and isinstance(message, Deltas) and message.router == "A":
                lost.append(message.seq)
                return True
            return False

        broker.drop_if = lose_first_delta
        a.add("lost", "w5", [5], 16)
        await eventually(lambda: bool(lost))
        asked_before = len(sync_requests(broker))
        a.add("r1", "w1", [1], 16)
        # B sees seq lost+1 after lost-1: a gap. It asks A (by name) for a snapshot ...
        await eventually(lambda: b.sync.metrics.gaps._value.get() == 1)
        await eventually(lambda: len(sync_requests(broker)) > asked_before)
        assert SyncRequest("B", "A") in sync_requests(broker)[asked_before:]
        # ... which brings back the booking that only the lost message carried.
        await eventually(lambda: b.load() == {"w1": (16, 1, 1), "w5": (16, 1, 1)})
        assert peers_synced(b, 1)


async def test_a_silent_replica_is_dropped_with_its_bookings_when_its_lease_runs_out() -> None:
    broker = MemoryBroker()
    async with replicas(broker, "A", "B", "C") as (a, b, c):
        c.add("c1", "w1", [1], 16)
        c.add("c2", "w2", [2], 16)
        a.add("a1", "w1", [7], 32)
        await eventually(lambda: b.load() == {"w1": (48, 2, 2), "w2": (16, 1, 1)})
        broker.partition(c.sync)
        # No bye: A and B hear nothing more from C and drop it after the lease (0.4 s) ...
        await eventually(lambda: "C" not in b.sync.status()["peers"], timeout_s=2.0)
        await eventually(lambda: "C" not in a.sync.status()["peers"], timeout_s=2.0)
        assert b.load() == {"w1": (32, 1, 1)}
        assert a.sync.metrics.peers_expired._value.get() == 1
        # ... while the live peers, heartbeating all along, keep each other.
        assert peers_synced(a, 1) and peers_synced(b, 1)


async def test_a_replica_that_closes_says_bye_and_takes_its_load_along() -> None:
    broker = MemoryBroker()
    async with replicas(broker, "A") as (a,):
        async with replicas(broker, "B") as (b,):
            b.add("r1", "w1", [1], 16)
            await eventually(lambda: a.load() == {"w1": (16, 1, 1)})
        assert a.load() == {}  # delivered synchronously: gone at once
        assert a.sync.metrics.peers_expired._value.get() == 0
        assert SUBJECT in {subject for subject, _ in broker.published}
