"""The picker driven through every ext_proc phase by a real gRPC client, in front of real
simulated engines whose KV events feed its index."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvgate.extproc.epp_runtime import EppRuntime
from kvgate.scheduling.services import LoadOwner
from tests.extproc.utils import (
    BUFFERED,
    FULL_DUPLEX,
    MODEL,
    SEED_CONFIG,
    ExtProcStream,
    Stack,
    chat_body,
    headers_msg,
    loopback_epp_settings,
    response_body_msg,
    response_headers_msg,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

LONG_SYSTEM = "You are the routing test assistant. " + " ".join(
    f"Rule {i}: answer precisely and cite block {i * 7}." for i in range(120)
)


def kv_scorer(stack: Stack) -> LoadOwner:
    (owner,) = stack.runtime.shared_load.owners.values()
    return owner


async def send_to_worker(address: str, body: bytes) -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://{address}/v1/chat/completions",
            data=body,
            headers={"content-type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=10),
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]


async def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_full_duplex_routes_with_header_metadata_and_body(stack: Stack) -> None:
    body = chat_body("hello there", max_tokens=4)
    stream = ExtProcStream(stack.channel)
    routed = await stream.route(body)
    await stream.close()
    dest = routed.destination
    assert dest in stack.addresses
    assert routed.metadata == {"envoy.lb": {"x-gateway-destination-endpoint": dest}}
    assert routed.clear_route_cache
    assert routed.body == body
    assert routed.set_headers["content-length"] == str(len(body))
    assert routed.set_headers["x-dynamo-routing-mode"] == "aggregated"
    worker = next(w for w in stack.fleet.workers if w.url.endswith(dest))
    assert routed.set_headers["x-worker-instance-id"] == str(worker.instance_id)
    uuid.UUID(routed.set_headers["x-request-id"])  # generated when the client sent none


async def test_buffered_mode_answers_headers_first_then_decides_on_body(stack: Stack) -> None:
    stream = ExtProcStream(stack.channel)
    routed = await stream.route(
        chat_body("buffered hello"), {"x-request-id": "req-buffered"}, body_mode=BUFFERED
    )
    await stream.close()
    assert routed.destination in stack.addresses
    assert routed.metadata["envoy.lb"]["x-gateway-destination-endpoint"] == routed.destination
    first = routed.responses[0]
    assert first.HasField("request_headers")
    assert not first.request_headers.response.header_mutation.set_headers
    assert "x-request-id" not in routed.set_headers  # the client's id is kept as it is


async def test_body_larger_than_one_chunk_comes_back_in_62000_byte_chunks(stack: Stack) -> None:
    body = chat_body("x " * 80_000, max_tokens=1)
    stream = ExtProcStream(stack.channel)
    routed = await stream.route(body, chunk=50_000)
    await stream.close()
    chunks = [
        r.request_body.response.body_mutation.streamed_response.body
        for r in routed.responses
        if r.HasField("request_body")
    ]
    assert len(chunks) == -(-len(body) // 62_000)
    assert all(len(c) <= 62_000 for c in chunks)
    assert b"".join(chunks) == body


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"messages": []}).encode(), 400, "'model'"),
        (chat_body("hi", model="other-model"), 404, "other-model"),
        (json.dumps({"model": MODEL, "messages": "nope"}).encode(), 400, "messages"),
        (b"x" * 1_000_001, 413, "exceeds"),
    ],
    ids=["malformed-json", "not-an-object", "no-model", "unknown-model", "bad-messages", "too-big"],
)
async def test_bad_requests_get_immediate_json_errors(
    stack: Stack, body: bytes, status: int, needle: str
) -> None:
    stream = ExtProcStream(stack.channel)
    routed = await stream.route(body)
    await stream.close()
    assert routed.immediate_status == status
    assert routed.immediate_body is not None
    assert needle in routed.immediate_body["error"]["message"]
    assert routed.immediate_body["error"]["code"] == status


async def test_subset_hint_restricts_choice_and_empty_subset_is_503(stack: Stack) -> None:
    only = stack.addresses[2]
    for _ in range(3):
        stream = ExtProcStream(stack.channel)
        routed = await stream.route(chat_body("subset please"), subset=[only])
        await stream.close()
        assert routed.destination == only
    stream = ExtProcStream(stack.channel)
    routed = await stream.route(chat_body("subset please"), subset=["10.9.9.9:1"])
    await stream.close()
    assert routed.immediate_status == 503


async def test_client_routing_headers_cannot_steer(stack: Stack) -> None:
    forged = {
        "x-gateway-destination-endpoint": "10.6.6.6:80",
        "x-worker-instance-id": "666",
        "x-prefiller-host-port": "10.6.6.6:81",
        "x-dynamo-routing-mode": "disaggregated",
    }
    stream = ExtProcStream(stack.channel)
    routed = await stream.route(chat_body("let me pick"), forged)
    await stream.close()
    assert routed.destination in stack.addresses
    assert routed.set_headers["x-worker-instance-id"] != "666"
    assert routed.set_headers["x-dynamo-routing-mode"] == "aggregated"
    assert "x-prefiller-host-port" in routed.removed


async def test_gateway_internal_headers_from_a_client_are_not_trusted(stack: Stack) -> None:
    """A client cannot get an unserved model past the 404 by naming a served one in the
    gateway's model-rewrite header; that header and the other gateway inputs are removed."""
    stream = ExtProcStream(stack.channel)
    routed = await stream.route(
        chat_body("let me in", model="not-served"), {"x-gateway-model-name-rewrite": MODEL}
    )
    await stream.close()
    assert routed.immediate_status == 404
    forged = {
        "x-gateway-model-name-rewrite": "not-served",
        "x-gateway-destination-endpoint-subset": "10.6.6.6:80",
        "x-gateway-destination-endpoint-served": "10.6.6.6:80",
        "x-kvgate-decision": "endpoint=10.6.6.6:80",
    }
    for body_mode in (FULL_DUPLEX, BUFFERED):
        stream = ExtProcStream(stack.channel)
        routed = await stream.route(chat_body("served model"), forged, body_mode=body_mode)
        await stream.close()
        assert routed.destination in stack.addresses  # the subset header is no subset hint
        assert set(forged) <= set(routed.removed)
        assert not set(forged) & set(routed.set_headers)


CLIENT_NVEXT = {
    "backend_instance_id": 666,
    "prefill_worker_id": 1,
    "decode_worker_id": 2,
    "ignore_eos": True,
    "annotations": ["keep-me"],
}


@pytest.mark.parametrize("body_mode", [FULL_DUPLEX, BUFFERED], ids=["full-duplex", "buffered"])
@pytest.mark.parametrize("size", ["small", "over-one-chunk"])
async def test_client_nvext_routing_fields_never_reach_the_backend(
    stack: Stack, body_mode: int, size: str
) -> None:
    """Without a body transformer (the chart's default) the picker's own answer is what reaches
    the worker: the client's routing fields are gone, its other nvext fields stay, and the
    rewritten body comes with its own content-length (in ≤62,000-byte chunks when streamed)."""
    text = "pick me " * (10 if size == "small" else 9_000)
    body = chat_body(text, max_tokens=1, nvext=CLIENT_NVEXT)
    stream = ExtProcStream(stack.channel)
    routed = await stream.route(body, body_mode=body_mode, chunk=40_000)
    await stream.close()
    assert routed.destination in stack.addresses
    forwarded = json.loads(routed.body)
    assert forwarded["nvext"] == {"ignore_eos": True, "annotations": ["keep-me"]}
    assert {k: v for k, v in forwarded.items() if k != "nvext"} == {
        k: v for k, v in json.loads(body).items() if k != "nvext"
    }
    assert routed.set_headers["content-length"] == str(len(routed.body))
    chunks = [
        r.request_body.response.body_mutation.streamed_response.body
        for r in routed.responses
        if r.HasField("request_body") and r.request_body.response.body_mutation.streamed_response
    ]
    assert all(len(c) <= 62_000 for c in chunks)
    if body_mode == FULL_DUPLEX and size == "over-one-chunk":
        assert len(chunks) > 1


FALLBACK_CONFIG = SEED_CONFIG.replace(
    "  type: max-score-picker\n",
    "  type: max-score-picker\n  parameters:\n    maxNumOfEndpoints: 3\n",
)


async def test_fallbacks_are_the_same_list_in_header_and_metadata(
    stack: Stack, qwen3_dir: Path
) -> None:
    """GAIE: the header and the ``envoy.lb`` metadata carry the same value, the pick first and
    then its ordered fallbacks (the protocol forbids them to differ)."""
    assert FALLBACK_CONFIG != SEED_CONFIG
    settings = dataclasses.replace(
        loopback_epp_settings(qwen3_dir, stack.endpoints_file), config_text=FALLBACK_CONFIG
    )
    async with EppRuntime(settings) as runtime:
        while len(runtime.endpoints) != 3:
            await asyncio.sleep(0.05)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.bound_ports['grpc']}") as ch:
            for body_mode in (FULL_DUPLEX, BUFFERED):
                stream = ExtProcStream(ch)
                routed = await stream.route(chat_body("with fallbacks"), body_mode=body_mode)
                await stream.close()
                listed = routed.destination.split(",")
                assert sorted(listed) == sorted(stack.addresses)
                assert routed.metadata == {
                    "envoy.lb": {"x-gateway-destination-endpoint": routed.destination}
                }
                worker = next(w for w in stack.fleet.workers if w.url.endswith(listed[0]))
                assert routed.set_headers["x-worker-instance-id"] == str(worker.instance_id)


async def test_shared_prefix_goes_to_the_worker_that_cached_it(stack: Stack) -> None:
    scorer = kv_scorer(stack)
    first = chat_body("What is the first question?", system=LONG_SYSTEM, max_tokens=2)
    stream = ExtProcStream(stack.channel)
    routed = await stream.route(first)
    await stream.close()
    target = routed.destination
    # The engine really serves it: its KV events then reach the picker's index.
    await send_to_worker(target, first)
    await wait_for(lambda: scorer.router.index.size(target) > 50)
    for question in ("A second question?", "And a third one, different?"):
        stream = ExtProcStream(stack.channel)
        routed = await stream.route(chat_body(question, system=LONG_SYSTEM, max_tokens=2))
        await stream.close()
        assert routed.destination == target


def own_keys(scorer: LoadOwner) -> set[str]:
    return {key for key, _ in scorer.router.active.own()}


async def finish_response(stream: ExtProcStream) -> None:
    """Play a complete non-streaming response through the stream's response phases."""
    await stream.send(response_headers_msg(200))
    assert (await stream.recv()).HasField("response_headers")
    await stream.send(response_body_msg(b'{"choices": []}', True))
    assert (
        await stream.recv()
    ).response_body.response.body_mutation.streamed_response.end_of_stream
    await stream.close()


async def test_media_requests_are_routed_with_credit_for_the_text_before_them(
    stack: Stack,
) -> None:
    """A request with an image is never refused by the picker (the backend decides what it
    serves), and the text the engine will see before the image earns prefix credit."""
    scorer = kv_scorer(stack)
    system = "You look at pictures for the routing tests. " * 60
    warm = chat_body("Describe the next picture.", system=system, max_tokens=2)
    stream = ExtProcStream(stack.channel)
    target = (await stream.route(warm)).destination
    await stream.close()
    await send_to_worker(target, warm)
    await wait_for(lambda: scorer.router.index.size(target) > 30)
    image = {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}
    for question in ("What is in it?", "Which colour is it?"):
        body = json.dumps(
            {
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": [image, {"type": "text", "text": question}]},
                ],
            }
        ).encode()
        stream = ExtProcStream(stack.channel)
        routed = await stream.route(body)
        await stream.close()
        assert routed.immediate_status is None, routed.immediate_body
        assert routed.destination == target
        assert routed.body == body


async def test_response_phases_release_bookkeeping(stack: Stack) -> None:
    scorer = kv_scorer(stack)
    before = own_keys(scorer)
    stream = ExtProcStream(stack.channel)
    await stream.route(chat_body("phases", max_tokens=2), {"x-request-id": "req-phases"})
    (key,) = own_keys(scorer) - before
    await stream.send(response_headers_msg(200, "text/event-stream"))
    assert (await stream.recv()).HasField("response_headers")
    await stream.send(response_body_msg(b'data: {"choices": []}\n\n', False))
    echoed = await stream.recv()
    assert echoed.response_body.response.body_mutation.streamed_response.body.startswith(b"data:")
    booked = scorer.router.active.get(key)
    assert booked is not None and booked.prefill_done
    usage = {"usage": {"prompt_tokens": 10, "completion_tokens": 2,
                       "prompt_tokens_details": {"cached_tokens": 0}}}  # fmt: skip
    await stream.send(
        response_body_msg(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode(), True)
    )
    last = await stream.recv()
    assert last.response_body.response.body_mutation.streamed_response.end_of_stream
    await stream.close()
    assert key not in scorer.router.active


async def test_aborted_stream_frees_the_request(stack: Stack) -> None:
    scorer = kv_scorer(stack)
    before = own_keys(scorer)
    stream = ExtProcStream(stack.channel)
    await stream.route(chat_body("abort me", max_tokens=2), {"x-request-id": "req-abort"})
    (key,) = own_keys(scorer) - before
    stream.cancel()
    await wait_for(lambda: key not in scorer.router.active)


async def test_a_repeated_client_request_id_cannot_free_another_requests_load(
    stack: Stack,
) -> None:
    """Bookkeeping is keyed per stream: a client reusing an ``x-request-id`` (by mistake, or to
    release someone else's booking) frees only its own request."""
    scorer = kv_scorer(stack)
    before = own_keys(scorer)
    first, second = ExtProcStream(stack.channel), ExtProcStream(stack.channel)
    routed = []
    for stream, text in ((first, "twin request one"), (second, "twin request two")):
        routed.append(await stream.route(chat_body(text, max_tokens=2), {"x-request-id": "twin"}))
    assert all("x-request-id" not in r.set_headers for r in routed)  # forwarded as the client sent
    keys = own_keys(scorer) - before
    assert len(keys) == 2 and "twin" not in keys
    await finish_response(first)
    (left,) = own_keys(scorer) - before
    booking = scorer.router.active.get(left)
    assert booking is not None and booking.worker == routed[1].destination
    assert scorer.router.active.in_flight(routed[1].destination) >= 1
    await finish_response(second)
    assert own_keys(scorer) == before


async def test_bodyless_request_is_routed_to_some_endpoint(stack: Stack) -> None:
    stream = ExtProcStream(stack.channel)
    await stream.send(headers_msg({":method": "GET", ":path": "/v1/models"}, end_of_stream=True))
    response = await stream.recv()
    await stream.close()
    mutation = response.request_headers.response.header_mutation
    dest = {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}
    assert dest["x-gateway-destination-endpoint"] in stack.addresses


@pytest.mark.slow
async def test_workers_join_and_leave_at_runtime(stack: Stack) -> None:
    scorer = kv_scorer(stack)
    gone = stack.addresses[1]
    stack.write_endpoints([0, 2])
    await stack.wait_endpoints(2)
    assert scorer.router.index.size(gone) == 0
    for i in range(6):
        stream = ExtProcStream(stack.channel)
        routed = await stream.route(chat_body(f"after leave {i}"))
        await stream.close()
        assert routed.destination != gone
    stack.write_endpoints()
    await stack.wait_endpoints(3)


async def test_health_services_answer(stack: Stack) -> None:
    port = stack.runtime.bound_ports["health"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_metrics_endpoint_exposes_upstream_and_kvgate_names(stack: Stack) -> None:
    port = stack.runtime.bound_ports["metrics"]
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=5)
        ) as resp,
    ):
        text = await resp.text()
    for name in (
        "inference_objective_request_total",
        "inference_extension_scheduler_e2e_duration_seconds",
        "inference_pool_ready_pods",
        "inference_extension_prefix_indexer_size",
        "kvgate_decisions_total",
        "kvgate_rejections_total",
        "kvgate_kv_events_ingested",
    ):
        assert name in text, name
