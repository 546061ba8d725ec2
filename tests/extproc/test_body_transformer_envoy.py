"""The body transformer behind a real Envoy's ext_proc filter, end to end over HTTP.

One Envoy, one listener per configuration: the seed's (request headers SEND, request body
BUFFERED, responses skipped), FULL_DUPLEX_STREAMED, BUFFERED_PARTIAL (with a buffer big enough for
every body, and one too small for the large one), and BUFFERED against a transformer with a small
body limit. The upstream echoes what it received.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from kvgate.extproc import body_transformer as bt
from kvgate.extproc.nvext import Injected, inject_nvext
from tests.extproc.envoy_harness import (
    RunningEnvoy,
    bootstrap,
    echo_upstream,
    echoed_body,
    envoy_running,
    ext_proc_filter,
    http_listener,
    static_cluster,
)
from tests.extproc.nvext_cases import BIG_TEXT, CASE_IDS, CASES, NvextCase, agg, chat, dumps

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.envoy]

TIMEOUT = aiohttp.ClientTimeout(total=20)
SMALL_LIMIT = 100_000


def _mode(body_mode: str) -> dict[str, str]:
    """The seed's processing mode, with ``body_mode`` for the request body."""
    return {
        "request_header_mode": "SEND",
        "request_body_mode": body_mode,
        "response_header_mode": "SKIP",
        "response_body_mode": "NONE",
        # Full duplex needs trailers sent: they may be what ends the body.
        "request_trailer_mode": "SEND" if body_mode == "FULL_DUPLEX_STREAMED" else "SKIP",
        "response_trailer_mode": "SKIP",
    }


@dataclass
class Gateway:
    envoy: RunningEnvoy
    transformer: bt.BodyTransformerRuntime
    session: aiohttp.ClientSession

    async def post(
        self, listener: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{self.envoy.listener_port(listener)}/v1/chat/completions"
        hdrs = {"content-type": "application/json", **headers}
        async with self.session.post(url, data=body, headers=hdrs) as response:
            if response.status != 200:
                return response.status, {"text": await response.text()}
            return response.status, await response.json()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    settings = bt.TransformerSettings(bind="127.0.0.1", port=0, health_port=0, metrics_port=0)
    small = bt.TransformerSettings(
        bind="127.0.0.1", port=0, health_port=0, metrics_port=0, max_body_bytes=SMALL_LIMIT
    )
    async with (
        echo_upstream() as upstream_port,
        bt.BodyTransformerRuntime(settings) as transformer,
        bt.BodyTransformerRuntime(small) as small_transformer,
    ):
        listeners = [
            http_listener("buffered", "upstream", [ext_proc_filter("bt", _mode("BUFFERED"))]),
            http_listener(
                "full_duplex", "upstream", [ext_proc_filter("bt", _mode("FULL_DUPLEX_STREAMED"))]
            ),
            http_listener(
                "partial", "upstream", [ext_proc_filter("bt", _mode("BUFFERED_PARTIAL"))]
            ),
            http_listener(
                "partial_small_buffer",
                "upstream",
                [ext_proc_filter("bt", _mode("BUFFERED_PARTIAL"))],
                buffer_limit_bytes=64 * 1024,
            ),
            http_listener(
                "buffered_small_limit", "upstream", [ext_proc_filter("bt_small", _mode("BUFFERED"))]
            ),
        ]
        clusters = [
            static_cluster("upstream", upstream_port),
            static_cluster("bt", transformer.bound_ports["grpc"], http2=True),
            static_cluster("bt_small", small_transformer.bound_ports["grpc"], http2=True),
        ]
        workdir = tmp_path_factory.mktemp("envoy-bt")
        async with (
            envoy_running(bootstrap(listeners, clusters), workdir=workdir) as envoy,
            aiohttp.ClientSession(timeout=TIMEOUT) as session,
        ):
            yield Gateway(envoy, transformer, session)


def _expected(case: NvextCase) -> bytes:
    result = inject_nvext(case.body, case.headers)
    return result.body if isinstance(result, Injected) else case.body


def _check_length(answer: dict[str, Any], body: bytes, *, required: bool) -> None:
    if answer["content_length"] is not None:
        assert int(answer["content_length"]) == len(body)
    else:
        assert not required, "content-length missing"
        assert answer["transfer_encoding"] == "chunked"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
async def test_seed_buffered_mode(gateway: Gateway, case: NvextCase) -> None:
    status, answer = await gateway.post("buffered", case.body, case.headers)
    assert status == 200, (answer, gateway.envoy.log_tail())
    assert echoed_body(answer) == _expected(case)
    _check_length(answer, echoed_body(answer), required=True)


@pytest.mark.parametrize("listener", ["full_duplex", "partial"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
async def test_other_body_modes(gateway: Gateway, case: NvextCase, listener: str) -> None:
    status, answer = await gateway.post(listener, case.body, case.headers)
    assert status == 200, (answer, gateway.envoy.log_tail())
    assert echoed_body(answer) == _expected(case)
    _check_length(answer, echoed_body(answer), required=False)


async def test_routing_headers_reach_the_worker_too(gateway: Gateway) -> None:
    _, answer = await gateway.post("buffered", dumps(chat()), agg())
    assert answer["headers"]["x-worker-instance-id"] == "42"
    assert answer["headers"]["x-dynamo-routing-mode"] == "aggregated"


async def test_chunked_request_gets_a_content_length(gateway: Gateway) -> None:
    body = dumps(chat(nvext={"ignore_eos": True}))

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 7):
            yield body[i : i + 7]

    url = f"http://127.0.0.1:{gateway.envoy.listener_port('buffered')}/v1/chat/completions"
    async with gateway.session.post(url, data=pieces(), headers=agg()) as response:
        assert response.status == 200
        answer = await response.json()
    expected = inject_nvext(body, agg())
    assert isinstance(expected, Injected)
    assert echoed_body(answer) == expected.body
    assert answer["content_length"] == str(len(expected.body))


async def test_body_larger_than_the_partial_buffer_passes_through(gateway: Gateway) -> None:
    before = gateway.transformer.metrics.registry.get_sample_value(
        "kvgate_body_transformer_passed_through_total", {"reason": "partial_body"}
    )
    body = dumps(chat(prompt=BIG_TEXT))
    status, answer = await gateway.post("partial_small_buffer", body, agg())
    assert status == 200, answer
    assert echoed_body(answer) == body
    after = gateway.transformer.metrics.registry.get_sample_value(
        "kvgate_body_transformer_passed_through_total", {"reason": "partial_body"}
    )
    assert after == (before or 0) + 1


async def test_body_over_the_transformer_limit_is_413(gateway: Gateway) -> None:
    status, answer = await gateway.post(
        "buffered_small_limit", dumps(chat(prompt="x" * SMALL_LIMIT)), agg()
    )
    assert status == 413
    assert str(SMALL_LIMIT) in answer["text"]
    status, answer = await gateway.post("buffered_small_limit", dumps(chat()), agg())
    assert status == 200
    assert b'"nvext":{"backend_instance_id":42}' in echoed_body(answer)


async def test_get_without_body(gateway: Gateway) -> None:
    url = f"http://127.0.0.1:{gateway.envoy.listener_port('buffered')}/v1/models"
    async with gateway.session.get(url, headers=agg()) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["method"] == "GET"
    assert echoed_body(answer) == b""


async def test_envoy_saw_no_ext_proc_failures(gateway: Gateway) -> None:
    stats = gateway.envoy.stats("http.")
    started = {k: v for k, v in stats.items() if k.endswith(".ext_proc.streams_started")}
    assert len(started) == 5 and all(started.values()), started
    words = ("failed", "error", "timeout", "spurious", "rejected")
    bad = {k: v for k, v in stats.items() if ".ext_proc." in k and any(w in k for w in words)}
    assert not any(bad.values()), bad
