"""The response phase off the request path: `kvgate up`'s bootstrap with ``response_observer`` in
a real Envoy, the real EPP in-process (so its bookkeeping can be read) and real upstreams —
simulated engines, and an upstream that resets its streams. The routing filter gets no response
phase; the observe-only filter reports first chunk, usage and end, and every way a response ends
(complete, client gone, upstream reset, refused) leaves the picker holding nothing."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from kvgate import epp_configs
from kvgate.extproc.epp import EppOptions
from kvgate.extproc.epp_runtime import EppRuntime
from kvgate.gateway.bootstrap import GatewaySpec, build_bootstrap
from kvgate.sim.fleet import Fleet
from kvgate.sim.prompts import TokensCodec
from tests.extproc.envoy_harness import LOOPBACK, envoy_running
from tests.extproc.utils import endpoints_json, loopback_epp_settings, loopback_fleet_config
from tests.gateway.utils import MODEL

pytestmark = [pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]

GRACE_S = 0.5
SYSTEM = "You are the observer test assistant. " + " ".join(
    f"Rule {i}: answer in full sentences." for i in range(40)
)


@dataclass
class ObservedGateway:
    url: str
    runtime: EppRuntime
    upstreams: list[str]

    def held(self) -> dict[str, float]:
        """What the picker keeps per request, and its running-requests gauge: all 0 when idle."""
        out: dict[str, float] = dict(self.runtime.bookkeeping())
        out["running"] = sum(
            s.value for m in self.runtime.metrics.running.collect() for s in m.samples
        )
        return out

    async def settle(self, timeout_s: float = GRACE_S + 5.0) -> dict[str, float]:
        """The bookkeeping once it is idle (or as it is at the timeout)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while any(self.held().values()) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        return self.held()

    def counter(self, metric: Any, suffix: str = "_total", **labels: str) -> float:
        return sum(
            s.value
            for m in metric.collect()
            for s in m.samples
            if s.name.endswith(suffix) and all(s.labels.get(k) == v for k, v in labels.items())
        )


@contextlib.asynccontextmanager
async def observed_gateway(
    workdir: Path, settings: Any, upstreams: list[tuple[str, int]]
) -> AsyncIterator[ObservedGateway]:
    async with contextlib.AsyncExitStack() as stack:
        runtime = await stack.enter_async_context(EppRuntime(settings))
        spec = GatewaySpec(
            listen_host=LOOPBACK,
            listen_port=0,
            admin_port=0,
            epp_address=(LOOPBACK, runtime.bound_ports["grpc"]),
            workers=upstreams,
            response_observer=True,
        )
        bootstrap = build_bootstrap(spec)
        envoy = await stack.enter_async_context(envoy_running(bootstrap, workdir=workdir))
        yield ObservedGateway(
            f"http://{LOOPBACK}:{envoy.listener_port('kvgate')}",
            runtime,
            [f"{host}:{port}" for host, port in upstreams],
        )


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def sim_gateway(
    qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ObservedGateway]:
    """kvgate's own policy (the latency model calibrates from the response phase) over two
    simulated engines slow enough that a long answer can be cut off mid-stream."""
    workdir = tmp_path_factory.mktemp("observer-sim")
    config = loopback_fleet_config(2, speedup=4.0)
    async with Fleet(config, TokensCodec.load(str(qwen3_dir))) as fleet:
        endpoints = workdir / "endpoints.json"
        endpoints.write_text(endpoints_json(fleet))
        settings = loopback_epp_settings(qwen3_dir, endpoints)
        settings.config_text = epp_configs.shipped_config(epp_configs.KVGATE)
        settings.options = dataclasses.replace(settings.options, observer_grace_s=GRACE_S)
        hosts = [w.url.removeprefix("http://").rsplit(":", 1) for w in fleet.workers]
        async with observed_gateway(workdir, settings, [(h, int(p)) for h, p in hosts]) as gateway:
            deadline = asyncio.get_running_loop().time() + 10
            while len(gateway.runtime.endpoints) != 2:
                assert asyncio.get_running_loop().time() < deadline, "endpoints not loaded"
                await asyncio.sleep(0.05)
            yield gateway


def chat(question: str, *, stream: bool = True, max_tokens: int = 8) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "max_tokens": max_tokens,
    }
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


async def post_stream(
    url: str,
    body: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    stop_after_chunks: int | None = None,
) -> tuple[int, list[bytes]]:
    """POST and read the SSE body chunk by chunk; with ``stop_after_chunks`` drop the connection
    after that many (the client going away mid-stream)."""
    chunks: list[bytes] = []
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        resp = await session.post(
            f"{url}/v1/chat/completions",
            json=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=30),
        )
        try:
            async for chunk in resp.content.iter_any():
                chunks.append(chunk)
                if stop_after_chunks is not None and len(chunks) >= stop_after_chunks:
                    resp.close()  # closes the connection: Envoy sees the client go
                    break
        except aiohttp.ClientPayloadError:
            pass  # the upstream reset the stream: Envoy cut the response short
        finally:
            resp.release()
        return resp.status, chunks


async def test_streamed_response_is_observed_first_chunk_usage_and_end(
    sim_gateway: ObservedGateway,
) -> None:
    metrics = sim_gateway.runtime.metrics
    ttft_before = sim_gateway.counter(metrics.ttft, "_count")
    tokens_before = sim_gateway.counter(metrics.output_tokens, "_sum")
    matched_before = sim_gateway.counter(metrics.observer_streams, outcome="matched")
    (fits,) = [
        plugin.model.fits  # type: ignore[attr-defined]
        for plugin in sim_gateway.runtime.plugins.plugins.values()  # type: ignore[union-attr]
        if plugin.type_name == "predicted-latency-scorer"
    ]
    before = {w: (f.observations, f.itl_scale) for w, f in fits.items()}

    status, chunks = await post_stream(
        sim_gateway.url, chat("Stream a short answer.", max_tokens=12)
    )

    assert status == 200
    text = b"".join(chunks)
    assert text.count(b"data: ") >= 12 and text.rstrip().endswith(b"data: [DONE]")
    assert await sim_gateway.settle() == dict.fromkeys(sim_gateway.held(), 0)
    assert sim_gateway.counter(metrics.observer_streams, outcome="matched") == matched_before + 1
    assert sim_gateway.counter(metrics.ttft, "_count") == ttft_before + 1
    # Usage from the last SSE event reached the completion.
    assert sim_gateway.counter(metrics.output_tokens, "_sum") == tokens_before + 12
    # The latency model got its TTFT observation (first chunk) and its ITL one (the end).
    changed = [w for w, f in fits.items() if f.observations != before.get(w, (0, 0.0))[0]]
    assert len(changed) == 1
    (worker,) = changed
    assert fits[worker].observations == before.get(worker, (0, 0.0))[0] + 1
    assert fits[worker].itl_scale != before.get(worker, (0, 1.0))[1]


async def test_non_streamed_response_completes_with_its_usage(
    sim_gateway: ObservedGateway,
) -> None:
    metrics = sim_gateway.runtime.metrics
    tokens_before = sim_gateway.counter(metrics.output_tokens, "_sum")
    status, chunks = await post_stream(sim_gateway.url, chat("Answer at once.", stream=False))
    assert status == 200
    assert json.loads(b"".join(chunks))["usage"]["completion_tokens"] == 8
    assert await sim_gateway.settle() == dict.fromkeys(sim_gateway.held(), 0)
    assert sim_gateway.counter(metrics.output_tokens, "_sum") == tokens_before + 8


async def test_client_gone_mid_stream_frees_the_request(sim_gateway: ObservedGateway) -> None:
    status, chunks = await post_stream(
        sim_gateway.url, chat("Write a very long answer.", max_tokens=2000), stop_after_chunks=2
    )
    assert status == 200 and chunks
    held = await sim_gateway.settle()
    assert held == dict.fromkeys(held, 0), held


async def test_concurrent_streams_sharing_a_client_request_id_are_kept_apart(
    sim_gateway: ObservedGateway,
) -> None:
    """The observer's stream names its request by the picker's key in Envoy's metadata, not by
    anything a client sends: the same ``x-request-id`` on every request, some cut off early,
    frees each request exactly once."""
    metrics = sim_gateway.runtime.metrics
    completions_before = sim_gateway.counter(metrics.output_tokens, "_count")
    headers = {"x-request-id": "same-for-everyone"}
    results = await asyncio.gather(
        *(
            post_stream(
                sim_gateway.url,
                chat(f"Question {i}.", max_tokens=400 if i % 2 else 6),
                headers=headers,
                stop_after_chunks=2 if i % 2 else None,
            )
            for i in range(8)
        )
    )
    assert all(status == 200 for status, _ in results)
    held = await sim_gateway.settle()
    assert held == dict.fromkeys(held, 0), held
    # The four that ran to the end reported their usage.
    assert sim_gateway.counter(metrics.output_tokens, "_count") >= completions_before + 4


async def test_refused_request_leaves_nothing_to_observe(sim_gateway: ObservedGateway) -> None:
    metrics = sim_gateway.runtime.metrics
    matched_before = sim_gateway.counter(metrics.observer_streams, outcome="matched")
    body = chat("Which model?") | {"model": "not-served"}
    status, _ = await post_stream(sim_gateway.url, body)
    assert status == 404
    assert await sim_gateway.settle() == dict.fromkeys(sim_gateway.held(), 0)
    assert sim_gateway.counter(metrics.observer_streams, outcome="matched") == matched_before


# -- an upstream that resets its streams --------------------------------------------------------


@contextlib.asynccontextmanager
async def resetting_upstream(chunks_before_reset: int) -> AsyncIterator[int]:
    """Answers every chat with an SSE stream and resets the connection after a few events."""

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for i in range(chunks_before_reset):
            event = {"choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
            await asyncio.sleep(0.02)
        assert request.transport is not None
        sock = request.transport.get_extra_info("socket")
        # SO_LINGER 0: close() sends a TCP reset, not an orderly end of the body.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        request.transport.abort()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    try:
        sock.bind((LOOPBACK, 0))
        sock.listen(64)
        await web.SockSite(runner, sock).start()
        yield int(sock.getsockname()[1])
    finally:
        await runner.cleanup()
        sock.close()


async def test_upstream_reset_mid_stream_frees_the_request(qwen3_dir: Path, tmp_path: Path) -> None:
    async with resetting_upstream(chunks_before_reset=3) as port:
        settings = dataclasses.replace(
            loopback_epp_settings(qwen3_dir, tmp_path / "unused-endpoints.json"),
            endpoints_file=None,
            endpoints=f"{LOOPBACK}:{port}=7",
            config_text=epp_configs.shipped_config(epp_configs.DYNAMO),
            options=EppOptions(served_model=MODEL, observer_grace_s=GRACE_S),
        )
        async with observed_gateway(tmp_path, settings, [(LOOPBACK, port)]) as gateway:
            metrics = gateway.runtime.metrics
            ttft_before = gateway.counter(metrics.ttft, "_count")
            status, chunks = await post_stream(gateway.url, chat("Reset me."))
            assert status == 200
            assert b"t0" in b"".join(chunks)
            held = await gateway.settle()
            assert held == dict.fromkeys(held, 0), held
            # The chunks before the reset were observed: first token measured.
            assert gateway.counter(metrics.ttft, "_count") == ttft_before + 1
            assert gateway.counter(metrics.observer_streams, outcome="matched") == 1
