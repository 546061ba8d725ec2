"""The response phase on an observer stream (an ext_proc filter in ``observability_mode``), at
the protocol level: how the picker ties it to the routed request, answers nothing on it, and
frees the request however the two streams end. The same through a real Envoy:
tests/gateway/test_response_observer.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from kvgate.extproc import protocol as proto
from kvgate.scheduling.services import LoadOwner
from tests.extproc.utils import (
    ExtProcStream,
    Stack,
    chat_body,
    response_body_msg,
    response_headers_msg,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

GRACE_S = 0.3


@pytest.fixture(autouse=True)
def short_grace(stack: Stack) -> Iterator[None]:
    options = stack.runtime.director.options  # type: ignore[union-attr]
    saved = options.observer_grace_s
    options.observer_grace_s = GRACE_S
    yield
    options.observer_grace_s = saved


def kv_scorer(stack: Stack) -> LoadOwner:
    (owner,) = stack.runtime.shared_load.owners.values()
    return owner


def own_keys(stack: Stack) -> set[str]:
    return {key for key, _ in kv_scorer(stack).router.active.own()}


def observed(msg: pb.ProcessingRequest, request_key: str | None) -> pb.ProcessingRequest:
    """``msg`` as an observe-only filter sends it, forwarding the routing answer's metadata."""
    msg.observability_mode = True
    if request_key is not None:
        meta = struct_pb2.Struct()
        meta.update({proto.OBSERVER_KEY: request_key})
        msg.metadata_context.filter_metadata[proto.OBSERVER_NAMESPACE].CopyFrom(meta)
    return msg


async def route_without_responses(stack: Stack, text: str) -> tuple[ExtProcStream, str, str]:
    """A routing stream whose filter sends no response body (its protocol_config says NONE);
    returns it, the request key in its metadata and the booking it made."""
    before = own_keys(stack)
    stream = ExtProcStream(stack.channel)
    routed = await stream.route(
        chat_body(text, max_tokens=4),
        {"x-request-id": "client-chosen"},
        response_body_mode=proto.BODY_NONE,
    )
    (booking,) = own_keys(stack) - before
    return stream, routed.metadata[proto.OBSERVER_NAMESPACE][proto.OBSERVER_KEY], booking


async def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def matched(stack: Stack, outcome: str) -> float:
    metric = stack.runtime.metrics.observer_streams
    return sum(
        s.value
        for m in metric.collect()
        for s in m.samples
        if s.name.endswith("_total") and s.labels["outcome"] == outcome
    )


async def test_the_observer_reports_first_chunk_usage_and_end_and_gets_no_answer(
    stack: Stack,
) -> None:
    routing, key, booking = await route_without_responses(stack, "observe me")
    assert key != "client-chosen"  # the picker's own key, never the client's
    assert stack.runtime.director.awaiting_observer == 1  # type: ignore[union-attr]
    call = stack.channel.stream_stream(
        "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
        request_serializer=pb.ProcessingRequest.SerializeToString,
        response_deserializer=pb.ProcessingResponse.FromString,
    )()
    await call.write(observed(response_headers_msg(200, "text/event-stream"), key))
    await call.write(observed(response_body_msg(b'data: {"choices": []}\n\n', False), key))
    router = kv_scorer(stack).router

    def prefill_done() -> bool:
        held = router.active.get(booking)
        return held is not None and held.prefill_done

    await wait_for(prefill_done)  # the first chunk reached the booking
    usage = {"usage": {"prompt_tokens": 10, "completion_tokens": 3}}
    end = f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode()
    await call.write(observed(response_body_msg(end, True), key))
    await wait_for(lambda: booking not in router.active)
    assert stack.runtime.director.awaiting_observer == 0  # type: ignore[union-attr]
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF  # Envoy ignores answers: none are sent
    await routing.close()


async def test_routing_stream_ending_without_an_observer_frees_after_the_grace(
    stack: Stack,
) -> None:
    """The client left before the response began: no observer stream ever comes."""
    routing, _, booking = await route_without_responses(stack, "nobody observes me")
    routing.cancel()
    await asyncio.sleep(GRACE_S / 3)
    assert booking in kv_scorer(stack).router.active  # the observer's messages may be late
    await wait_for(lambda: booking not in kv_scorer(stack).router.active)
    assert stack.runtime.director.awaiting_observer == 0  # type: ignore[union-attr]


async def test_observer_stream_ending_early_frees_at_once(stack: Stack) -> None:
    """Client gone or upstream reset mid-response: the observer's stream ends without the end of
    the response, while the routing stream is still open."""
    routing, key, booking = await route_without_responses(stack, "cut me off")
    router = kv_scorer(stack).router
    observer = ExtProcStream(stack.channel)
    await observer.send(observed(response_headers_msg(200, "text/event-stream"), key))
    await observer.send(observed(response_body_msg(b"data: {}\n\n", False), key))
    # Cancelled before the picker read them, the messages would never be tied to the request:
    # that case is the grace test's above.
    await wait_for(lambda: (held := router.active.get(booking)) is not None and held.prefill_done)
    observer.cancel()
    await wait_for(lambda: booking not in kv_scorer(stack).router.active, timeout=GRACE_S * 3)
    routing.cancel()


@pytest.mark.parametrize("key", [None, "not-a-routed-request"])
async def test_an_observer_naming_no_routed_request_is_ended_at_once(
    stack: Stack, key: str | None
) -> None:
    before = matched(stack, "unmatched")
    call = stack.channel.stream_stream(
        "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
        request_serializer=pb.ProcessingRequest.SerializeToString,
        response_deserializer=pb.ProcessingResponse.FromString,
    )()
    await call.write(observed(response_headers_msg(404), key))
    assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF
    assert matched(stack, "unmatched") == before + 1


async def test_a_routing_stream_that_sees_the_response_itself_awaits_no_observer(
    stack: Stack,
) -> None:
    stream = ExtProcStream(stack.channel)
    routed = await stream.route(chat_body("inline responses", max_tokens=2))
    assert proto.OBSERVER_NAMESPACE not in routed.metadata
    assert stack.runtime.director.awaiting_observer == 0  # type: ignore[union-attr]
    stream.cancel()


async def test_a_named_replica_names_itself_next_to_the_key(stack: Stack) -> None:
    """With several replicas the gateway routes the observer's stream by this name."""
    options = stack.runtime.director.options  # type: ignore[union-attr]
    options.observer_replica = "epp-3"
    try:
        stream = ExtProcStream(stack.channel)
        routed = await stream.route(
            chat_body("which replica?", max_tokens=2), response_body_mode=proto.BODY_NONE
        )
        observer = routed.metadata[proto.OBSERVER_NAMESPACE]
        assert observer[proto.OBSERVER_REPLICA_KEY] == "epp-3"
        assert observer[proto.OBSERVER_KEY]
        stream.cancel()
    finally:
        options.observer_replica = None
