"""Shared by the ext_proc tests: a real gRPC ext_proc client that plays Envoy's part of the
protocol, request builders, and the in-process EPP stack (settings and handle)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

from kvgate.extproc.epp import EppOptions
from kvgate.extproc.epp_runtime import EppRuntime, EppSettings
from kvgate.sim.engine import EngineConfig
from kvgate.sim.fleet import Fleet, FleetConfig
from kvgate.sim.timing import PolynomialTiming

REPO = Path(__file__).resolve().parents[2]
SEED_CONFIG = (REPO / "deploy" / "config" / "epp-config-dynamo.yaml").read_text()
MODEL = "Qwen/Qwen3-0.6B"
FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
TIMEOUT = 10.0


def headers_msg(
    headers: Mapping[str, str],
    *,
    end_of_stream: bool = False,
    body_mode: int | None = FULL_DUPLEX,
    response_body_mode: int | None = None,
    subset: Sequence[str] | None = None,
) -> pb.ProcessingRequest:
    """``response_body_mode`` None: the same as ``body_mode``."""
    msg = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()
                ]
            ),
            end_of_stream=end_of_stream,
        )
    )
    if body_mode is not None:
        msg.protocol_config.request_body_mode = body_mode  # type: ignore[assignment]
        msg.protocol_config.response_body_mode = (  # type: ignore[assignment]
            body_mode if response_body_mode is None else response_body_mode
        )
    if subset is not None:
        hint = struct_pb2.Struct()
        hint.update({"x-gateway-destination-endpoint-subset": list(subset)})
        msg.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
    return msg


def body_msgs(body: bytes, chunk: int = 16_384) -> list[pb.ProcessingRequest]:
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    return [
        pb.ProcessingRequest(request_body=pb.HttpBody(body=p, end_of_stream=i == len(pieces) - 1))
        for i, p in enumerate(pieces)
    ]


def response_headers_msg(
    status: int = 200, content_type: str = "application/json"
) -> pb.ProcessingRequest:
    headers = {":status": str(status), "content-type": content_type}
    return pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()
                ]
            )
        )
    )


def response_body_msg(chunk: bytes, end: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk, end_of_stream=end))


@dataclass
class Routed:
    """What the picker answered for the request phase."""

    set_headers: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    body: bytes = b""
    clear_route_cache: bool = False
    immediate_status: int | None = None
    immediate_body: dict[str, Any] | None = None
    responses: list[pb.ProcessingResponse] = field(default_factory=list)

    @property
    def destination(self) -> str:
        return self.set_headers["x-gateway-destination-endpoint"]


def _collect_mutation(routed: Routed, common: pb.CommonResponse) -> None:
    for h in common.header_mutation.set_headers:
        routed.set_headers[h.header.key] = h.header.raw_value.decode() or h.header.value
    routed.removed.extend(common.header_mutation.remove_headers)
    routed.clear_route_cache |= common.clear_route_cache
    mutation = common.body_mutation
    if mutation.HasField("streamed_response"):
        routed.body += mutation.streamed_response.body
    elif mutation.WhichOneof("mutation") == "body":
        routed.body = mutation.body


class ExtProcStream:
    """One Process() stream; send messages, read answers with a timeout."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._call = pb_grpc.ExternalProcessorStub(channel).Process()

    async def send(self, msg: pb.ProcessingRequest) -> None:
        await asyncio.wait_for(self._call.write(msg), TIMEOUT)

    async def recv(self) -> pb.ProcessingResponse:
        response = await asyncio.wait_for(self._call.read(), TIMEOUT)
        assert response is not grpc.aio.EOF, "picker closed the stream"
        return response  # type: ignore[no-any-return]

    async def close(self) -> None:
        await self._call.done_writing()

    def cancel(self) -> None:
        self._call.cancel()

    async def route(
        self,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        body_mode: int = FULL_DUPLEX,
        response_body_mode: int | None = None,
        subset: Sequence[str] | None = None,
        chunk: int = 16_384,
    ) -> Routed:
        """Send a POST with ``body`` and collect the picker's answers for the request phase."""
        hdrs = {
            ":method": "POST",
            ":path": "/v1/chat/completions",
            "content-type": "application/json",
        }
        hdrs.update(headers or {})
        routed = Routed()
        await self.send(
            headers_msg(
                hdrs, body_mode=body_mode, response_body_mode=response_body_mode, subset=subset
            )
        )
        if body_mode == BUFFERED:
            first = await self.recv()
            routed.responses.append(first)
            if first.HasField("immediate_response"):
                return _immediate(routed, first)
            assert first.HasField("request_headers")
            _collect_mutation(routed, first.request_headers.response)
        for msg in body_msgs(body, chunk):
            await self.send(msg)
        while True:
            response = await self.recv()
            routed.responses.append(response)
            if response.HasField("immediate_response"):
                return _immediate(routed, response)
            if response.HasField("dynamic_metadata"):
                routed.metadata = _struct(response.dynamic_metadata)
            if response.HasField("request_headers"):
                _collect_mutation(routed, response.request_headers.response)
                continue
            assert response.HasField("request_body"), response
            _collect_mutation(routed, response.request_body.response)
            common = response.request_body.response
            if body_mode == BUFFERED or common.body_mutation.streamed_response.end_of_stream:
                return routed


def _immediate(routed: Routed, response: pb.ProcessingResponse) -> Routed:
    routed.immediate_status = response.immediate_response.status.code
    routed.immediate_body = json.loads(response.immediate_response.body)
    return routed


def _struct(s: struct_pb2.Struct) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(s)  # type: ignore[no-any-return]


def chat_body(
    content: str, *, system: str | None = None, model: str = "Qwen/Qwen3-0.6B", **extra: Any
) -> bytes:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content})
    return json.dumps({"model": model, "messages": messages, **extra}).encode()


def loopback_epp_settings(
    qwen3_dir: Path, endpoints_file: Path, env: dict[str, str] | None = None
) -> EppSettings:
    """The seed's config on loopback, plaintext, system-chosen ports, block size 16, seed 7."""
    return EppSettings(
        bind="127.0.0.1",
        grpc_port=0,
        health_port=0,
        metrics_port=0,
        secure=False,
        config_text=SEED_CONFIG,
        endpoints_file=endpoints_file,
        model=MODEL,
        tokenizer=str(qwen3_dir),
        options=EppOptions(max_body_bytes=1_000_000, served_model=MODEL),
        env={"DYNAMO_KV_BLOCK_SIZE": "16", **(env or {})},
        seed=7,
    )


def loopback_fleet_config(
    workers: int, *, gpu_blocks: int = 2048, speedup: float = 50.0
) -> FleetConfig:
    """Simulated engines on loopback, system-chosen HTTP, KV-event and replay ports."""
    return FleetConfig(
        workers=workers,
        base_port=0,
        events_base_port=0,
        replay_base_port=0,
        model=MODEL,
        engine=EngineConfig(num_gpu_blocks=gpu_blocks, max_model_len=min(8192, gpu_blocks * 16)),
        timing=PolynomialTiming(speedup=speedup),
    )


def endpoints_json(fleet: Fleet, workers: Sequence[int] | None = None) -> str:
    """The EPP's endpoints file for ``fleet`` (all workers, or those indexes)."""
    chosen = range(len(fleet.workers)) if workers is None else workers
    return json.dumps(
        [
            {
                "address": fleet.workers[i].url.removeprefix("http://"),
                "instance_id": fleet.workers[i].instance_id,
                "events": fleet.workers[i].events_endpoint,
                "replay": fleet.workers[i].replay_endpoint,
            }
            for i in chosen
        ]
    )


@dataclass
class Stack:
    fleet: Fleet
    runtime: EppRuntime
    channel: grpc.aio.Channel
    endpoints_file: Path

    @property
    def addresses(self) -> list[str]:
        return [w.url.removeprefix("http://") for w in self.fleet.workers]

    def write_endpoints(self, workers: list[int] | None = None) -> None:
        self.endpoints_file.write_text(endpoints_json(self.fleet, workers))

    async def wait_endpoints(self, count: int, timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.runtime.endpoints) != count:
            assert asyncio.get_running_loop().time() < deadline, "endpoint set did not update"
            await asyncio.sleep(0.05)
