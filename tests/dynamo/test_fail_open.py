"""What ``FailOpen`` means in front of Dynamo, per router mode of the frontend: with the EPP up,
its pick is honoured in every mode; with the EPP down, requests pass without a worker id, which a
``direct`` frontend refuses (400) and a ``kv`` or ``round-robin`` one places itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvgate.dynamo.processes import DynamoFleet, RouterMode
from kvgate.gateway.local import LocalGateway, LocalGatewayConfig, free_port
from tests.dynamo.helpers import by_label, chat_body, delta, get, send, served

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("mode", "status_when_down"), [("direct", 400), ("kv", 200), ("round-robin", 200)]
)
def test_fail_open_per_router_mode(
    agg_fleet: DynamoFleet, qwen3_dir: Path, tmp_path: Path, mode: RouterMode, status_when_down: int
) -> None:
    config = LocalGatewayConfig(
        backend="dynamo",
        dynamo_fleet=agg_fleet,
        dynamo_router_mode=mode,
        failure_mode="FailOpen",
        body_transformer="inline",
        port=free_port(),
        tokenizer=str(qwen3_dir),
        run_dir=tmp_path,
    )
    gateway = LocalGateway(config)
    with gateway as running:
        before = by_label(get(running.epp_metrics_url), "kvgate_decisions_total", "endpoint")
        up, counts = served(agg_fleet, lambda: send(running.url, chat_body("EPP up: " + "x " * 40)))
        assert up.status == 200, up.error
        picked = delta(
            by_label(get(running.epp_metrics_url), "kvgate_decisions_total", "endpoint"), before
        )
        [address] = picked
        assert counts == {w.instance_id: 1 for w in agg_fleet.workers if w.address == address}

        gateway.supervisor.kill(gateway.epp_child)
        down, counts = served(agg_fleet, lambda: send(running.url, chat_body("EPP down.")))
        assert down.status == status_when_down, down.error
        assert sum(counts.values()) == (1 if status_when_down == 200 else 0)
