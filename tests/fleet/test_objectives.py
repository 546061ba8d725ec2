"""InferenceObjective priorities watched through a fake API server speaking list/watch, and used
by the endpoint picker to shed requests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from kvgate.commands.epp import build_parser, settings_from_args
from kvgate.extproc.epp_runtime import EppRuntime
from kvgate.fleet.kube_api import KubeConfig
from kvgate.fleet.objectives import ObjectiveWatch
from tests.extproc.utils import ExtProcStream, chat_body
from tests.fleet.fake_apiserver import FakeApiServer
from tests.fleet.utils import LABELS, POOL, wait_until, write_kubeconfig


@contextlib.asynccontextmanager
async def watching(api: FakeApiServer, priorities: dict[str, int]) -> AsyncIterator[None]:
    watch = ObjectiveWatch(
        priorities,
        KubeConfig(server=api.url),
        POOL,
        api.namespace,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
    )
    await watch.start()
    try:
        yield
    finally:
        await watch.aclose()


async def test_the_pools_objectives_are_watched_over_the_flags(api: FakeApiServer) -> None:
    api.put_objective("chat", POOL, 5)
    api.put_objective("batch", POOL, -1)
    api.put_objective("unset", POOL, None)
    api.put_objective("shared", POOL, 7)
    api.put_objective("elsewhere", "another-pool", 9)
    priorities = {"flag-only": 3, "shared": 1}
    async with watching(api, priorities):
        expected = {"flag-only": 3, "shared": 7, "chat": 5, "batch": -1, "unset": 0}
        await wait_until(lambda: priorities == expected)
        api.put_objective("batch", POOL, -2)
        api.delete_objective("chat")
        await wait_until(lambda: priorities.get("batch") == -2 and "chat" not in priorities)
        api.expire_watches()  # 410: relist, nothing lost
        api.put_objective("late", POOL, 4)
        await wait_until(lambda: priorities.get("late") == 4)
        api.delete_objective("shared")  # the flag's value comes back
        await wait_until(lambda: priorities.get("shared") == 1)
        api.put_objective("late", "another-pool", 4)  # moved away: no longer ours
        await wait_until(lambda: "late" not in priorities)
    assert priorities == {"flag-only": 3, "shared": 1, "batch": -2, "unset": 0}


async def test_a_cluster_without_the_objective_api_keeps_the_flags() -> None:
    api = FakeApiServer(objectives=False)
    await api.start()
    try:
        priorities = {"batch": -1}
        async with watching(api, priorities):
            await wait_until(
                lambda: sum(1 for path, _ in api.requests if "inferenceobjectives" in path) >= 2
            )
        assert priorities == {"batch": -1}
    finally:
        await api.aclose()


async def test_the_picker_sheds_by_the_watched_priority(api: FakeApiServer, tmp_path: Path) -> None:
    """`kvgate epp --pool-name`: a request naming an objective made sheddable in the cluster is
    refused while the pool is saturated (nothing answers on the pod's port: stale metrics)."""
    api.put_pool(POOL, LABELS, [9])
    api.add_pod("a", "127.0.0.1", LABELS)
    api.put_objective("batch", POOL, 0)
    kubeconfig = tmp_path / "config"
    write_kubeconfig(kubeconfig, {"server": api.url}, context="t")
    settings = settings_from_args(
        build_parser().parse_args(
            [f"--pool-name={POOL}", f"--pool-namespace={api.namespace}",
             f"--kubeconfig={kubeconfig}", "--no-secure-serving", "--bind=127.0.0.1",
             "--grpc-port=0", "--grpc-health-port=0", "--metrics-port=0"]
        )
    )  # fmt: skip
    settings.env = {}
    async with (
        EppRuntime(settings) as runtime,
        grpc.aio.insecure_channel(f"127.0.0.1:{runtime.bound_ports['grpc']}") as channel,
    ):
        await wait_until(lambda: len(runtime.endpoints) == 1)

        async def route() -> int | None:
            stream = ExtProcStream(channel)
            routed = await stream.route(
                chat_body("bulk job"), {"x-gateway-inference-objective": "batch"}
            )
            await stream.close()
            return routed.immediate_status

        assert await route() is None
        api.put_objective("batch", POOL, -1)
        await wait_until(lambda: settings.options.priorities.get("batch") == -1)
        assert await route() == 429
