"""The body transformer driven by a real gRPC client playing Envoy's part, in every body mode."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvgate.extproc import body_transformer as bt
from kvgate.extproc.nvext import Injected, inject_nvext
from kvgate.extproc.protocol import MAX_CHUNK_BYTES
from kvgate.extproc.tls import self_signed
from tests.extproc.nvext_cases import CASE_IDS, CASES, NvextCase, agg, chat, dumps
from tests.extproc.utils import (
    BUFFERED,
    FULL_DUPLEX,
    ExtProcStream,
    Routed,
    body_msgs,
    headers_msg,
    response_body_msg,
    response_headers_msg,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

PARTIAL = processing_mode_pb2.ProcessingMode.BUFFERED_PARTIAL
STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
MAX_BODY = 400_000
TIMEOUT = 10.0


class Service:
    def __init__(self, runtime: bt.BodyTransformerRuntime, channel: grpc.aio.Channel) -> None:
        self.runtime = runtime
        self.channel = channel

    def stream(self) -> ExtProcStream:
        return ExtProcStream(self.channel)

    def count(self, name: str, **labels: str) -> float:
        value = self.runtime.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


def _settings(**overrides: object) -> bt.TransformerSettings:
    settings = bt.TransformerSettings(
        bind="127.0.0.1", port=0, health_port=0, metrics_port=0, max_body_bytes=MAX_BODY
    )
    for key, value in overrides.items():
        setattr(settings, key, value)
    return settings


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def service() -> AsyncIterator[Service]:
    async with bt.BodyTransformerRuntime(_settings()) as runtime:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{runtime.bound_ports['grpc']}")
        try:
            yield Service(runtime, channel)
        finally:
            await channel.close(None)


def _expected_body(case: NvextCase) -> bytes | None:
    result = inject_nvext(case.body, case.headers)
    return result.body if isinstance(result, Injected) else None


def _rewritten(body: bytes, headers: dict[str, str]) -> bytes:
    result = inject_nvext(body, headers)
    assert isinstance(result, Injected), result
    return result.body


def _assert_plain_continue(response: pb.ProcessingResponse) -> None:
    assert response.WhichOneof("response") == "request_body"
    assert not response.request_body.response.HasField("body_mutation")
    assert not response.request_body.response.HasField("header_mutation")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
async def test_buffered_mode(service: Service, case: NvextCase) -> None:
    routed = await service.stream().route(
        case.body, case.headers, body_mode=BUFFERED, chunk=max(1, len(case.body))
    )
    expected = _expected_body(case)
    assert routed.immediate_status is None
    headers_answer, body_answer = routed.responses
    assert headers_answer.WhichOneof("response") == "request_headers"
    assert not headers_answer.request_headers.response.HasField("header_mutation")
    if case.unchanged:
        assert expected is None
        _assert_plain_continue(body_answer)
        return
    assert expected is not None
    assert routed.body == expected
    assert routed.set_headers == {"content-length": str(len(expected))}
    assert not routed.clear_route_cache


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
async def test_full_duplex_mode(service: Service, case: NvextCase) -> None:
    routed = await service.stream().route(case.body, case.headers, body_mode=FULL_DUPLEX)
    out = _expected_body(case) or case.body
    assert routed.body == out
    assert routed.set_headers == {"content-length": str(len(out))}
    assert routed.responses[0].WhichOneof("response") == "request_headers"
    chunks = [r.request_body.response.body_mutation.streamed_response for r in routed.responses[1:]]
    assert all(len(c.body) <= MAX_CHUNK_BYTES for c in chunks)
    assert [c.end_of_stream for c in chunks] == [False] * (len(chunks) - 1) + [True]


async def test_large_body_is_streamed_back_in_several_chunks(service: Service) -> None:
    body = dumps(chat(prompt="x" * 300_000))
    routed = await service.stream().route(body, agg(), body_mode=FULL_DUPLEX, chunk=50_000)
    body_answers = routed.responses[1:]
    assert len(body_answers) == -(-len(routed.body) // MAX_CHUNK_BYTES) >= 5
    assert routed.body == _rewritten(body, agg())


async def test_buffered_body_is_answered_without_waiting_for_end_of_stream(
    service: Service,
) -> None:
    """Envoy sends a buffered body as one message; end_of_stream is false when trailers follow,
    and Envoy still waits for the answer before sending anything else."""
    body = dumps(chat())
    stream = service.stream()
    await stream.send(headers_msg(agg(), body_mode=BUFFERED))
    assert (await stream.recv()).WhichOneof("response") == "request_headers"
    await stream.send(pb.ProcessingRequest(request_body=pb.HttpBody(body=body)))
    answer = await stream.recv()
    assert answer.request_body.response.body_mutation.body == _rewritten(body, agg())
    await stream.send(pb.ProcessingRequest(request_trailers=pb.HttpTrailers()))
    assert (await stream.recv()).WhichOneof("response") == "request_trailers"


async def _partial_exchange(
    service: Service, body: bytes, *, end_of_stream: bool
) -> tuple[ExtProcStream, pb.ProcessingResponse]:
    stream = service.stream()
    await stream.send(headers_msg({":method": "POST", **agg()}, body_mode=PARTIAL))
    headers_answer = await stream.recv()
    assert headers_answer.WhichOneof("response") == "request_headers"
    msg = pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=end_of_stream))
    await stream.send(msg)
    return stream, await stream.recv()


async def test_buffered_partial_complete_body_is_transformed(service: Service) -> None:
    body = dumps(chat(nvext={"ignore_eos": True}))
    _, answer = await _partial_exchange(service, body, end_of_stream=True)
    common = answer.request_body.response
    expected = inject_nvext(body, agg())
    assert isinstance(expected, Injected)
    assert common.body_mutation.body == expected.body
    assert (
        common.header_mutation.set_headers[0].header.raw_value == str(len(expected.body)).encode()
    )


async def test_buffered_partial_cut_body_passes_through(service: Service) -> None:
    before = service.count("kvgate_body_transformer_passed_through_total", reason="partial_body")
    stream, answer = await _partial_exchange(service, b'{"model": "m", "pro', end_of_stream=False)
    _assert_plain_continue(answer)
    # Envoy lets the rest flow past the processor; should more arrive, it is just continued.
    await stream.send(pb.ProcessingRequest(request_body=pb.HttpBody(body=b'mpt":"x"}')))
    _assert_plain_continue(await stream.recv())
    after = service.count("kvgate_body_transformer_passed_through_total", reason="partial_body")
    assert after == before + 1


async def test_streamed_mode_is_continued_chunk_by_chunk(service: Service) -> None:
    before = service.count(
        "kvgate_body_transformer_passed_through_total", reason="unsupported_mode"
    )
    stream = service.stream()
    await stream.send(headers_msg(agg(), body_mode=STREAMED))
    assert (await stream.recv()).WhichOneof("response") == "request_headers"
    for msg in body_msgs(dumps(chat()), chunk=10):
        await stream.send(msg)
        _assert_plain_continue(await stream.recv())
    after = service.count("kvgate_body_transformer_passed_through_total", reason="unsupported_mode")
    assert after == before + 1


async def test_full_duplex_body_ended_by_trailers(service: Service) -> None:
    body = dumps(chat())
    stream = service.stream()
    await stream.send(headers_msg(agg(), body_mode=FULL_DUPLEX))
    await stream.send(pb.ProcessingRequest(request_body=pb.HttpBody(body=body)))
    await stream.send(pb.ProcessingRequest(request_trailers=pb.HttpTrailers()))
    kinds = []
    routed = Routed()
    for _ in range(3):
        response = await stream.recv()
        kinds.append(response.WhichOneof("response"))
        if response.HasField("request_body"):
            routed.body += response.request_body.response.body_mutation.streamed_response.body
    assert kinds == ["request_headers", "request_body", "request_trailers"]
    assert routed.body == _rewritten(body, agg())


async def test_request_without_body(service: Service) -> None:
    before = service.count("kvgate_body_transformer_passed_through_total", reason="no_body")
    for mode in (BUFFERED, FULL_DUPLEX):
        stream = service.stream()
        await stream.send(
            headers_msg({":method": "GET", **agg()}, end_of_stream=True, body_mode=mode)
        )
        answer = await stream.recv()
        assert answer.WhichOneof("response") == "request_headers"
        assert not answer.request_headers.response.HasField("header_mutation")
    after = service.count("kvgate_body_transformer_passed_through_total", reason="no_body")
    assert after == before + 2


async def test_mode_defaults_to_buffered_when_not_announced(service: Service) -> None:
    stream = service.stream()
    await stream.send(headers_msg(agg(), body_mode=None))
    assert (await stream.recv()).WhichOneof("response") == "request_headers"
    body = dumps(chat())
    await stream.send(pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)))
    answer = await stream.recv()
    assert answer.request_body.response.body_mutation.body == _rewritten(body, agg())


@pytest.mark.parametrize(
    "mode", [BUFFERED, FULL_DUPLEX, PARTIAL], ids=["buffered", "full_duplex", "partial"]
)
async def test_body_over_the_limit_gets_413(service: Service, mode: int) -> None:
    before = service.count("kvgate_body_transformer_rejected_total", code="413")
    body = dumps(chat(prompt="z" * MAX_BODY))
    chunk = 100_000 if mode == FULL_DUPLEX else len(body)  # buffered modes: one message
    stream = service.stream()
    routed = await stream.route(body, agg(), body_mode=mode, chunk=chunk)
    assert routed.immediate_status == 413
    assert routed.immediate_body is not None
    assert str(MAX_BODY) in routed.immediate_body["error"]["message"]
    assert service.count("kvgate_body_transformer_rejected_total", code="413") == before + 1


async def test_response_phases_are_passed_back(service: Service) -> None:
    stream = service.stream()
    await stream.send(headers_msg(agg(), end_of_stream=True, body_mode=FULL_DUPLEX))
    await stream.recv()
    await stream.send(response_headers_msg())
    assert (await stream.recv()).WhichOneof("response") == "response_headers"
    await stream.send(response_body_msg(b"data: 1\n\n", end=True))
    echoed = await stream.recv()
    assert echoed.response_body.response.body_mutation.streamed_response.body == b"data: 1\n\n"


async def test_internal_error_is_a_500_not_a_crash(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(body: bytes, headers: dict[str, str]) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(bt, "inject_nvext", broken)
    routed = await service.stream().route(dumps(chat()), agg(), body_mode=BUFFERED)
    assert routed.immediate_status == 500
    monkeypatch.undo()
    routed = await service.stream().route(dumps(chat()), agg(), body_mode=BUFFERED)
    assert routed.immediate_status is None


async def test_garbage_messages_do_not_break_the_stream(service: Service) -> None:
    stream = service.stream()
    await stream.send(pb.ProcessingRequest())  # no phase at all
    garbage = pb.HttpBody(body=b"\xff\x00", end_of_stream=True)
    await stream.send(pb.ProcessingRequest(request_body=garbage))
    _assert_plain_continue(await stream.recv())  # body before headers: no routing headers


async def test_counters_by_reason_and_mode(service: Service) -> None:
    def snapshot() -> tuple[float, ...]:
        return (
            service.count("kvgate_body_transformer_transformed_total", mode="aggregated"),
            service.count("kvgate_body_transformer_transformed_total", mode="disaggregated"),
            service.count("kvgate_body_transformer_passed_through_total", reason="not_json"),
            service.count("kvgate_body_transformer_passed_through_total", reason="bad_id"),
            service.count("kvgate_body_transformer_nvext_replaced_total"),
        )

    before = snapshot()
    for case in CASES:
        if case.name in {"aggregated", "disaggregated", "not_json_text", "negative_id"}:
            await service.stream().route(case.body, case.headers, body_mode=BUFFERED)
    await service.stream().route(b'{"nvext":null}', agg(), body_mode=BUFFERED)
    after = snapshot()
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 1, 1, 1, 1]


async def test_each_reason_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    transformer = bt.BodyTransformer(bt.TransformerMetrics(), max_body_bytes=MAX_BODY)
    with caplog.at_level(logging.INFO, logger="kvgate.body_transformer"):
        for _ in range(3):
            await transformer.transform(b"not json", agg())
            await transformer.transform(b"{}", agg("x"))
            await transformer.transform(b"{}", {})
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert sum("(not_json)" in m for m in messages) == 1
    assert sum("(bad_id)" in m for m in messages) == 1
    assert sum("(missing_header)" in m for m in messages) == 1
    levels = {r.getMessage().split("(")[1].split(")")[0]: r.levelno for r in caplog.records}
    assert levels == {
        "not_json": logging.WARNING,
        "bad_id": logging.WARNING,
        "missing_header": logging.INFO,
    }


async def test_health_serves_both_services(service: Service) -> None:
    port = service.runtime.bound_ports["health"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", bt.EXT_PROC_SERVICE):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_metrics_endpoint(service: Service) -> None:
    await service.stream().route(dumps(chat()), agg(), body_mode=BUFFERED)
    url = f"http://127.0.0.1:{service.runtime.bound_ports['metrics']}/metrics"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session,
        session.get(url) as response,
    ):
        text = await response.text()
    assert response.status == 200
    assert 'kvgate_body_transformer_transformed_total{mode="aggregated"}' in text
    for reason in bt.PASS_REASONS:
        assert f'kvgate_body_transformer_passed_through_total{{reason="{reason}"}}' in text
    assert "kvgate_body_transformer_duration_seconds_bucket" in text


async def test_tls(tmp_path: Path) -> None:
    key, cert = self_signed()
    (tmp_path / "tls.key").write_bytes(key)
    (tmp_path / "tls.crt").write_bytes(cert)
    async with bt.BodyTransformerRuntime(_settings(secure=True, cert_path=tmp_path)) as runtime:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert)
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{runtime.bound_ports['grpc']}",
            credentials,
            options=[("grpc.ssl_target_name_override", "kvgate-epp")],
        ) as channel:
            routed = await ExtProcStream(channel).route(dumps(chat()), agg(), body_mode=BUFFERED)
    assert routed.body == _rewritten(dumps(chat()), agg())
