"""kvgate's EPP picking Dynamo workers behind Envoy, the Dynamo frontend (direct mode) forwarding
to them: every claim is checked against the workers' own request counters
(``dynamo_component_requests_total`` on each mocker's ``/metrics``), never against what the
gateway or the frontend say about themselves."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvgate.dynamo.processes import DynamoFleet
from kvgate.gateway.local import LocalGateway, LocalGatewayConfig, free_port
from tests.dynamo.helpers import (
    by_label,
    chat_body,
    delta,
    get,
    healthz,
    metric,
    send,
    send_all,
    served,
    settled,
    system_prompt,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gateway(
    agg_fleet: DynamoFleet, qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalGateway]:
    config = LocalGatewayConfig(
        backend="dynamo",
        dynamo_fleet=agg_fleet,
        dynamo_router_mode="direct",
        body_transformer="inline",
        port=free_port(),
        tokenizer=str(qwen3_dir),
        run_dir=tmp_path_factory.mktemp("dynamo-gateway"),
    )
    gateway = LocalGateway(config)
    with gateway:
        yield gateway


def epp_metrics(gateway: LocalGateway) -> str:
    assert gateway.running is not None
    return get(gateway.running.epp_metrics_url)


def picks(gateway: LocalGateway) -> dict[str, int]:
    return dict(by_label(epp_metrics(gateway), "kvgate_decisions_total", "endpoint"))


def instance_of(fleet: DynamoFleet, address: str) -> int:
    [worker] = [w for w in fleet.workers if w.address == address]
    assert worker.instance_id is not None
    return worker.instance_id


def test_each_pinned_request_is_served_by_the_picked_worker(
    gateway: LocalGateway, agg_fleet: DynamoFleet
) -> None:
    assert gateway.running is not None
    url = gateway.running.url
    for i in range(6):
        before = picks(gateway)
        body = chat_body(f"Request {i}: " + "why? " * 12)
        result, counts = served(agg_fleet, lambda b=body: send(url, b))  # type: ignore[misc]
        assert result.status == 200, result.error
        picked = delta(picks(gateway), before)
        assert len(picked) == 1 and sum(picked.values()) == 1
        assert counts == {instance_of(agg_fleet, next(iter(picked))): 1}

    # Concurrent requests spread over the workers (each booking adds load), and per worker the
    # picks are exactly what the workers served.
    before = picks(gateway)
    bodies = [
        chat_body(f"Concurrent {i}: " + "tell me more " * 40, max_tokens=64) for i in range(9)
    ]
    results, counts = served(agg_fleet, lambda: send_all(url, bodies))
    assert all(r.status == 200 for r in results), [r.error for r in results]
    picked = delta(picks(gateway), before)
    assert len(picked) >= 2
    assert counts == {instance_of(agg_fleet, a): n for a, n in picked.items()}


def test_requests_without_a_body_reach_the_frontend(gateway: LocalGateway) -> None:
    assert gateway.running is not None
    models = json.loads(get(f"{gateway.running.url}/v1/models"))
    assert [m["id"] for m in models["data"]] == ["Qwen/Qwen3-0.6B"]


def test_shared_prefixes_stay_on_one_worker_and_predicted_cache_is_what_the_worker_reused(
    gateway: LocalGateway, agg_fleet: DynamoFleet
) -> None:
    assert gateway.running is not None
    url, metrics_url = gateway.running.url, gateway.running.epp_metrics_url
    groups = range(3)
    homes: dict[int, set[int]] = {group: set() for group in groups}
    reused = 0
    for question in range(3):
        for group in groups:
            body = chat_body(f"Question {question} of group {group}?", system_prompt(group))
            before = epp_metrics(gateway)
            result, counts = served(agg_fleet, lambda b=body: send(url, b))  # type: ignore[misc]
            assert result.status == 200, result.error
            settled(metrics_url)
            after = epp_metrics(gateway)
            assert list(counts.values()) == [1]
            homes[group] |= set(counts)
            predicted = metric(after, "kvgate_predicted_cached_tokens_total") - metric(
                before, "kvgate_predicted_cached_tokens_total"
            )
            reported = metric(after, "kvgate_engine_cached_tokens_total") - metric(
                before, "kvgate_engine_cached_tokens_total"
            )
            # The worker's own usage report, the EPP's parity counter and its prediction agree.
            assert result.cached_tokens == reported == predicted
            if question > 0:
                assert result.cached_tokens is not None and result.cached_tokens >= 400
                reused += result.cached_tokens
    assert all(len(workers) == 1 for workers in homes.values()), homes
    assert reused > 0
    text = epp_metrics(gateway)
    # Parity histogram: every prediction error so far is 0 (all observations in (-1, 0]).
    count = metric(text, "kvgate_cache_prediction_error_tokens_count")
    assert metric(text, "kvgate_cache_prediction_error_tokens_bucket", le="0.0") == count
    assert metric(text, "kvgate_cache_prediction_error_tokens_bucket", le="-1.0") == 0


def test_epp_restart_rebuilds_the_index_from_the_workers_replay(
    gateway: LocalGateway, agg_fleet: DynamoFleet
) -> None:
    assert gateway.running is not None
    url = gateway.running.url
    body = chat_body("First visit.", system_prompt(7))
    first, counts = served(agg_fleet, lambda: send(url, body))
    assert first.status == 200, first.error
    [home] = counts

    gateway.supervisor.kill(gateway.epp_child)
    down, counts = served(agg_fleet, lambda: send(url, chat_body("Nobody picks me.")))
    assert down.status >= 500  # FailClose: no EPP, no request reaches Dynamo
    assert counts == {}

    gateway.restart_epp()
    metrics_url = gateway.running.epp_metrics_url
    wait_for(
        lambda: metric(get(metrics_url), "kvgate_kv_event_backfills") >= 1,
        10,
        "the restarted EPP replays the workers' event history",
    )
    assert metric(get(metrics_url), "inference_extension_prefix_indexer_size") > 0
    follow_up = chat_body("Second visit.", system_prompt(7))
    before = epp_metrics(gateway)
    again, counts = served(agg_fleet, lambda: send(url, follow_up))
    assert again.status == 200, again.error
    assert counts == {home: 1}
    predicted = metric(epp_metrics(gateway), "kvgate_predicted_cached_tokens_total") - metric(
        before, "kvgate_predicted_cached_tokens_total"
    )
    assert again.cached_tokens is not None and again.cached_tokens >= 400
    assert again.cached_tokens == predicted


def test_a_killed_worker_is_no_longer_picked_and_an_added_one_is(
    gateway: LocalGateway, agg_fleet: DynamoFleet
) -> None:
    assert gateway.running is not None
    url, metrics_url = gateway.running.url, gateway.running.epp_metrics_url
    body = chat_body("Where do I live?", system_prompt(8))
    first, counts = served(agg_fleet, lambda: send(url, body))
    assert first.status == 200, first.error
    [victim_id] = counts
    victim = agg_fleet.by_instance(victim_id)
    endpoints = healthz(metrics_url)["endpoints"]

    agg_fleet.kill_worker(victim, signal.SIGKILL)
    wait_for(
        lambda: healthz(metrics_url)["fresh_endpoints"] == endpoints - 1,
        10,
        "the EPP sees the killed worker's metrics go stale",
    )
    # Dynamo still lists it (its lease has not run out): kvgate stopped picking it first.
    assert victim_id in agg_fleet.frontend("direct").instance_ids()
    before = picks(gateway)
    for i in range(3):
        again = chat_body(f"Where do I live now? {i}", system_prompt(8))
        result, counts = served(agg_fleet, lambda b=again: send(url, b))  # type: ignore[misc]
        assert result.status == 200, result.error
        assert list(counts) != [victim_id] and sum(counts.values()) == 1
    assert victim.address not in delta(picks(gateway), before)

    newcomer = agg_fleet.add_worker()
    wait_for(
        lambda: (
            newcomer.address in json.dumps(picks(gateway))
            or healthz(metrics_url)["fresh_endpoints"] == endpoints
        ),
        10,
        "the EPP discovers the added worker",
    )
    before = picks(gateway)
    bodies = [chat_body(f"Spread {i}: " + "load " * 200, max_tokens=64) for i in range(8)]
    results, counts = served(agg_fleet, lambda: send_all(url, bodies))
    assert all(r.status == 200 for r in results), [r.error for r in results]
    picked = delta(picks(gateway), before)
    assert picked.get(newcomer.address, 0) >= 1
    assert counts.get(newcomer.instance_id, 0) == picked[newcomer.address]


def test_any_picker_names_the_worker_it_picks(
    agg_fleet: DynamoFleet, qwen3_dir: Path, tmp_path: Path
) -> None:
    """The standard EPP (round-robin picker, no KV scorer) sets no Dynamo header of its own;
    the worker is still named, or the direct-mode frontend would refuse the request."""
    config = LocalGatewayConfig(
        backend="dynamo",
        dynamo_fleet=agg_fleet,
        dynamo_router_mode="direct",
        mode="standard",
        port=free_port(),
        tokenizer=str(qwen3_dir),
        run_dir=tmp_path,
    )
    gateway = LocalGateway(config)
    with gateway:
        for i in range(3):
            before = picks(gateway)
            body = chat_body(f"Round robin {i}.")
            result, counts = served(agg_fleet, lambda b=body: send(gateway.running.url, b))  # type: ignore[misc, union-attr]
            assert result.status == 200, result.error
            [address] = delta(picks(gateway), before)
            assert counts == {instance_of(agg_fleet, address): 1}
