"""The body transformer (`kvgate body-transformer`): an Envoy ext_proc service that writes the
endpoint picker's routing headers into the request body's ``nvext`` field (see
:mod:`kvgate.extproc.nvext`) for Dynamo workers, which read only the body.

It sits in the filter chain *after* the picker, so it sees the headers the picker set. Envoy
announces its body mode in the first message's ``protocol_config``; without it BUFFERED (the
seed's configuration: request headers SEND, request body BUFFERED, responses skipped) is assumed.

- BUFFERED: request headers are answered CONTINUE at once (Envoy holds them until the body has
  been answered, so the body answer can still set ``content-length``); the body, which Envoy
  sends as one message, is answered with a body mutation plus ``content-length``, or a plain
  CONTINUE when unchanged.
- FULL_DUPLEX_STREAMED: nothing is answered until the body is complete; then the headers (with
  ``content-length``) and the body as ≤62,000-byte streamed chunks — sent even when unchanged,
  because in this mode Envoy forwards only what the processor sends back.
- BUFFERED_PARTIAL: Envoy sends the body in one message, or — past its buffer limit — only a first
  part and lets the rest flow past the processor. A complete body is transformed like BUFFERED;
  a partial one cannot be, and passes through unchanged (reason ``partial_body``).
- STREAMED: not supported (chunks are answered as they come); passes through, counted.

Bodies that are not transformed are counted by reason and each reason is logged once, not per
request. Bodies above ``--max-body-bytes`` get 413. Parsing large bodies happens off the event
loop. Ports: ext_proc 9004, gRPC health 9005 (services ``""`` and the ext_proc service), metrics
9091.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry, Counter, Histogram

from kvgate.extproc import protocol as proto
from kvgate.extproc.listeners import EXT_PROC_SERVICE, serve_ext_proc, serve_health, serve_http
from kvgate.extproc.nvext import (
    MODE_HEADER,
    PREFILL_HEADER,
    WORKER_ID_HEADER,
    Injected,
    NvextResult,
    Reason,
    Unchanged,
    inject_nvext,
)
from kvgate.service import StackedService

log = logging.getLogger("kvgate.body_transformer")

_Mode = processing_mode_pb2.ProcessingMode
_ROUTING_HEADERS = frozenset({WORKER_ID_HEADER, PREFILL_HEADER, MODE_HEADER})
# Parsing + splicing costs ~1 ms per 100 KB; above this size it moves off the event loop.
_OFFLOAD_BYTES = 64 * 1024
# Pass-through reasons of the transformer itself, beside the nvext ones.
NO_BODY = "no_body"
PARTIAL_BODY = "partial_body"
UNSUPPORTED_MODE = "unsupported_mode"
PASS_REASONS = (*(r.value for r in Reason), NO_BODY, PARTIAL_BODY, UNSUPPORTED_MODE)
# Reasons that are normal traffic (a request the picker did not route, a GET) log at INFO.
_QUIET_REASONS = frozenset({Reason.MISSING_HEADER.value, NO_BODY})


class TransformerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.transformed = Counter(
            "kvgate_body_transformer_transformed",
            "Request bodies given an nvext routing field",
            ["mode"],
            registry=r,
        )
        self.passed_through = Counter(
            "kvgate_body_transformer_passed_through",
            "Request bodies forwarded unchanged, by reason",
            ["reason"],
            registry=r,
        )
        self.nvext_replaced = Counter(
            "kvgate_body_transformer_nvext_replaced",
            "Client nvext values that were not objects and were replaced",
            registry=r,
        )
        self.rejected = Counter(
            "kvgate_body_transformer_rejected",
            "Requests answered with an error (413 too large, 500 internal)",
            ["code"],
            registry=r,
        )
        self.duration = Histogram(
            "kvgate_body_transformer_duration_seconds",
            "Time to parse and rewrite one body",
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.05, 0.25, 1.0),
            registry=r,
        )
        for reason in PASS_REASONS:
            self.passed_through.labels(reason)


class BodyTransformer:
    """State shared by all streams: limits, metrics, and which reasons were already logged."""

    def __init__(self, metrics: TransformerMetrics, *, max_body_bytes: int) -> None:
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self._logged: set[str] = set()

    async def transform(self, body: bytes, headers: dict[str, str]) -> NvextResult:
        started = time.perf_counter()
        if len(body) > _OFFLOAD_BYTES:
            result = await asyncio.to_thread(inject_nvext, body, headers)
        else:
            result = inject_nvext(body, headers)
        self.metrics.duration.observe(time.perf_counter() - started)
        if isinstance(result, Unchanged):
            self.pass_through(result.reason.value, result.detail)
        else:
            self.metrics.transformed.labels(result.routing.mode).inc()
            if result.replaced_non_object:
                self.metrics.nvext_replaced.inc()
                self._log_once(
                    "nvext_replaced",
                    logging.WARNING,
                    "a client sent an nvext value that is not an object; it was replaced",
                )
        return result

    def pass_through(self, reason: str, detail: str) -> None:
        self.metrics.passed_through.labels(reason).inc()
        level = logging.INFO if reason in _QUIET_REASONS else logging.WARNING
        self._log_once(
            reason,
            level,
            f"request body passed through unchanged ({reason}): {detail}; further ones are only "
            f'counted in kvgate_body_transformer_passed_through{{reason="{reason}"}}',
        )

    def _log_once(self, key: str, level: int, message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.log(level, "%s", message)


class _TooLarge(Exception):
    pass


class RequestStream:
    """One ext_proc stream (one HTTP request)."""

    def __init__(self, transformer: BodyTransformer) -> None:
        self.transformer = transformer
        self.request_mode: int = _Mode.BUFFERED
        self.response_mode: int = _Mode.NONE
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.answered = False
        """The request body has been answered (or passed through); later chunks just continue."""

    async def handle(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        if msg.HasField("protocol_config"):
            self.request_mode = msg.protocol_config.request_body_mode
            self.response_mode = msg.protocol_config.response_body_mode
        kind = msg.WhichOneof("request")
        if kind == "request_headers":
            return self._request_headers(msg.request_headers)
        if kind == "request_body":
            return await self._request_body(msg.request_body)
        if kind == "request_trailers":
            out = await self._finish() if self._full_duplex and not self.answered else []
            return [*out, proto.continue_response("request_trailers")]
        if kind == "response_body" and self.response_mode == _Mode.FULL_DUPLEX_STREAMED:
            body = msg.response_body
            return [proto.echo_response_chunk(body.body, body.end_of_stream)]
        if kind in ("response_headers", "response_body", "response_trailers"):
            return [proto.continue_response(kind)]
        return []

    @property
    def _full_duplex(self) -> bool:
        return bool(self.request_mode == _Mode.FULL_DUPLEX_STREAMED)

    def _request_headers(self, headers: pb.HttpHeaders) -> list[pb.ProcessingResponse]:
        self.headers = {k: v for k, v in proto.header_map(headers).items() if k in _ROUTING_HEADERS}
        if headers.end_of_stream:
            self.answered = True
            self.transformer.pass_through(NO_BODY, "the request has no body")
            return [proto.request_headers_response()]
        if self._full_duplex:
            return []
        return [proto.request_headers_response()]

    async def _request_body(self, body: pb.HttpBody) -> list[pb.ProcessingResponse]:
        if self.answered:
            return [] if self._full_duplex else [proto.continue_response("request_body")]
        mode = self.request_mode
        if mode == _Mode.BUFFERED_PARTIAL and not body.end_of_stream:
            self.answered = True
            self.transformer.pass_through(
                PARTIAL_BODY, "Envoy sent only the part of the body that fits its buffer"
            )
            return [proto.continue_response("request_body")]
        if mode in (_Mode.BUFFERED, _Mode.BUFFERED_PARTIAL):
            # One message holds the whole buffered body and Envoy waits for its answer;
            # end_of_stream is false only when trailers follow, so it must not be waited for.
            self._append(body.body)
            return await self._finish()
        if mode == _Mode.FULL_DUPLEX_STREAMED:
            self._append(body.body)
            return await self._finish() if body.end_of_stream else []
        if body.end_of_stream:
            self.answered = True
            self.transformer.pass_through(
                UNSUPPORTED_MODE, f"request body mode {_Mode.BodySendMode.Name(mode)}"
            )
        return [proto.continue_response("request_body")]

    def _append(self, chunk: bytes) -> None:
        if len(self.body) + len(chunk) > self.transformer.max_body_bytes:
            raise _TooLarge
        self.body += chunk

    async def _finish(self) -> list[pb.ProcessingResponse]:
        self.answered = True
        original = bytes(self.body)
        self.body = bytearray()
        result = await self.transformer.transform(original, self.headers)
        new_body = result.body if isinstance(result, Injected) else None
        if self._full_duplex:
            out = new_body if new_body is not None else original
            length = proto.header_mutation({"content-length": str(len(out))})
            return [proto.request_headers_response(length), *proto.streamed_body_responses(out)]
        if new_body is None:
            return [proto.continue_response("request_body")]
        length = proto.header_mutation({"content-length": str(len(new_body))})
        return [proto.buffered_body_response(length, new_body, clear_route_cache=False)]


async def process_stream(
    transformer: BodyTransformer, requests: AsyncIterator[pb.ProcessingRequest]
) -> AsyncIterator[pb.ProcessingResponse]:
    stream = RequestStream(transformer)
    async for msg in requests:
        try:
            responses = await stream.handle(msg)
        except _TooLarge:
            transformer.metrics.rejected.labels("413").inc()
            yield proto.immediate_error(
                413,
                f"request body exceeds {transformer.max_body_bytes} bytes",
                reason="body_too_large",
            )
            return
        except Exception:
            log.exception("internal error in the body transformer")
            transformer.metrics.rejected.labels("500").inc()
            yield proto.immediate_error(500, "internal error in the body transformer")
            return
        for response in responses:
            yield response


@dataclass
class TransformerSettings:
    bind: str = "0.0.0.0"
    port: int = 9004
    health_port: int = 9005
    metrics_port: int = 9091
    secure: bool = False
    cert_path: Path | None = None
    max_body_bytes: int = 16 * 1024 * 1024


class BodyTransformerRuntime(StackedService):
    """The ext_proc, health and metrics servers, started and stopped as one unit. Ports given as
    0 are chosen by the system; ``bound_ports`` has the real ones (``grpc``, ``health``,
    ``metrics``)."""

    def __init__(self, settings: TransformerSettings) -> None:
        super().__init__()
        self.settings = settings
        self.metrics = TransformerMetrics()
        self.transformer = BodyTransformer(self.metrics, max_body_bytes=settings.max_body_bytes)
        self.bound_ports: dict[str, int] = {}

    async def _start(self) -> None:
        await self._serve_grpc()
        await self._serve_health()
        await self._serve_metrics()

    async def _serve_grpc(self) -> None:
        s = self.settings
        # Envoy sends a buffered body as one message: leave room to see (and 413) bodies up to
        # twice the limit instead of failing them with a gRPC error.
        self.bound_ports["grpc"] = await serve_ext_proc(
            self._stack,
            functools.partial(process_stream, self.transformer),
            f"{s.bind}:{s.port}",
            secure=s.secure,
            cert_path=s.cert_path,
            max_message_bytes=2 * s.max_body_bytes + (1 << 20),
        )

    async def _serve_health(self) -> None:
        s = self.settings
        servicer, self.bound_ports["health"] = await serve_health(
            self._stack, f"{s.bind}:{s.health_port}"
        )
        for service in ("", EXT_PROC_SERVICE):
            await servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def _serve_metrics(self) -> None:
        s = self.settings
        port = await serve_http(self._stack, self.metrics.registry, s.bind, s.metrics_port)
        if port is not None:
            self.bound_ports["metrics"] = port


async def serve(settings: TransformerSettings, stop: asyncio.Event) -> None:
    async with BodyTransformerRuntime(settings) as runtime:
        ports = runtime.bound_ports
        log.info(
            "kvgate body-transformer serving ext_proc on %s:%d (%s), health on %d, metrics on %s",
            settings.bind,
            ports["grpc"],
            "TLS" if settings.secure else "plaintext",
            ports["health"],
            ports.get("metrics", settings.metrics_port),
        )
        await stop.wait()
