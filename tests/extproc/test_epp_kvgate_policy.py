"""kvgate's routing policy through the real ext_proc stream: SLO headers, shedding, the decision
header's predictions, and calibration from the response phase."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from kvgate.epp_configs import KVGATE, shipped_config
from kvgate.extproc.epp_runtime import EppRuntime
from kvgate.fleet.endpoint import EndpointMetrics
from kvgate.sim.fleet import Fleet
from kvgate.sim.prompts import TokensCodec
from tests.extproc.utils import (
    ExtProcStream,
    Stack,
    chat_body,
    loopback_epp_settings,
    loopback_fleet_config,
    response_body_msg,
    response_headers_msg,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

SYSTEM = "You are the latency test assistant. " + " ".join(
    f"Guideline {i}: be brief, cite section {i}." for i in range(60)
)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    codec = TokensCodec.load(str(qwen3_dir))
    config = loopback_fleet_config(3)
    endpoints_file = tmp_path_factory.mktemp("epp") / "endpoints.json"
    async with Fleet(config, codec) as fleet:
        settings = loopback_epp_settings(qwen3_dir, endpoints_file)
        settings.config_text = shipped_config(KVGATE)
        settings.options = dataclasses.replace(
            settings.options, priorities={"batch": -1, "chat": 2}, decision_header=True
        )
        stack = Stack(fleet, None, None, endpoints_file)  # type: ignore[arg-type]
        stack.write_endpoints()
        async with EppRuntime(settings) as runtime:
            stack.runtime = runtime
            await stack.wait_endpoints(3)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{runtime.bound_ports['grpc']}")
            stack.channel = channel
            try:
                yield stack
            finally:
                await channel.close()


async def route(stack: Stack, headers: dict[str, str], **body: object):  # type: ignore[no-untyped-def]
    stream = ExtProcStream(stack.channel)
    try:
        return await stream.route(
            chat_body("What is guideline 12?", system=SYSTEM, **body), headers
        )
    finally:
        stream.cancel()


async def test_the_decision_header_shows_each_candidates_predictions(stack: Stack) -> None:
    routed = await route(stack, {})
    decision = routed.set_headers["x-kvgate-decision"]
    assert "predicted_ttft/itl_ms=" in decision
    listed = decision.split("predicted_ttft/itl_ms=")[1].split(",")
    assert {entry.split(":")[0] + ":" + entry.split(":")[1] for entry in listed} == set(
        stack.addresses
    )
    assert listed[0].startswith(routed.destination), "the pick comes first"


async def test_an_unmeetable_slo_sheds_only_sheddable_requests(stack: Stack) -> None:
    impossible = {"x-slo-ttft-ms": "0.001"}
    shed = await route(stack, {**impossible, "x-gateway-inference-objective": "batch"})
    assert shed.immediate_status == 429
    assert "latency objectives" in shed.immediate_body["error"]["message"]

    kept = await route(stack, {**impossible, "x-gateway-inference-objective": "chat"})
    assert kept.immediate_status is None
    assert kept.destination in stack.addresses
    plain = await route(stack, impossible)
    assert plain.immediate_status is None, "priority 0 is not sheddable"
    assert stack.runtime.metrics.sheds.labels("slo")._value.get() == 1


async def test_a_meetable_slo_routes_normally(stack: Stack) -> None:
    routed = await route(
        stack,
        {
            "x-slo-ttft-ms": "60000",
            "x-slo-tpot-ms": "1000",
            "x-gateway-inference-objective": "batch",
        },
    )
    assert routed.destination in stack.addresses


@pytest.mark.parametrize("value", ["fast", "-5", "0", "nan"])
async def test_a_malformed_slo_header_is_a_400(stack: Stack, value: str) -> None:
    routed = await route(stack, {"x-slo-ttft-ms": value})
    assert routed.immediate_status == 400
    assert "x-slo-ttft-ms" in routed.immediate_body["error"]["message"]


async def test_a_streamed_first_chunk_calibrates_and_is_measured(stack: Stack) -> None:
    errors = stack.runtime.metrics.ttft_prediction_error
    before = sum(s.value for s in errors.collect()[0].samples if s.name.endswith("_count"))
    stream = ExtProcStream(stack.channel)
    try:
        routed = await stream.route(
            chat_body("Stream guideline 3.", system=SYSTEM, stream=True), {}
        )
        assert routed.destination in stack.addresses
        await stream.send(response_headers_msg(200, "text/event-stream"))
        await stream.recv()
        await stream.send(response_body_msg(b'data: {"choices": []}\n\n', end=False))
        await stream.recv()
        await stream.send(response_body_msg(b"data: [DONE]\n\n", end=True))
        await stream.recv()
    finally:
        stream.cancel()
    after = sum(s.value for s in errors.collect()[0].samples if s.name.endswith("_count"))
    assert after == before + 1
    fits = [
        plugin.model.fits  # type: ignore[attr-defined]
        for plugin in stack.runtime.plugins.plugins.values()  # type: ignore[union-attr]
        if plugin.type_name == "predicted-latency-scorer"
    ]
    assert fits[0][routed.destination].observations == 1


async def test_each_scrape_carries_what_the_epp_had_booked_on_the_worker(stack: Stack) -> None:
    """The latency model compares an engine's scraped queue with this count, taken as the
    scrape landed, rather than with the count when it predicts."""

    async def next_scrape(address: str) -> EndpointMetrics:
        endpoint = next(ep for ep in stack.runtime.endpoints if ep.address == address)
        since = time.monotonic()
        for _ in range(200):
            if (endpoint.metrics.updated_at or 0.0) > since:
                return endpoint.metrics
            await asyncio.sleep(0.01)
        raise AssertionError(f"no scrape of {address} in 2 s")

    stream = ExtProcStream(stack.channel)
    try:
        routed = await stream.route(chat_body("Hold guideline 7.", system=SYSTEM, stream=True), {})
        # Routed, no first chunk yet: booked there as prefilling.
        assert (await next_scrape(routed.destination)).booked_prefilling == 1
    finally:
        stream.cancel()
    for _ in range(200):  # the cancelled stream releases its booking
        if (await next_scrape(routed.destination)).booked_prefilling == 0:
            break
    else:
        raise AssertionError("the booking was not released")
