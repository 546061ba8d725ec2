"""Several EPP replicas behind one real Envoy, sharing in-flight load over a real nats-server:
`kvgate up --epp-replicas N`. Real sim engines, real EPP processes, loopback only."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvgate.gateway.local import LocalGateway, LocalGatewayConfig, RunningGateway, free_port
from kvgate.gateway.status import status_line
from tests.gateway.utils import MODEL, get, send_many

STREAMED = {"stream": True, "stream_options": {"include_usage": True}}

LEASE_S = 3.0  # the EPP's default --replica-lease


def body(question: str) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 4}


def requests_served(metrics_url: str) -> float:
    total = 0.0
    for line in get(metrics_url).splitlines():
        if line.startswith("inference_objective_request_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def sync_status(healthz_url: str) -> dict[str, Any]:
    status = json.loads(get(healthz_url))["replica_sync"]
    assert isinstance(status, dict)
    return status


@pytest.fixture(scope="module")
def gateway(
    qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalGateway, RunningGateway]]:
    config = LocalGatewayConfig(
        workers=2, port=free_port(), tokenizer=str(qwen3_dir), speedup=20.0, epp_replicas=2,
        run_dir=tmp_path_factory.mktemp("replicas"),
    )  # fmt: skip
    local = LocalGateway(config)
    with local as running:
        yield local, running


@pytest.mark.envoy
@pytest.mark.nats
def test_both_replicas_serve_and_see_each_other(
    gateway: tuple[LocalGateway, RunningGateway],
) -> None:
    local, running = gateway
    assert running.nats_url is not None and running.nats_url.startswith("nats://127.0.0.1:")
    assert [c.name for c in running.epp_children] == ["epp-0", "epp-1"]
    assert running.replica_ids == ["epp-0", "epp-1"]
    assert len(set(local.epp_ports)) == len(set(local.epp_metrics_ports)) == 2
    assert local.epp_port == local.epp_ports[0]  # single-replica names: replica 0
    assert local.epp_metrics_port == local.epp_metrics_ports[0]
    assert running.epp is running.children["epp-0"]
    assert running.epp_metrics_url == running.epp_metrics_urls[0]

    before = [requests_served(url) for url in running.epp_metrics_urls]
    results = send_many(running.url, [body(f"replica question {i}") for i in range(12)])
    assert [r.status for r in results] == [200] * 12, [r.error for r in results]
    served = [
        requests_served(url) - b for url, b in zip(running.epp_metrics_urls, before, strict=True)
    ]
    assert sum(served) == 12, served
    assert all(n > 0 for n in served), served  # round-robin over both replicas

    for i, url in enumerate(running.epp_healthz_urls):
        status = sync_status(url)
        other = running.replica_ids[1 - i]
        assert status["state"] == "connected", status
        assert set(status["peers"]) == {other}, status
    line = status_line(running)
    assert "routed" in line and "epp-0=" in line and "epp-1=" in line, line


@pytest.mark.envoy
@pytest.mark.nats
def test_each_replica_observes_the_responses_it_routed(
    gateway: tuple[LocalGateway, RunningGateway],
) -> None:
    """Envoy balances the routing streams over the replicas, and sends each request's observer
    stream to the replica that routed it (its name in the routing answer's metadata): no
    observer stream misses, and both replicas end with nothing held."""
    _, running = gateway

    def observed(url: str, outcome: str) -> float:
        sample = f'kvgate_response_observer_streams_total{{outcome="{outcome}"}} '
        lines = [line for line in get(url).splitlines() if line.startswith(sample)]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    before = [(observed(u, "matched"), observed(u, "unmatched")) for u in running.epp_metrics_urls]
    payloads = [body(f"streamed replica question {i}") | STREAMED for i in range(12)]
    results = send_many(running.url, payloads)
    assert [r.status for r in results] == [200] * 12, [r.error for r in results]
    assert all(r.completion_tokens == 4 for r in results)
    deadline = time.monotonic() + 10
    while True:
        held = [json.loads(get(u))["bookkeeping"] for u in running.epp_healthz_urls]
        if all(not any(h.values()) for h in held) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert all(not any(h.values()) for h in held), held
    after = [(observed(u, "matched"), observed(u, "unmatched")) for u in running.epp_metrics_urls]
    matched = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
    assert sum(matched) == 12 and all(m > 0 for m in matched), matched
    assert [a[1] - b[1] for a, b in zip(after, before, strict=True)] == [0, 0]


@pytest.mark.envoy
@pytest.mark.nats
def test_killed_replica_is_skipped_and_its_peer_expires(
    gateway: tuple[LocalGateway, RunningGateway],
) -> None:
    local, running = gateway
    victim, survivor = running.epp_children[1], running.epp_children[0]
    local.supervisor.kill(victim)
    killed_at = time.monotonic()
    # Envoy learns of the death from the closed connection, the next health check (1 s) or the
    # first failed connect (outlier ejection + retry on the other host); allow a few failures.
    statuses: list[int] = []
    for i in range(10):
        statuses.append(send_many(running.url, [body(f"after the kill {i}")])[0].status)
        if statuses[-3:] == [200, 200, 200]:
            break
    assert statuses[-3:] == [200, 200, 200], statuses
    assert statuses.count(200) >= len(statuses) - 2, statuses

    healthz = running.epp_healthz_urls[0]
    deadline = killed_at + LEASE_S + 4.0
    while sync_status(healthz)["peers"]:
        assert time.monotonic() < deadline, sync_status(healthz)
        time.sleep(0.2)
    assert sync_status(healthz)["state"] == "connected"
    assert survivor.alive()
    assert "epp-1=down" in status_line(running)

    # The survivor alone serves everything.
    before = requests_served(running.epp_metrics_urls[0])
    results = send_many(running.url, [body(f"survivor {i}") for i in range(4)])
    assert [r.status for r in results] == [200] * 4, [r.error for r in results]
    assert requests_served(running.epp_metrics_urls[0]) - before == 4


@pytest.mark.parametrize(
    ("replicas", "sync", "mode", "expected"),
    [
        (1, None, "kv", False),
        (2, None, "kv", True),
        (2, False, "kv", False),
        (1, True, "kv", True),
        (2, None, "standard", False),
    ],
)
def test_replica_sync_default(replicas: int, sync: bool | None, mode: str, expected: bool) -> None:
    config = LocalGatewayConfig(epp_replicas=replicas, replica_sync=sync, mode=mode)  # type: ignore[arg-type]
    assert config.sync_enabled() is expected
