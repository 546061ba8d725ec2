"""Discovery against the real thing: what Dynamo's file store and frontend list is what the
workers themselves report (their ``worker_id`` metric label), and joins and leaves follow."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest

from kvgate.dynamo.discovery import (
    DynamoDiscovery,
    FileStoreSource,
    FrontendHealthSource,
    WorkerAddressing,
    endpoints_for,
    parse_health,
    read_file_store,
)
from kvgate.dynamo.processes import DynamoFleet
from kvgate.fleet.endpoint import EndpointSet
from tests.dynamo.helpers import get

pytestmark = pytest.mark.slow


def live(fleet: DynamoFleet) -> dict[int, str]:
    """Instance id -> system server of every running worker, as the workers report them."""
    return {
        w.instance_id: w.address
        for w in fleet.workers
        if w.instance_id is not None and w.child.alive()
    }


def test_file_store_and_frontend_list_the_workers_that_run(agg_fleet: DynamoFleet) -> None:
    workers = live(agg_fleet)
    stored = read_file_store(agg_fleet.store)
    assert {w.instance_id: w.system_address for w in stored} == workers
    assert {w.component for w in stored} == {"backend"}
    # The capacity the latency model needs, which the workers' /metrics do not state.
    assert {w.kv_blocks for w in stored} == {agg_fleet.settings.num_gpu_blocks}
    for mode in ("direct", "kv"):
        health = parse_health(json.loads(get(f"{agg_fleet.frontend(mode).url}/health")))  # type: ignore[arg-type]
        assert {w.instance_id for w in health} == set(workers)
        assert {w.host for w in health} == {"127.0.0.1"}
    frontend = agg_fleet.frontend("direct").address
    endpoints = endpoints_for(stored, WorkerAddressing(), [frontend])
    by_worker = {w.address: w for w in agg_fleet.workers}
    for endpoint in endpoints:
        worker = by_worker[endpoint.address]
        assert endpoint.worker_instance_id() == worker.instance_id
        assert (endpoint.events_endpoint, endpoint.replay_endpoint) == (
            worker.events_endpoint,
            worker.replay_endpoint,
        )
        assert endpoint.route_address == frontend


async def test_workers_that_join_are_added_and_those_that_leave_are_dropped(
    agg_fleet: DynamoFleet,
) -> None:
    frontend = agg_fleet.frontend("direct").address
    endpoints = EndpointSet()
    source = FileStoreSource(agg_fleet.store)
    async with DynamoDiscovery(endpoints, source, lambda: [frontend], poll_interval_s=0.2):
        assert {ep.instance_id for ep in endpoints} == set(live(agg_fleet))
        leaving = agg_fleet.workers[-1]
        await asyncio.to_thread(agg_fleet.kill_worker, leaving, signal.SIGTERM)
        for _ in range(100):
            if leaving.address not in endpoints:
                break
            await asyncio.sleep(0.1)
        assert leaving.address not in endpoints

        joining = await asyncio.to_thread(agg_fleet.add_worker)
        for _ in range(100):
            if joining.address in endpoints:
                break
            await asyncio.sleep(0.1)
        added = endpoints.get(joining.address)
        assert added is not None and added.instance_id == joining.instance_id
        assert {ep.instance_id for ep in endpoints} == set(live(agg_fleet))

    # The frontend's /health is the same view, for deployments without a file store.
    health = FrontendHealthSource(lambda: [frontend])
    try:
        assert {w.instance_id for w in await health()} == set(live(agg_fleet))
    finally:
        await health.aclose()
