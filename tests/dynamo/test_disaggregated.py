"""Disaggregated Dynamo (prefill and decode mocker workers) behind kvgate: the EPP picks a pair,
the frontend (direct mode) runs the prefill on the picked prefill worker and the decode on the
picked decode worker, as both workers' own request counters show."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvgate.dynamo.processes import DynamoFleet, FleetSettings
from kvgate.gateway.local import LocalGateway, LocalGatewayConfig, RunningGateway, free_port
from tests.dynamo.helpers import (
    by_label,
    chat_body,
    delta,
    get,
    require_dynamo,
    send,
    served,
    settled,
    system_prompt,
)
from tests.utils import qwen3_tokenizer_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pd_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DynamoFleet]:
    require_dynamo()
    settings = FleetSettings(workers=2, prefill_workers=2, router_modes=("direct",), speedup=10.0)
    with DynamoFleet(
        settings, tmp_path_factory.mktemp("dynamo-pd"), tokenizer_dir=qwen3_tokenizer_dir()
    ) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def pd_gateway(
    pd_fleet: DynamoFleet, qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    config = LocalGatewayConfig(
        backend="dynamo",
        dynamo_fleet=pd_fleet,
        workers=4,
        prefill_workers=2,
        dynamo_router_mode="direct",
        body_transformer="inline",
        port=free_port(),
        tokenizer=str(qwen3_dir),
        run_dir=tmp_path_factory.mktemp("dynamo-pd-gateway"),
    )
    with LocalGateway(config) as running:
        yield running


def pair_picks(running: RunningGateway) -> dict[tuple[str, str], int]:
    text = get(running.epp_metrics_url)
    out: dict[tuple[str, str], int] = {}
    for profile in ("prefill", "decode"):
        for endpoint, n in by_label(
            text, "kvgate_profile_decisions_total", "endpoint", profile=profile
        ).items():
            out[profile, endpoint] = n
    return out


def test_every_picked_pair_serves_the_request(
    pd_fleet: DynamoFleet, pd_gateway: RunningGateway
) -> None:
    role_of = {w.address: w.role for w in pd_fleet.workers}
    id_of = {w.address: w.instance_id for w in pd_fleet.workers}
    pairs = set()
    for i in range(6):
        before = pair_picks(pd_gateway)
        body = chat_body(f"Disaggregated request {i}: " + "split me " * 30, max_tokens=8)
        result, counts = served(pd_fleet, lambda b=body: send(pd_gateway.url, b))  # type: ignore[misc]
        assert result.status == 200, result.error
        picked = delta(pair_picks(pd_gateway), before)
        assert sorted(profile for profile, _ in picked) == ["decode", "prefill"]
        for profile, address in picked:
            assert role_of[address] == profile
        # Both picked workers served it, and no other worker did.
        assert counts == {id_of[address]: 1 for _, address in picked}
        pairs.add(tuple(sorted(address for _, address in picked)))
    assert len(pairs) >= 2


def test_a_shared_prefix_is_prefilled_on_the_worker_caching_it(
    pd_fleet: DynamoFleet, pd_gateway: RunningGateway
) -> None:
    prefill_workers = {w.instance_id for w in pd_fleet.workers if w.role == "prefill"}
    homes = set()
    for i in range(4):
        body = chat_body(f"Follow-up {i}?", system_prompt(30))
        result, counts = served(pd_fleet, lambda b=body: send(pd_gateway.url, b))  # type: ignore[misc]
        assert result.status == 200, result.error
        settled(pd_gateway.epp_metrics_url)
        homes |= set(counts) & prefill_workers
    # (The usage's cached_tokens is the decode worker's, 0 here: the prefill worker's reuse shows
    # only in where it was sent.)
    assert len(homes) == 1
