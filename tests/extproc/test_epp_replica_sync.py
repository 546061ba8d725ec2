"""Two EPP replicas in front of the same simulated engines, with and without replica sync.

Real parts throughout: EPP runtimes (ext_proc over gRPC), the Qwen3 tokenizer, simulated engines
publishing KV events over ZMQ, and a real nats-server.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import aiohttp
import grpc
import pytest

from kvgate.extproc.epp_runtime import EppRuntime, EppSettings
from kvgate.scheduling.services import LoadOwner
from kvgate.sim.fleet import Fleet
from kvgate.sim.prompts import TokensCodec
from tests.extproc.utils import (
    MODEL,
    SEED_CONFIG,
    ExtProcStream,
    chat_body,
    endpoints_json,
    loopback_epp_settings,
    loopback_fleet_config,
)
from tests.nats_harness import NatsServer, nats_server

__all__ = ["nats_server"]

WORKERS = 4
# A long shared system prompt (cached on one worker before the burst), distinct short questions.
SYSTEM = " ".join(f"Rule {i}: answer precisely and cite the relevant clause." for i in range(90))
BURST = 32


async def _eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.01)


def _scorer(runtime: EppRuntime) -> LoadOwner:
    (owner,) = runtime.shared_load.owners.values()
    return owner


def _loads(runtime: EppRuntime) -> dict[str, tuple[int, int, int]]:
    active = _scorer(runtime).router.active
    return {
        w: (active.prefill_tokens(w), active.active_blocks(w), active.in_flight(w))
        for w in set(active.prefill) | set(active.blocks.per_worker)
        if active.in_flight(w)
    }


def _settings(
    qwen3_dir: Path,
    endpoints: Path,
    name: str,
    nats_url: str | None,
    env: dict[str, str] | None = None,
) -> EppSettings:
    # The same seed for every replica: any difference comes from sync alone.
    settings = loopback_epp_settings(qwen3_dir, endpoints, env)
    settings.replica_sync = nats_url is not None
    settings.nats_url = nats_url
    settings.sync_subject = "kvgate.test.active_sequences"
    settings.router_id = name
    settings.sync_heartbeat_s = 0.2
    settings.sync_lease_s = 0.8
    return settings


@asynccontextmanager
async def _two_replicas(
    qwen3_dir: Path,
    tmp_path: Path,
    nats_url: str | None,
    *,
    env: dict[str, str] | None = None,
    gpu_blocks: int = 4096,
) -> AsyncIterator[tuple[Fleet, list[EppRuntime]]]:
    codec = TokensCodec.load(str(qwen3_dir))
    config = loopback_fleet_config(WORKERS, gpu_blocks=gpu_blocks)
    async with AsyncExitStack() as stack:
        fleet = await stack.enter_async_context(Fleet(config, codec))
        endpoints = tmp_path / "endpoints.json"
        endpoints.write_text(endpoints_json(fleet))
        runtimes = []
        for name in ("epp-a", "epp-b"):
            settings = _settings(qwen3_dir, endpoints, name, nats_url, env)
            runtimes.append(await stack.enter_async_context(EppRuntime(settings)))
        for runtime in runtimes:
            await _eventually(
                lambda r=runtime: (
                    sum(e.metrics.num_gpu_blocks is not None for e in r.endpoints)  # type: ignore[misc]
                    == WORKERS
                )
            )
            if runtime.sync is not None:
                await runtime.sync.wait_connected(10)
        if nats_url is not None:
            await _eventually(
                lambda: all(len(r.sync.status()["peers"]) == 1 for r in runtimes if r.sync)
            )
        yield fleet, runtimes


async def _warm_one_worker(fleet: Fleet, runtimes: list[EppRuntime]) -> str:
    """Serve the system prompt once on worker 0, directly: its KV events reach both pickers."""
    worker = fleet.workers[0]
    body = json.loads(chat_body("warm up", system=SYSTEM, max_tokens=1))
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{worker.url}/v1/chat/completions", json=body) as response,
    ):
        assert response.status == 200, await response.text()
    address = worker.url.removeprefix("http://")
    for runtime in runtimes:
        index = _scorer(runtime).router.index
        await _eventually(lambda i=index: i.size(address) >= 40)  # type: ignore[misc]
    return address


async def _burst(
    runtimes: list[EppRuntime], *, wait_for_sync: bool
) -> tuple[Counter[str], list[ExtProcStream], list[grpc.aio.Channel]]:
    """BURST requests sharing the cached prefix, alternating between the given replicas, held
    in flight (no response phase), so every booking stays counted. Returns requests per worker."""
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{r.bound_ports['grpc']}") for r in runtimes]
    streams: list[ExtProcStream] = []
    spread: Counter[str] = Counter()
    for i in range(BURST):
        stream = ExtProcStream(channels[i % len(channels)])
        streams.append(stream)
        routed = await stream.route(chat_body(_question(i), system=SYSTEM))
        if routed.immediate_status is not None:
            spread[f"refused {routed.immediate_status}"] += 1
            continue
        spread[routed.destination] += 1
        if wait_for_sync:
            other = _scorer(runtimes[(i + 1) % len(runtimes)]).router.active
            booked = sum(spread[w] for w in spread if not w.startswith("refused"))
            await _eventually(lambda o=other, n=booked: len(o) == n)  # type: ignore[misc]
    return spread, streams, channels


async def _single_picker_spread(runtime: EppRuntime) -> Counter[str]:
    """The reference: one picker routing the whole burst, seeing all of it."""
    await _eventually(lambda: _loads(runtime) == {})
    spread, streams, channels = await _burst([runtime], wait_for_sync=False)
    await _release(streams, channels)
    await _eventually(lambda: _loads(runtime) == {})
    return spread


def _question(i: int) -> str:
    # About 4 blocks: one replica alone fits its 8 requests on the cached worker, 16 do not.
    return f"Case {i}: " + " ".join(f"detail {i}.{j} matters." for j in range(10))


async def _release(streams: list[ExtProcStream], channels: list[grpc.aio.Channel]) -> None:
    for stream in streams:
        stream.cancel()
    for channel in channels:
        await channel.close()


@pytest.mark.slow
async def test_without_sync_a_split_burst_herds_onto_the_cached_worker(
    qwen3_dir: Path, tmp_path: Path
) -> None:
    async with _two_replicas(qwen3_dir, tmp_path, None) as (fleet, runtimes):
        hot = await _warm_one_worker(fleet, runtimes)
        spread, streams, channels = await _burst(runtimes, wait_for_sync=False)
        try:
            a, b = (_loads(r) for r in runtimes)
            # Each replica counts only its own half and, seeing the same, decides the same:
            # every worker gets requests in pairs.
            assert sum(n for _, _, n in a.values()) == BURST // 2
            assert sum(n for _, _, n in b.values()) == BURST // 2
            assert {w: n for w, (_, _, n) in a.items()} != dict(spread)  # views diverge from truth
            assert all(n % 2 == 0 for n in spread.values()), spread
        finally:
            await _release(streams, channels)
        reference = _single_picker_spread(runtimes[0])
        single = await reference
        print(f"without sync: {sorted(spread.values())}, one picker: {sorted(single.values())}")
        # The cached worker gets more than a single picker seeing the whole burst would give it.
        assert spread[hot] > single[hot], (spread, single)


@pytest.mark.nats
async def test_with_sync_two_replicas_route_a_burst_like_one_picker(
    qwen3_dir: Path, tmp_path: Path, nats_server: NatsServer
) -> None:
    async with _two_replicas(qwen3_dir, tmp_path, nats_server.url) as (fleet, runtimes):
        hot = await _warm_one_worker(fleet, runtimes)
        spread, streams, channels = await _burst(runtimes, wait_for_sync=True)
        try:
            a, b = (_loads(r) for r in runtimes)
            # Both replicas hold the same per-worker load: the sum of what each routed.
            assert a == b
            assert {w: n for w, (_, _, n) in a.items()} == dict(spread)
            sent = runtimes[0].sync.metrics.ops  # type: ignore[union-attr]
            assert sent.labels("sent", "add")._value.get() == BURST // 2
        finally:
            await _release(streams, channels)
        # Aborted streams free their bookings on both replicas.
        await _eventually(lambda: all(_loads(r) == {} for r in runtimes))
        single = await _single_picker_spread(runtimes[0])
        print(f"with sync: {sorted(spread.values())}, one picker: {sorted(single.values())}")
        assert sorted(spread.values()) == sorted(single.values())
        assert spread[hot] == single[hot]
        # Health details show the peer.
        for runtime, peer in zip(runtimes, ("epp-b", "epp-a"), strict=True):
            details = runtime.health_details()["replica_sync"]
            assert details["state"] == "connected"
            assert details["peers"][peer]["synced"] is True


@pytest.mark.nats
async def test_busy_threshold_holds_across_replicas_only_with_sync(
    qwen3_dir: Path, tmp_path: Path, nats_server: NatsServer
) -> None:
    """A worker is skipped once its active KV blocks pass DYNAMO_BUSY_THRESHOLD of capacity. Each
    replica alone sees half the load, so without sync the cached worker is filled far past it."""
    env = {"DYNAMO_BUSY_THRESHOLD": "0.4"}  # of 256 blocks: busy above 102 active blocks
    spreads = {}
    for label, url in (("without", None), ("with", nats_server.url)):
        (tmp_path / label).mkdir()
        async with _two_replicas(qwen3_dir, tmp_path / label, url, env=env, gpu_blocks=256) as (
            fleet,
            runtimes,
        ):
            hot = await _warm_one_worker(fleet, runtimes)
            spread, streams, channels = await _burst(runtimes, wait_for_sync=url is not None)
            busy_at = 0.4 * 256
            active_on_hot = _scorer(runtimes[0]).router.active.active_blocks(hot)
            await _release(streams, channels)
            spreads[label] = (spread[hot], sorted(spread.values()), active_on_hot)
            if url is not None:
                assert spread["refused 429"] > 0, spread
    print(f"busy threshold: {spreads}")
    without_hot, without_spread, _ = spreads["without"]
    with_hot, with_spread, with_active = spreads["with"]
    # Without sync each replica admits its half as if alone: the cached worker takes far more
    # than the shared view allows, and nothing is refused although every worker is past the
    # threshold. With sync the cached worker stops at the threshold (plus the request that
    # crossed it), the others fill up to theirs, and the excess is refused with 429.
    assert without_hot >= 1.5 * with_hot, spreads
    assert sum(without_spread) == BURST and len(without_spread) == WORKERS, spreads
    assert with_active <= busy_at + 8, spreads
    assert len(with_spread) == WORKERS + 1 and sum(with_spread) == BURST, spreads


@pytest.mark.slow
async def test_a_restarted_replica_rebuilds_its_index_from_the_engines_replay(
    qwen3_dir: Path, tmp_path: Path
) -> None:
    async with _two_replicas(qwen3_dir, tmp_path, None) as (fleet, runtimes):
        hot = await _warm_one_worker(fleet, runtimes)
        cached = _scorer(runtimes[0]).router.index.size(hot)
        # A replica (re)started after the warm-up heard none of its events.
        settings = _settings(qwen3_dir, tmp_path / "endpoints.json", "epp-new", None)
        async with EppRuntime(settings) as restarted:
            index = _scorer(restarted).router.index
            # Each worker's replay buffer is asked for its history as soon as the worker is
            # known: the cached prefix is back before the worker serves anything new.
            await _eventually(lambda: index.size(hot) >= cached)
            events = restarted.health_details()["kv_events"]
            assert events["backfills"] == 1 and events["cold_starts"] == 0


@pytest.mark.nats
async def test_replica_sync_can_be_switched_on_by_the_scorer_parameter(
    qwen3_dir: Path, tmp_path: Path, nats_server: NatsServer
) -> None:
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text("[]")
    settings = _settings(qwen3_dir, endpoints, "epp-param", None)
    settings.replica_sync = None  # neither flag nor DYNAMO_ROUTER_REPLICA_SYNC
    settings.sync_subject = None  # derived from the model (no pool here)
    settings.env = {"DYNAMO_KV_BLOCK_SIZE": "16", "NATS_SERVER": nats_server.url}
    settings.config_text = SEED_CONFIG.replace(
        "  type: kv-aware-scorer\n",
        "  type: kv-aware-scorer\n  parameters:\n    replicaSync: true\n",
    )
    assert "replicaSync: true" in settings.config_text
    async with EppRuntime(settings) as runtime:
        assert runtime.sync is not None
        await runtime.sync.wait_connected(10)
        details = runtime.health_details()["replica_sync"]
        assert details["nats_url"] == nats_server.url
        assert (
            details["subject"]
            == f"kvgate.{MODEL.replace('/', '_').replace('.', '_')}.active_sequences"
        )
    settings.config_text = SEED_CONFIG
    async with EppRuntime(settings) as runtime:
        assert runtime.sync is None
        assert runtime.health_details()["replica_sync"] == {"state": "off"}
