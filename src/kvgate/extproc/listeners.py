"""The three listeners every kvgate ext_proc process runs (the EPP, the body transformer): the
ext_proc gRPC server, the gRPC health server and the Prometheus/JSON HTTP server. Each is
registered on the caller's exit stack, so it stops with the process's other parts."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"

StreamHandler = Callable[
    [AsyncIterator[pb.ProcessingRequest]], AsyncIterator[pb.ProcessingResponse]
]
"""Answers one ext_proc stream (one HTTP request): Envoy's messages in, the replies out."""


class _ExtProcServicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, handle: StreamHandler) -> None:
        self._handle = handle

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse]:
        async for response in self._handle(request_iterator):
            yield response


async def serve_ext_proc(
    stack: contextlib.AsyncExitStack,
    handle: StreamHandler,
    address: str,
    *,
    secure: bool,
    cert_path: Path | None,
    max_message_bytes: int,
) -> int:
    """Returns the bound port (``address`` may end in ``:0``)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # gRPC's core holds a new call until grpc.aio takes it (one at a time, on the
            # loop) and by default rejects some at random past 1,000 waiting: a burst of
            # client requests would fail a few (the routing filter fails closed) that would
            # have been served milliseconds later. Envoy's circuit breakers bound the burst.
            ("grpc.server.max_pending_requests", 100_000),
            ("grpc.server.max_pending_requests_hard_limit", 200_000),
        ]
    )
    pb_grpc.add_ExternalProcessorServicer_to_server(_ExtProcServicer(handle), server)
    if secure:
        from kvgate.extproc.tls import server_credentials

        port = server.add_secure_port(address, server_credentials(cert_path))
    else:
        port = server.add_insecure_port(address)
    await server.start()
    stack.push_async_callback(server.stop, 2.0)
    return int(port)


async def serve_health(stack: contextlib.AsyncExitStack, address: str) -> tuple[Any, int]:
    """A gRPC health server; returns its servicer (statuses are the caller's) and bound port."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    await server.start()
    stack.push_async_callback(server.stop, 1.0)
    return servicer, int(port)


JsonHandler = Callable[[], dict[str, Any]]


async def serve_http(
    stack: contextlib.AsyncExitStack,
    registry: CollectorRegistry,
    host: str,
    port: int,
    json_routes: dict[str, JsonHandler] | None = None,
) -> int | None:
    """``/metrics`` from ``registry`` plus GET routes answering JSON; returns the bound port."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    def json_route(handler: JsonHandler) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def respond(_: web.Request) -> web.Response:
            return web.json_response(handler())

        return respond

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    for path, handler in (json_routes or {}).items():
        app.router.add_get(path, json_route(handler))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, host, port)
    await site.start()
    return int(runner.addresses[0][1]) if runner.addresses else None
