"""InferencePool discovery against a fake API server speaking Kubernetes' list/watch protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kvgate import epp_configs
from kvgate.commands.epp import build_parser, settings_from_args
from kvgate.extproc.epp_runtime import EppRuntime, EppSettings
from kvgate.fleet.endpoint import EndpointSet
from kvgate.fleet.pool_discovery import ENGINE_LABEL, INSTANCE_ID_ANNOTATION, endpoints_of_pod
from kvgate.fleet.sources import EndpointDefaults
from kvgate.sim.fleet import Fleet, FleetConfig
from kvgate.sim.prompts import TokensCodec
from tests.fleet.fake_apiserver import FakeApiServer
from tests.fleet.utils import LABELS, POOL, Changes, discovery, wait_until, write_kubeconfig


def addresses(endpoints: EndpointSet) -> set[str]:
    return {ep.address for ep in endpoints}


async def test_lists_ready_matching_pods_with_their_engine_and_instance_id(
    api: FakeApiServer,
) -> None:
    api.put_pool(POOL, LABELS, [8000])
    api.add_pod(
        "a",
        "10.0.0.1",
        {**LABELS, ENGINE_LABEL: "sglang"},
        annotations={INSTANCE_ID_ANNOTATION: "1732649523291627853"},
    )
    api.add_pod("b", "10.0.0.2", LABELS)
    api.add_pod("not-ready", "10.0.0.3", LABELS, ready=False)
    api.add_pod("terminating", "10.0.0.4", LABELS)
    api.mark_terminating("terminating")
    api.add_pod("other-model", "10.0.0.5", {"app": "llama"})
    endpoints = EndpointSet()
    defaults = EndpointDefaults(events_port=5557)
    async with discovery(api, endpoints, defaults=defaults):
        await wait_until(lambda: endpoints.known)
        assert addresses(endpoints) == {"10.0.0.1:8000", "10.0.0.2:8000"}
    a, b = endpoints.get("10.0.0.1:8000"), endpoints.get("10.0.0.2:8000")
    assert a is not None and b is not None
    assert (a.engine, a.instance_id, a.events_endpoint) == (
        "sglang",
        1732649523291627853,
        "tcp://10.0.0.1:5557",
    )
    assert (b.engine, b.instance_id) == ("vllm", None)
    assert b.labels == LABELS
    # The pod list asked the API server for the pool's selector, not the whole namespace.
    assert ("/api/v1/namespaces/my-model/pods", {"labelSelector": "app=qwen3-vllm"}) in api.requests


async def test_pod_churn_joins_and_leaves(api: FakeApiServer) -> None:
    api.put_pool(POOL, LABELS, [8000])
    api.add_pod("a", "10.0.0.1", LABELS)
    endpoints = EndpointSet()
    changes = Changes(endpoints)
    async with discovery(api, endpoints) as d:
        await wait_until(lambda: addresses(endpoints) == {"10.0.0.1:8000"})
        for i in range(2, 12):
            api.add_pod(f"p{i}", f"10.0.1.{i}", LABELS)
        api.delete_pod("a")
        await wait_until(lambda: addresses(endpoints) == {f"10.0.1.{i}:8000" for i in range(2, 12)})
        for i in range(2, 7):
            api.delete_pod(f"p{i}")
        await wait_until(lambda: len(endpoints) == 5)
        assert d.lists == 1, "churn must come from the watch, not from relisting"
    assert "10.0.0.1:8000" in changes.left
    assert {f"10.0.1.{i}:8000" for i in range(2, 7)} <= changes.left


async def test_readiness_flips_and_relabels(api: FakeApiServer) -> None:
    api.put_pool(POOL, LABELS, [8000])
    api.add_pod("a", "10.0.0.1", LABELS)
    api.add_pod("b", "10.0.0.2", LABELS)
    endpoints = EndpointSet()
    async with discovery(api, endpoints):
        await wait_until(lambda: len(endpoints) == 2)
        api.set_ready("a", False)
        await wait_until(lambda: addresses(endpoints) == {"10.0.0.2:8000"})
        api.set_ready("a", True)
        await wait_until(lambda: len(endpoints) == 2)
        # Relabelled out of the selector: the API server sends DELETED for a selected watch.
        api.set_labels("b", {"app": "elsewhere"})
        await wait_until(lambda: addresses(endpoints) == {"10.0.0.1:8000"})
        api.mark_terminating("a")
        await wait_until(lambda: len(endpoints) == 0)


async def test_broken_watch_reconnects_and_resyncs(api: FakeApiServer) -> None:
    api.put_pool(POOL, LABELS, [8000])
    api.add_pod("a", "10.0.0.1", LABELS)
    endpoints = EndpointSet()
    async with discovery(api, endpoints) as d:
        await wait_until(lambda: len(endpoints) == 1 and api.open_watches == 2)
        # Changes made while the connection is down and the server refuses requests.
        api.fail_next(3, status=503)
        api.break_watches()
        api.delete_pod("a")
        api.add_pod("b", "10.0.0.2", LABELS)
        await wait_until(lambda: addresses(endpoints) == {"10.0.0.2:8000"})
        assert d.lists >= 2
        await wait_until(lambda: api.open_watches == 2)
        api.add_pod("c", "10.0.0.3", LABELS)
        await wait_until(lambda: len(endpoints) == 2)


async def test_gone_relists_without_losing_changes(api: FakeApiServer) -> None:
    api.put_pool(POOL, LABELS, [8000])
    api.add_pod("a", "10.0.0.1", LABELS)
    endpoints = EndpointSet()
    async with discovery(api, endpoints) as d:
        await wait_until(lambda: len(endpoints) == 1 and api.open_watches == 2)
        api.expire_watches()
        api.add_pod("b", "10.0.0.2", LABELS)
        await wait_until(lambda: d.lists == 2 and len(endpoints) == 2)
        # A resume from a compacted version gets 410 as an ERROR event too: relist again.
        api.compact()
        api.break_watches()
        api.delete_pod("a")
        await wait_until(lambda: d.lists >= 3 and addresses(endpoints) == {"10.0.0.2:8000"})


async def test_watch_timeout_resumes_from_last_version_without_relisting(
    api: FakeApiServer,
) -> None:
    api.put_pool(POOL, LABELS, [8000])
    endpoints = EndpointSet()
    async with discovery(api, endpoints, watch_timeout_s=1) as d:
        await wait_until(lambda: endpoints.known)
        api.add_pod("a", "10.0.0.1", LABELS)
        await wait_until(lambda: len(endpoints) == 1)
        version = api.version

        def pod_watches() -> list[dict[str, str]]:
            return [q for p, q in api.requests if p.endswith("/pods") and q.get("watch") == "1"]

        await wait_until(lambda: len(pod_watches()) >= 2, timeout=5.0)
        assert pod_watches()[-1]["resourceVersion"] == str(version)
        assert d.lists == 1


async def test_pool_selector_and_port_changes_relist(api: FakeApiServer) -> None:
    api.put_pool(POOL, LABELS, [8000])
    api.add_pod("old", "10.0.0.1", LABELS)
    api.add_pod("new", "10.0.0.2", {"app": "qwen3-vllm-v2"})
    endpoints = EndpointSet()
    changes = Changes(endpoints)
    async with discovery(api, endpoints):
        await wait_until(lambda: addresses(endpoints) == {"10.0.0.1:8000"})
        api.put_pool(POOL, {"app": "qwen3-vllm-v2"}, [8000])
        await wait_until(lambda: addresses(endpoints) == {"10.0.0.2:8000"})
        assert "10.0.0.1:8000" in changes.left
        api.put_pool(POOL, {"app": "qwen3-vllm-v2"}, [8000, 8001])
        await wait_until(lambda: addresses(endpoints) == {"10.0.0.2:8000", "10.0.0.2:8001"})
        api.delete_pool(POOL)
        await wait_until(lambda: len(endpoints) == 0)


async def test_missing_pool_keeps_readiness_off_until_created(api: FakeApiServer) -> None:
    api.add_pod("a", "10.0.0.1", LABELS)
    endpoints = EndpointSet()
    async with discovery(api, endpoints):
        await wait_until(lambda: sum(p.endswith(POOL) for p, _ in api.requests) >= 2)
        assert not endpoints.known
        api.put_pool(POOL, LABELS, [8000])
        await wait_until(lambda: len(endpoints) == 1)
        assert endpoints.known


def _pod(**status: Any) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "metadata": {"name": "p", "namespace": "ns", "labels": {}, "annotations": {}},
        "status": {"podIP": "10.0.0.9", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    pod["status"].update(status)
    return pod


@pytest.mark.parametrize(
    ("pod", "ports", "expected"),
    [
        (_pod(), [8000], {"10.0.0.9:8000": None}),
        (_pod(podIP="fd00::0:9"), [8000], {"[fd00::9]:8000": None}),
        (_pod(podIP=None), [8000], {}),
        (_pod(podIP="pending"), [8000], {}),
        (_pod(conditions=[]), [8000], {}),
        (_pod(conditions=[{"type": "Ready", "status": "False"}]), [8000], {}),
    ],
    ids=["ready", "ipv6-canonical", "no-ip-yet", "bad-ip", "no-conditions", "not-ready"],
)
def test_endpoints_of_pod(
    pod: dict[str, Any], ports: list[int], expected: dict[str, int | None]
) -> None:
    assert {e.address: e.instance_id for e in endpoints_of_pod(pod, ports)} == expected


@pytest.mark.parametrize(
    ("annotation", "ports", "ids"),
    [
        ("7,8", [8000, 8001], [7, 8]),
        ("7", [8000, 8001], [None, None]),
        ("-1", [8000], [None]),
        (str(2**63), [8000], [None]),
    ],
    ids=["one-id-per-port", "too-few-ids-ignored", "negative-ignored", "over-int64-ignored"],
)
def test_instance_id_annotation(annotation: str, ports: list[int], ids: list[int | None]) -> None:
    pod = _pod()
    pod["metadata"]["annotations"] = {INSTANCE_ID_ANNOTATION: annotation}
    assert [e.instance_id for e in endpoints_of_pod(pod, ports)] == ids


@pytest.mark.parametrize(
    ("events", "replay", "expected"),
    [(5557, 5558, ("tcp://10.0.0.9:5557", "tcp://10.0.0.9:5558")), (None, 5558, (None, None))],
    ids=["by-convention", "no-events-no-replay"],
)
def test_replay_endpoint_by_port_convention(
    events: int | None, replay: int, expected: tuple[str | None, str | None]
) -> None:
    defaults = EndpointDefaults(events_port=events, replay_port=replay)
    (endpoint,) = endpoints_of_pod(_pod(), [8000], defaults)
    assert (endpoint.events_endpoint, endpoint.replay_endpoint) == expected


@pytest.mark.parametrize(
    ("label", "engine"),
    [("trtllm-serve", "trtllm"), ("sglang", "sglang"), ("mystery", "vllm")],
)
def test_engine_label(label: str, engine: str) -> None:
    pod = _pod()
    pod["metadata"]["labels"] = {ENGINE_LABEL: label, "llm-d.ai/role": "prefill"}
    (endpoint,) = endpoints_of_pod(pod, [8000])
    assert (endpoint.engine, endpoint.role) == (engine, "prefill")


async def test_epp_discovers_its_pool(api: FakeApiServer, tmp_path: Path) -> None:
    """`kvgate epp --pool-name` end to end: flags, kubeconfig, runtime, readiness."""
    api.put_pool(POOL, LABELS, [8000])
    api.add_pod("a", "10.0.0.1", LABELS, annotations={"example.com/worker": "42"})
    kubeconfig = tmp_path / "config"
    write_kubeconfig(kubeconfig, {"server": api.url}, context="t")
    args = build_parser().parse_args(
        [
            f"--pool-name={POOL}",
            f"--pool-namespace={api.namespace}",
            f"--kubeconfig={kubeconfig}",
            "--instance-id-annotation=example.com/worker",
            "--no-secure-serving",
        ]
    )
    settings: EppSettings = settings_from_args(args)
    settings.bind, settings.grpc_port, settings.health_port, settings.metrics_port = (
        "127.0.0.1",
        0,
        0,
        0,
    )
    settings.env = {}
    async with EppRuntime(settings) as runtime:
        await wait_until(lambda: len(runtime.endpoints) == 1)
        (endpoint,) = runtime.endpoints
        assert (endpoint.address, endpoint.instance_id) == ("10.0.0.1:8000", 42)
        api.delete_pod("a")
        await wait_until(lambda: len(runtime.endpoints) == 0)


async def test_a_restarted_picker_reads_a_discovered_engines_history(
    api: FakeApiServer, tmp_path: Path, qwen3_dir: Path
) -> None:
    """Restart recovery in a cluster: the picker starts after the engine cached a prompt, finds
    the pod through the pool, and reads what it caches from the engine's replay socket, found by
    the port convention (``--events-port``, ``--replay-port``), with no new event published."""
    codec = TokensCodec.load(str(qwen3_dir))
    config = FleetConfig(workers=1, base_port=0, events_base_port=0, replay_base_port=0)
    async with Fleet(config, codec) as fleet:
        (worker,) = fleet.workers
        body = {"model": config.model, "messages": [{"role": "user", "content": "history " * 200}]}
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{worker.url}/v1/chat/completions", json=body) as resp,
        ):
            assert resp.status == 200
        port = int(worker.url.rsplit(":", 1)[1])
        events, replay = (
            int(e.rsplit(":", 1)[1]) for e in (worker.events_endpoint, worker.replay_endpoint)
        )
        api.put_pool(POOL, LABELS, [port])
        api.add_pod("a", "127.0.0.1", LABELS)
        kubeconfig = tmp_path / "config"
        write_kubeconfig(kubeconfig, {"server": api.url}, context="t")
        args = build_parser().parse_args(
            [f"--pool-name={POOL}", f"--pool-namespace={api.namespace}",
             f"--kubeconfig={kubeconfig}", "--no-secure-serving", f"--tokenizer={qwen3_dir}",
             f"--events-port={events}", f"--replay-port={replay}",
             f"--config-text={epp_configs.shipped_config(epp_configs.DYNAMO)}"]
        )  # fmt: skip
        settings = settings_from_args(args)
        settings.bind, settings.grpc_port, settings.health_port, settings.metrics_port = (
            "127.0.0.1", 0, 0, 0,
        )  # fmt: skip
        settings.env = {"DYNAMO_KV_BLOCK_SIZE": "16"}
        async with EppRuntime(settings) as runtime:
            (owner,) = runtime.shared_load.owners.values()
            address = f"127.0.0.1:{port}"
            # ~200 prompt tokens: 12 full blocks, learned from the replay alone.
            await wait_until(lambda: owner.router.index.size(address) >= 10)
            (endpoint,) = runtime.endpoints
            assert endpoint.replay_endpoint == f"tcp://127.0.0.1:{replay}"
