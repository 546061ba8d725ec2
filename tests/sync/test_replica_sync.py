"""ReplicaSync between KV routers, through a real nats-server on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import pytest

from kvgate.scheduling.kv_router import KvRouter
from kvgate.scheduling.router_config import KvRouterConfig
from kvgate.sync import ReplicaSync, ReplicaSyncConfig
from kvgate.sync.messages import Add, Deltas, Heartbeat, encode
from tests.nats_harness import NatsServer
from tests.sync.utils import (
    SCORER,
    SUBJECT,
    Replica,
    eventually,
    peers_synced,
    started,
    sync_config,
)


def _config(server: NatsServer, router_id: str) -> ReplicaSyncConfig:
    return sync_config(router_id, server.url)


@asynccontextmanager
async def replicas(server: NatsServer, *names: str) -> AsyncIterator[tuple[Replica, ...]]:
    async with started(*(Replica(_config(server, name)) for name in names)) as group:
        yield group


@pytest.mark.nats
async def test_each_replica_sees_the_sum_of_both_loads(nats_server: NatsServer) -> None:
    async with replicas(nats_server, "A", "B") as (a, b):
        await eventually(lambda: peers_synced(a, 1) and peers_synced(b, 1))
        a.add("r1", "w1", [1, 2, 3], 48)
        b.add("r2", "w1", [1, 2, 4], 32)
        b.add("r3", "w2", [9], 16)
        expected = {"w1": (80, 4, 2), "w2": (16, 1, 1)}
        await eventually(lambda: a.load() == expected and b.load() == expected)
        # Own and remote keys never collide, even for the same request id.
        a.add("r3", "w2", [9], 16)
        await eventually(lambda: b.load()["w2"] == (32, 1, 2))
        assert a.load() == b.load()

        a.prefill_done("r1")
        b.free("r3")
        a.free("r3")
        expected = {"w1": (32, 4, 2)}
        await eventually(lambda: a.load() == expected and b.load() == expected)
        a.free("r1")
        b.free("r2")
        await eventually(lambda: a.load() == {} and b.load() == {})
        # Three kinds of op travel; nothing was dropped while connected.
        assert b.sync.metrics.dropped_ops._value.get() == 0
        sent = a.sync.metrics.ops
        assert sent.labels("sent", "add")._value.get() == 2
        assert sent.labels("sent", "prefill_done")._value.get() == 1
        assert sent.labels("sent", "free")._value.get() == 2


@pytest.mark.nats
async def test_late_joiner_gets_the_in_flight_state_at_once(nats_server: NatsServer) -> None:
    async with replicas(nats_server, "A", "B") as (a, b):
        for i in range(300):
            a.add(f"a{i}", f"w{i % 3}", list(range(i, i + 40)), 64)
        b.add("b0", "w0", [7, 8], 32)
        b.prefill_done("b0")
        await eventually(lambda: len(b.router.active) == 301)
        async with replicas(nats_server, "C") as (c,):
            loop = asyncio.get_running_loop()
            joined = loop.time()
            await eventually(lambda: len(c.router.active) == 301, timeout_s=1.0)
            assert loop.time() - joined < 1.0
            expected = a.load()
            assert c.load() == expected == b.load()
            assert c.router.active.prefill_tokens("w0") == 100 * 64  # b0's prefill is done


@pytest.mark.nats
async def test_a_replica_that_leaves_cleanly_takes_its_load_along(
    nats_server: NatsServer,
) -> None:
    async with replicas(nats_server, "A") as (a,):
        async with replicas(nats_server, "B") as (b,):
            b.add("r1", "w1", [1], 16)
            await eventually(lambda: a.load() == {"w1": (16, 1, 1)})
        # B said bye: gone at once, not after the lease.
        await eventually(lambda: a.load() == {}, timeout_s=0.5)
        assert a.sync.metrics.peers_expired._value.get() == 0


_CRASHING_REPLICA = textwrap.dedent(
    """
    import asyncio, sys, time
    from kvgate.scheduling.router_config import KvRouterConfig
    from kvgate.scheduling.kv_router import KvRouter
    from kvgate.sync import ReplicaSync, ReplicaSyncConfig

    async def main():
        router = KvRouter(KvRouterConfig(block_size=16))
        sync = ReplicaSync({"dyn-kv": router}, ReplicaSyncConfig(
            nats_url=sys.argv[1], subject=sys.argv[2], router_id="doomed",
            heartbeat_s=0.2, lease_s=0.8))
        await sync.start()
        await sync.wait_connected(10)
        for i in range(5):
            router.book_key(f"r{i}", "w1", [i], 16, time.monotonic())
            sync.added("dyn-kv", f"r{i}", "w1", [i], 16)
        print("booked", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


@pytest.mark.nats
async def test_a_replica_that_dies_is_dropped_after_its_lease(nats_server: NatsServer) -> None:
    async with replicas(nats_server, "A") as (a,):
        child = subprocess.Popen(
            [sys.executable, "-c", _CRASHING_REPLICA, nats_server.url, SUBJECT],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        try:
            assert child.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 30)
            assert line.strip() == b"booked"
            await eventually(lambda: a.load() == {"w1": (80, 5, 5)})
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            loop = asyncio.get_running_loop()
            killed = loop.time()
            await eventually(lambda: a.load() == {}, timeout_s=3.0)
            # No bye was said: the lease (0.8 s) decided, not the 300 s request expiry.
            assert loop.time() - killed < 2.0
            assert a.sync.metrics.peers_expired._value.get() == 1
            assert "doomed" not in a.sync.status()["peers"]
        finally:
            child.kill()
            child.wait(timeout=10)
            if child.stdout is not None:
                child.stdout.close()


@pytest.mark.nats
async def test_nats_outage_routing_goes_on_and_sync_resumes(nats_server: NatsServer) -> None:
    async with replicas(nats_server, "A", "B") as (a, b):
        a.add("r1", "w1", [1], 16)
        await eventually(lambda: b.load() == {"w1": (16, 1, 1)})

        nats_server.stop()
        await eventually(lambda: a.sync.state == b.sync.state == "disconnected")
        assert a.sync.metrics.connected._value.get() == 0
        # Local bookkeeping goes on (never waits for NATS); the changes are dropped and counted.
        a.add("r2", "w2", [2], 32)
        a.free("r1")
        assert a.load() == {"w2": (32, 1, 1)}
        assert a.sync.metrics.dropped_ops._value.get() >= 2
        # The peers' copies go with their leases.
        await eventually(lambda: b.load() == {}, timeout_s=3.0)
        status = b.sync.status()
        assert status["state"] == "disconnected" and status["peers"] == {}

        nats_server.start()
        await eventually(lambda: a.sync.state == b.sync.state == "connected", timeout_s=10)
        # Reconnected replicas exchange snapshots: B learns what A did during the outage.
        await eventually(lambda: b.load() == {"w2": (32, 1, 1)}, timeout_s=3.0)
        b.add("r9", "w3", [3], 16)
        await eventually(lambda: a.load() == b.load() == {"w2": (32, 1, 1), "w3": (16, 1, 1)})
        assert a.sync.disconnects >= 1


@pytest.mark.nats
async def test_starting_without_nats_routes_locally_and_joins_later(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "late-nats.log")
    a = Replica(_config(server, "A"))
    await a.sync.start()
    try:
        await eventually(lambda: a.sync.state == "disconnected" and a.sync.last_error is not None)
        a.add("r1", "w1", [1], 16)  # does not wait
        assert a.load() == {"w1": (16, 1, 1)}
        server.start()
        await a.sync.wait_connected(10)
        async with replicas(server, "B") as (b,):
            await eventually(lambda: b.load() == {"w1": (16, 1, 1)})
    finally:
        await a.sync.aclose()
        server.stop()


@pytest.mark.nats
async def test_malformed_and_foreign_messages_are_counted_and_ignored(
    nats_server: NatsServer,
) -> None:
    async with replicas(nats_server, "A", "B") as (a, b):
        a.add("r1", "w1", [1], 16)
        await eventually(lambda: b.load() == {"w1": (16, 1, 1)})
        before = b.load()
        garbage = [
            b"",
            b"\xff\xfe not msgpack",
            encode(Heartbeat("X", 1, 0))[:-3],  # truncated
            b"\x82\xa4type\xa5weird\xa6router\xa1X",  # unknown tag
            encode(Deltas("X", 1, []))[:5] + b"\x00" * 10,
        ]
        raw = await nats.connect(nats_server.url)
        try:
            for payload in garbage:
                await raw.publish(SUBJECT, payload)
            # Decodes, but names a scorer B does not run: not applied.
            await raw.publish(SUBJECT, encode(Deltas("X", 1, [Add("nope", "q", "w9", [5], 16)])))
            # Own router id echoed back (as a loop would): ignored.
            await raw.publish(SUBJECT, encode(Deltas("B", 1, [Add(SCORER, "q", "w9", [5], 16)])))
            await raw.flush()
        finally:
            await raw.close()
        await eventually(lambda: b.sync.metrics.malformed._value.get() == len(garbage) + 1)
        assert b.load() == before
        # Still in sync afterwards.
        a.free("r1")
        await eventually(lambda: b.load() == {})


@pytest.mark.nats
async def test_lost_deltas_are_detected_and_repaired_by_a_snapshot(
    nats_server: NatsServer,
) -> None:
    async with replicas(nats_server, "A", "B") as (a, b):
        await eventually(lambda: peers_synced(b, 1))
        # Book on A without telling NATS, then skip a sequence number: B sees the gap.
        a.router.book_key("hidden", "w5", [5], 16, time.monotonic())
        a.sync.peer_state.seq += 1
        a.add("r1", "w1", [1], 16)
        await eventually(lambda: b.load() == {"w1": (16, 1, 1), "w5": (16, 1, 1)})
        assert b.sync.metrics.gaps._value.get() >= 1
        assert peers_synced(b, 1)


@pytest.mark.nats
async def test_oversized_prompts_are_split_and_truncated_under_max_payload(
    nats_server: NatsServer,
) -> None:
    async with replicas(nats_server, "A", "B") as (a, b):
        a.sync._max_payload = 4096
        for i in range(20):
            a.add(f"r{i}", "w1", list(range(i * 1000, i * 1000 + 200)), 16)
        a.add("huge", "w2", list(range(10_000)), 16)
        await eventually(lambda: len(b.router.active) == 21)
        huge = b.router.active.get(("A", "huge"))
        assert huge is not None and 0 < len(huge.hashes) < 10_000
        assert list(huge.hashes) == list(range(len(huge.hashes)))  # the leading blocks
        assert a.sync.metrics.messages.labels("sent", "deltas")._value.get() > 2


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("nats_url", {"nats_url": "http://x"}),
        ("subject", {"subject": "a.*"}),
        ("lease_s", {"heartbeat_s": 1.0, "lease_s": 1.0}),
        ("heartbeat_s", {"heartbeat_s": 0}),
    ],
)
def test_config_errors_name_the_field(field: str, kwargs: dict[str, object]) -> None:
    from kvgate.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        ReplicaSyncConfig(**kwargs)  # type: ignore[arg-type]
    assert err.value.field == field


def test_credentials_never_reach_logs_or_health_details() -> None:
    from kvgate.sync import redact_url

    config = ReplicaSyncConfig(nats_url="nats://kvgate:s3cret@nats.svc:4222")
    assert config.safe_url == "nats://***@nats.svc:4222"
    assert redact_url("nats://token@host:4222") == "nats://***@host:4222"
    assert redact_url("nats://host:4222") == "nats://host:4222"
    sync = ReplicaSync({}, config)
    assert "s3cret" not in str(sync.status())


async def test_a_flood_of_peers_or_bookings_is_capped() -> None:
    router = KvRouter(KvRouterConfig(block_size=16))
    config = ReplicaSyncConfig(subject=SUBJECT, router_id="A", max_peers=2, max_peer_requests=10)
    sync = ReplicaSync({SCORER: router}, config)
    for peer in ("X", "Y", "Z"):
        ops = [Add(SCORER, f"{peer}{i}", "w1", [i], 16) for i in range(25)]
        sync.receive(encode(Deltas(peer, 1, ops)))
    assert sorted(sync.peers) == ["X", "Y"]
    assert len(router.active) == 20
    assert sync.metrics.malformed._value.get() == 15 + 15 + 1
