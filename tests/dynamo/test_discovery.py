"""Dynamo's registry records -> kvgate endpoints, on records shaped as Dynamo 1.6.1 writes them
(the live tests in test_discovery_live.py read the real ones)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from kvgate.dynamo.discovery import (
    DiscoveryError,
    DynamoDiscovery,
    DynamoWorker,
    PortRule,
    WorkerAddressing,
    endpoints_for,
    parse_health,
    read_file_store,
)
from kvgate.dynamo.epp import add_dynamo_arguments, dynamo_settings_from_args
from kvgate.errors import ConfigError
from kvgate.fleet.endpoint import EndpointSet

PREFILL_ID = 17531501087355831114
DECODE_ID = 5516225796028262056


def instance_record(instance_id: int, component: str, host: str = "127.0.0.1") -> dict[str, Any]:
    hex_id = f"{instance_id:x}"
    return {
        "type": "Endpoint",
        "component": component,
        "endpoint": "generate",
        "namespace": "dynamo",
        "instance_id": instance_id,
        "transport": {"tcp": f"{host}:46747/{hex_id}/dynamo/{component}/generate"},
        "device_type": "cuda",
        "request_plane_codec": "msgpack",
    }


def card_record(instance_id: int, component: str, system: str, worker_type: str) -> dict[str, Any]:
    base = f"http://{system}/v1/metadata/dynamo/{component}/generate/qwen_qwen3-0_6b/_base"
    return {
        "type": "Model",
        "namespace": "dynamo",
        "component": component,
        "endpoint": "generate",
        "instance_id": instance_id,
        "card_json": {
            "display_name": "Qwen/Qwen3-0.6B",
            "model_info": {"hf_config_json": {"path": f"{base}/config.json", "size": 380}},
            "tokenizer": {"hf_tokenizer_json": {"path": f"{base}/tokenizer.json"}},
            "kv_cache_block_size": 16,
            "worker_type": worker_type,
            "runtime_config": {"total_kv_blocks": 2000},
        },
    }


def write_store(root: Path, records: dict[str, list[dict[str, Any]]]) -> None:
    for kind, items in records.items():
        folder = root / "v1" / kind
        folder.mkdir(parents=True, exist_ok=True)
        for item in items:
            key = f"dynamo/{item['component']}/{item['endpoint']}/{item['instance_id']:x}"
            (folder / quote(key, safe="")).write_text(json.dumps(item))


def pd_store(root: Path) -> None:
    write_store(
        root,
        {
            "instances": [
                instance_record(PREFILL_ID, "prefill"),
                instance_record(DECODE_ID, "backend"),
                # Not a generate endpoint: the worker's KV query endpoint is ignored.
                {**instance_record(DECODE_ID, "backend"), "endpoint": "worker_kv_query_source_1"},
            ],
            "mdc": [
                card_record(PREFILL_ID, "prefill", "127.0.0.1:31110", "prefill"),
                card_record(DECODE_ID, "backend", "127.0.0.1:31130", "decode"),
            ],
        },
    )


def test_file_store_records_give_ids_roles_and_system_servers(tmp_path: Path) -> None:
    pd_store(tmp_path)
    workers = {w.instance_id: w for w in read_file_store(tmp_path)}
    assert workers == {
        PREFILL_ID: DynamoWorker(
            PREFILL_ID, "prefill", "127.0.0.1", "127.0.0.1:31110", "prefill", 2000
        ),
        DECODE_ID: DynamoWorker(
            DECODE_ID, "backend", "127.0.0.1", "127.0.0.1:31130", "decode", 2000
        ),
    }
    assert read_file_store(tmp_path, namespace="other") == []
    assert read_file_store(tmp_path / "absent") == []


def test_a_half_written_record_fails_the_poll_instead_of_dropping_a_worker(
    tmp_path: Path,
) -> None:
    pd_store(tmp_path)
    next((tmp_path / "v1" / "instances").iterdir()).write_text('{"type": "Endpo')
    with pytest.raises(DiscoveryError, match="cannot read"):
        read_file_store(tmp_path)


def test_endpoints_name_the_worker_and_route_to_the_frontend(tmp_path: Path) -> None:
    pd_store(tmp_path)
    endpoints = {
        ep.instance_id: ep
        for ep in endpoints_for(read_file_store(tmp_path), WorkerAddressing(), ["127.0.0.1:8000"])
    }
    prefill, decode = endpoints[PREFILL_ID], endpoints[DECODE_ID]
    assert prefill.address == "127.0.0.1:31110"
    assert prefill.route_address == "127.0.0.1:8000"
    assert prefill.worker_instance_id() == PREFILL_ID
    assert (prefill.role, dict(prefill.labels)) == ("prefill", {"llm-d.ai/role": "prefill"})
    assert prefill.events_endpoint == "tcp://127.0.0.1:31111"
    assert prefill.replay_endpoint == "tcp://127.0.0.1:31112"
    assert (decode.role, decode.address, decode.destination) == (
        "decode",
        "127.0.0.1:31130",
        "127.0.0.1:8000",
    )
    # The card's KV capacity stands in for the metrics Dynamo's workers do not serve.
    assert (decode.kv_blocks, decode.metrics.num_gpu_blocks) == (2000, 2000)


def test_a_card_without_a_usable_kv_capacity_leaves_it_unknown(tmp_path: Path) -> None:
    for config in ({}, {"total_kv_blocks": None}, {"total_kv_blocks": 0}, {"total_kv_blocks": "9"}):
        card = card_record(DECODE_ID, "backend", "127.0.0.1:31130", "aggregated")
        card["card_json"]["runtime_config"] = config
        write_store(tmp_path, {"instances": [instance_record(DECODE_ID, "backend")], "mdc": [card]})
        (worker,) = read_file_store(tmp_path)
        assert worker.kv_blocks is None
        (ep,) = endpoints_for([worker], WorkerAddressing(), ["127.0.0.1:8000"])
        assert ep.metrics.num_gpu_blocks is None


HEALTH = {
    "status": "healthy",
    "endpoints": ["dyn://dynamo.backend.generate", "dyn://dynamo.prefill.generate"],
    "instances": [
        {
            "component": "backend",
            "endpoint": "generate",
            "namespace": "dynamo",
            "instance_id": DECODE_ID,
            "transport": {"tcp": "10.1.0.7:46747/4c8d9222a11c66a8/dynamo/backend/generate"},
        },
        {
            "component": "prefill",
            "endpoint": "generate",
            "namespace": "dynamo",
            "instance_id": PREFILL_ID,
            "transport": {"tcp": "10.1.0.9:38823/f34c675a6338034a/dynamo/prefill/generate"},
        },
        {
            "component": "backend",
            "endpoint": "worker_kv_query_source_1ec180bbe65b5d",
            "namespace": "dynamo",
            "instance_id": DECODE_ID,
            "transport": {"tcp": "10.1.0.7:46747/4c8d9222a11c66a8/dynamo/backend/x"},
        },
    ],
}


def test_frontend_health_in_kubernetes_uses_pod_ips_and_fixed_ports() -> None:
    """No system port in /health: the operator's 9090 on the worker's pod IP, events at
    absolute ports (a vLLM worker's 20080)."""
    workers = parse_health(HEALTH)
    addressing = WorkerAddressing(system_port=9090, events=PortRule(20080, False), replay=None)
    endpoints = {
        ep.instance_id: ep
        for ep in endpoints_for(workers, addressing, ["10.2.0.1:8000", "10.2.0.2:8000"])
    }
    decode = endpoints[DECODE_ID]
    assert decode.address == "10.1.0.7:9090"
    assert decode.events_endpoint == "tcp://10.1.0.7:20080"
    assert decode.replay_endpoint is None
    # A fleet with prefill workers: its backend workers decode.
    assert decode.role == "decode"
    assert endpoints[PREFILL_ID].role == "prefill"
    # Each worker is reached through one frontend, the same one every time.
    assert {ep.destination for ep in endpoints.values()} <= {"10.2.0.1:8000", "10.2.0.2:8000"}
    assert decode.destination == ["10.2.0.1:8000", "10.2.0.2:8000"][DECODE_ID % 2]


def test_aggregated_workers_are_unlabelled_and_health_errors_are_refused() -> None:
    aggregated = parse_health({"instances": HEALTH["instances"][:1]})  # type: ignore[index]
    [endpoint] = endpoints_for(aggregated, WorkerAddressing(), ["10.2.0.1:8000"])
    assert (endpoint.role, dict(endpoint.labels)) == ("both", {})
    with pytest.raises(DiscoveryError):
        parse_health({"status": "healthy"})
    with pytest.raises(DiscoveryError, match="64-bit"):
        parse_health({"instances": [{**HEALTH["instances"][0], "instance_id": -1}]})  # type: ignore[index]


def test_workers_sharing_a_system_server_are_used_once() -> None:
    twins = [
        DynamoWorker(1, "backend", "127.0.0.1", "127.0.0.1:9000"),
        DynamoWorker(2, "backend", "127.0.0.1", "127.0.0.1:9000"),
    ]
    assert [ep.instance_id for ep in endpoints_for(twins, WorkerAddressing(), ["f:1"])] == [1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("+1", PortRule(1, True)), ("20080", PortRule(20080, False)), ("off", None), ("", None)],
)
def test_port_rules(text: str, expected: PortRule | None) -> None:
    assert PortRule.parse(text) == expected


@pytest.mark.parametrize("text", ["-1", "x", "+0", "70000", "+1.5"])
def test_bad_port_rules(text: str) -> None:
    with pytest.raises(ValueError):
        PortRule.parse(text)


async def test_discovery_follows_the_store_and_keeps_state_across_frontend_moves(
    tmp_path: Path,
) -> None:
    pd_store(tmp_path)
    frontends = ["127.0.0.1:8000"]
    endpoints = EndpointSet()
    changes: list[tuple[list[str], list[str]]] = []
    endpoints.subscribe(
        lambda joined, left: changes.append(
            ([e.address for e in joined], [e.address for e in left])
        )
    )

    async def source() -> list[DynamoWorker]:
        return read_file_store(tmp_path)

    discovery = DynamoDiscovery(endpoints, source, lambda: list(frontends))
    assert await discovery.check()
    assert sorted(ep.address for ep in endpoints) == ["127.0.0.1:31110", "127.0.0.1:31130"]
    decode = endpoints.get("127.0.0.1:31130")
    assert decode is not None

    # Another frontend: destinations may move, the worker stays (same object, no leave/join).
    frontends.append("127.0.0.1:8001")
    changes.clear()
    assert await discovery.check()
    assert changes == []
    assert endpoints.get("127.0.0.1:31130") is decode
    assert decode.destination == sorted(frontends)[DECODE_ID % 2]

    # A worker that deregisters leaves.
    for path in (tmp_path / "v1" / "instances").iterdir():
        if f"{PREFILL_ID:x}" in path.name:
            path.unlink()
    assert await discovery.check()
    assert changes == [([], ["127.0.0.1:31110"])]

    # No frontend known: nothing changes (there would be nowhere to send requests).
    frontends.clear()
    assert not await discovery.check()
    assert len(endpoints) == 1


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoints", default="")
    parser.add_argument("--endpoints-file", type=Path)
    parser.add_argument("--pool-name")
    add_dynamo_arguments(parser)
    return parser.parse_args(argv)


def test_epp_flags() -> None:
    assert dynamo_settings_from_args(parse([])) is None
    settings = dynamo_settings_from_args(
        parse(["--dynamo-discovery", "file", "--dynamo-frontend", "127.0.0.1:8000"]),
        env={"DYN_FILE_KV": "/tmp/store", "DYN_NAMESPACE": "prod"},
    )
    assert settings is not None
    assert (settings.store, settings.namespace, settings.frontends) == (
        Path("/tmp/store"),
        "prod",
        ("127.0.0.1:8000",),
    )
    k8s = dynamo_settings_from_args(
        parse(["--dynamo-discovery", "frontend", "--pool-name", "qwen-pool",
               "--dynamo-events-port", "20080", "--dynamo-replay-port", "off"]),
        env={},
    )  # fmt: skip
    assert k8s is not None and k8s.frontends == ()
    assert (k8s.addressing.events, k8s.addressing.replay) == (PortRule(20080, False), None)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--dynamo-discovery", "frontend"], "--dynamo-frontend"),
        (["--dynamo-discovery", "file", "--dynamo-frontend", "127.0.0.1:1"], "--dynamo-store"),
        (["--dynamo-discovery", "frontend", "--dynamo-frontend", "frontend:8000"],
         "--dynamo-frontend"),
        (["--dynamo-discovery", "frontend", "--dynamo-frontend", "127.0.0.1:1",
          "--endpoints", "127.0.0.1:2"], "--dynamo-discovery"),
        (["--dynamo-discovery", "frontend", "--dynamo-frontend", "127.0.0.1:1",
          "--dynamo-events-port", "+x"], "--dynamo-events-port"),
    ],
)  # fmt: skip
def test_bad_epp_flags_name_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError) as caught:
        dynamo_settings_from_args(parse(argv), env={})
    assert caught.value.field == flag
