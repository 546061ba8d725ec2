"""What the ext_proc fuzzer (tests/reliability) found, pinned through the real gRPC stream: inputs
a data plane or client can send that once made the picker answer 500 or leave bookkeeping behind;
and the gauges that show what it holds per request."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.extproc.utils import (
    MODEL,
    ExtProcStream,
    Stack,
    body_msgs,
    chat_body,
    response_body_msg,
    response_headers_msg,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

NESTED = 100_000


def held(stack: Stack) -> dict[str, float]:
    """Everything the picker keeps per request (all 0 when idle), running-requests gauge too."""
    out: dict[str, float] = dict(stack.runtime.bookkeeping())
    out["running"] = sum(
        s.value for m in stack.runtime.metrics.running.collect() for s in m.samples
    )
    return out


IDLE = {"open_streams": 0, "buffered_request_bytes": 0, "awaiting_observer": 0,
        "inflight_bookings": 0, "own_inflight_bookings": 0, "running": 0}  # fmt: skip


async def settle(stack: Stack) -> None:
    """A stream ends on the server a moment after the client half-closes."""
    for _ in range(200):
        if not stack.runtime.bookkeeping()["open_streams"]:
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * NESTED + b"]" * NESTED,
        json.dumps({"model": MODEL, "messages": []}).encode()[:-1]
        + b', "x": '
        + b"[" * NESTED
        + b"]" * NESTED
        + b"}",
    ],
    ids=["nested-array", "nested-inside-a-request"],
)
async def test_json_nested_too_deeply_is_a_400(stack: Stack, body: bytes) -> None:
    stream = ExtProcStream(stack.channel)
    routed = await stream.route(body)
    await stream.close()
    assert routed.immediate_status == 400
    assert routed.immediate_body is not None
    assert "nested too deeply" in routed.immediate_body["error"]["message"]


async def test_a_body_without_a_headers_phase_is_routed(stack: Stack) -> None:
    # Envoy sends no request headers when its processing mode skips them.
    stream = ExtProcStream(stack.channel)
    for msg in body_msgs(chat_body("no headers came first")):
        await stream.send(msg)
    answer = await stream.recv()
    await stream.close()
    assert not answer.HasField("immediate_response"), answer
    mutation = answer.request_headers.response.header_mutation
    destination = {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}
    assert destination["x-gateway-destination-endpoint"] in stack.addresses
    await settle(stack)
    assert held(stack) == IDLE


async def test_a_second_end_of_body_neither_routes_again_nor_leaks(stack: Stack) -> None:
    stream = ExtProcStream(stack.channel)
    await stream.route(chat_body("route me once"), {"x-request-id": "req-twice"})
    for msg in body_msgs(chat_body("route me once")):
        await stream.send(msg)  # a misbehaving data plane ends the body again
    await stream.send(response_headers_msg(200))
    answer = await stream.recv()
    assert answer.HasField("response_headers"), answer  # not a second routing answer
    await stream.send(response_body_msg(b'{"usage": {"prompt_tokens": 9}}', True))
    await stream.recv()
    await stream.close()
    await settle(stack)
    assert held(stack) == IDLE


@pytest.mark.parametrize("content_type", ["application/json", "text/event-stream"])
async def test_a_response_body_nested_too_deeply_still_completes_the_request(
    stack: Stack, content_type: str
) -> None:
    stream = ExtProcStream(stack.channel)
    await stream.route(chat_body("answer me deeply"), {"x-request-id": "req-deep"})
    await stream.send(response_headers_msg(200, content_type))
    await stream.recv()
    # The usage reader keeps a streamed body's last 64 KiB: nest within that.
    depth = NESTED if content_type == "application/json" else 20_000
    nested = b"[" * depth + b"]" * depth
    body = nested if content_type == "application/json" else b"data: " + nested + b"\n\n"
    await stream.send(response_body_msg(body, True))
    echoed = await stream.recv()
    assert echoed.HasField("response_body"), echoed  # passed back, not a 500
    await stream.close()
    await settle(stack)
    assert held(stack) == IDLE


async def test_bookkeeping_is_exported_on_healthz_and_metrics(stack: Stack) -> None:
    stream = ExtProcStream(stack.channel)
    await stream.route(chat_body("count me"), {"x-request-id": "req-counted"})
    during = stack.runtime.bookkeeping()
    assert during["open_streams"] == 1 and during["inflight_bookings"] == 1, during
    port = stack.runtime.bound_ports["metrics"]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
            health = await resp.json()
        async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
    assert health["bookkeeping"] == during
    for line in ("kvgate_open_streams 1.0", "kvgate_inflight_bookings 1.0"):
        assert line in text.splitlines(), line
    for name in ("kvgate_buffered_request_bytes", "kvgate_asyncio_tasks",
                 "process_resident_memory_bytes", "process_open_fds"):  # fmt: skip
        assert f"\n{name} " in text, name
    stream.cancel()
    await settle(stack)
    assert held(stack) == IDLE
