"""`kvgate up`'s Envoy bootstrap in a real Envoy, with the real endpoint picker (and body
transformer) in-process and upstreams that echo what reached them: which headers and which body
a client can make reach a worker, in every body-transformer mode, and how fallbacks travel."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kvgate import epp_configs
from kvgate.extproc.body_transformer import BodyTransformerRuntime, TransformerSettings
from kvgate.extproc.epp import EppOptions
from kvgate.extproc.epp_runtime import EppRuntime
from kvgate.extproc.headers import GATEWAY_INTERNAL
from kvgate.gateway.bootstrap import UPSTREAM_HEADER, BodyTransformer, GatewaySpec, build_bootstrap
from kvgate.gateway.lua import load_lua
from tests.extproc.envoy_harness import echo_upstream, echoed_body, envoy_running
from tests.extproc.utils import loopback_epp_settings
from tests.gateway.utils import MODEL

pytestmark = pytest.mark.envoy

KV_CONFIG = epp_configs.shipped_config(epp_configs.DYNAMO)
ROUND_ROBIN_CONFIG = epp_configs.shipped_config(epp_configs.ROUND_ROBIN)
FALLBACK_CONFIG = KV_CONFIG.replace(
    "  type: max-score-picker\n",
    "  type: max-score-picker\n  parameters:\n    maxNumOfEndpoints: 2\n",
)
INSTANCE_IDS = (101, 202)


@dataclass
class Gateway:
    url: str
    upstream_ports: list[int]

    def instance_id(self, port: int) -> int:
        return INSTANCE_IDS[self.upstream_ports.index(port)]


@contextlib.asynccontextmanager
async def gateway(
    qwen3_dir: Path, workdir: Path, *, config: str, transformer: BodyTransformer = "off"
) -> AsyncIterator[Gateway]:
    async with contextlib.AsyncExitStack() as stack:
        ports = [await stack.enter_async_context(echo_upstream()) for _ in INSTANCE_IDS]
        settings = dataclasses.replace(
            loopback_epp_settings(qwen3_dir, workdir / "unused-endpoints.json"),
            endpoints_file=None,
            endpoints=",".join(
                f"127.0.0.1:{port}={iid}" for port, iid in zip(ports, INSTANCE_IDS, strict=True)
            ),
            config_text=config,
            options=EppOptions(served_model=MODEL, inline_nvext=transformer == "inline"),
        )
        epp = await stack.enter_async_context(EppRuntime(settings))
        transformer_address = None
        if transformer == "ext-proc":
            bt = await stack.enter_async_context(
                BodyTransformerRuntime(
                    TransformerSettings(bind="127.0.0.1", port=0, health_port=0, metrics_port=0)
                )
            )
            transformer_address = ("127.0.0.1", bt.bound_ports["grpc"])
        spec = GatewaySpec(
            listen_host="127.0.0.1",
            listen_port=0,
            admin_port=0,
            epp_address=("127.0.0.1", epp.bound_ports["grpc"]),
            workers=[("127.0.0.1", port) for port in ports],
            body_transformer=transformer,
            body_transformer_address=transformer_address,
            lua_code=load_lua() if transformer == "lua" else None,
        )
        envoy = await stack.enter_async_context(
            envoy_running(build_bootstrap(spec), workdir=workdir)
        )
        yield Gateway(f"http://127.0.0.1:{envoy.listener_port('kvgate')}", ports)


async def post(
    gw: Gateway, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{gw.url}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json", **(headers or {})},
            timeout=aiohttp.ClientTimeout(total=20),
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


async def test_no_client_header_steers_and_no_servable_request_is_refused(
    qwen3_dir: Path, tmp_path: Path
) -> None:
    async with gateway(qwen3_dir, tmp_path, config=KV_CONFIG) as gw:
        forged = dict.fromkeys((*GATEWAY_INTERNAL, UPSTREAM_HEADER), "127.0.0.1:1")
        forged["x-gateway-model-name-rewrite"] = "not-served"
        for i in range(4):
            status, echoed = await post(gw, chat(f"steer me {i}"), forged)
            assert status == 200, echoed
            received = echoed["headers"]
            picked = received["x-gateway-destination-endpoint"]
            assert picked == f"127.0.0.1:{echoed['served_by']}"
            assert received[UPSTREAM_HEADER] == picked
            assert received["x-worker-instance-id"] == str(gw.instance_id(echoed["served_by"]))
            assert received["x-dynamo-routing-mode"] == "aggregated"
            absent = set(GATEWAY_INTERNAL) - {
                "x-gateway-destination-endpoint",
                "x-worker-instance-id",
                "x-dynamo-routing-mode",
            }
            assert not absent & set(received), absent & set(received)
        # Naming a served model in the gateway's rewrite header gets no unserved model through.
        status, error = await post(
            gw,
            {**chat("let me in"), "model": "not-served"},
            {"x-gateway-model-name-rewrite": MODEL},
        )
        assert status == 404, error
        # A request with media reaches a worker: whether it serves images is the worker's call.
        image = {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}
        media = {"model": MODEL, "messages": [{"role": "user", "content": [image]}]}
        status, echoed = await post(gw, media)
        assert status == 200, echoed
        assert json.loads(echoed_body(echoed)) == media


async def test_fallbacks_reach_envoy_as_one_list_and_the_first_endpoint_serves(
    qwen3_dir: Path, tmp_path: Path
) -> None:
    async with gateway(qwen3_dir, tmp_path, config=FALLBACK_CONFIG) as gw:
        for i in range(4):
            status, echoed = await post(gw, chat(f"fallbacks {i}"))
            assert status == 200, echoed
            listed = echoed["headers"]["x-gateway-destination-endpoint"].split(",")
            assert sorted(listed) == sorted(f"127.0.0.1:{port}" for port in gw.upstream_ports)
            assert echoed["headers"][UPSTREAM_HEADER] == listed[0]
            assert listed[0] == f"127.0.0.1:{echoed['served_by']}"


CLIENT_NVEXT = {"backend_instance_id": 7, "decode_worker_id": 8, "ignore_eos": True}


@pytest.mark.parametrize(
    ("transformer", "config"),
    [
        ("off", "kv"),
        ("off", "round-robin"),
        ("ext-proc", "kv"),
        ("ext-proc", "round-robin"),
        ("inline", "kv"),
        ("inline", "round-robin"),
        ("lua", "kv"),
        ("lua", "round-robin"),
    ],
)
async def test_client_nvext_routing_fields_never_reach_the_worker(
    qwen3_dir: Path, tmp_path: Path, transformer: BodyTransformer, config: str
) -> None:
    """The worker gets the picker's choice in nvext (when something writes it) or none at all,
    never the client's, and always the client's other nvext fields, with a content-length that
    matches the rewritten body (sizes below and above one 62,000-byte chunk)."""
    text = KV_CONFIG if config == "kv" else ROUND_ROBIN_CONFIG
    async with gateway(qwen3_dir, tmp_path, config=text, transformer=transformer) as gw:
        for words in (5, 9_000):
            body = chat("pick me " * words, nvext=dict(CLIENT_NVEXT), max_tokens=1)
            status, echoed = await post(gw, body)
            assert status == 200, echoed
            forwarded = echoed_body(echoed)
            print(
                transformer,
                config,
                words,
                echoed["content_length"],
                echoed["transfer_encoding"],
                len(forwarded),
            )
            received = json.loads(forwarded)
            expected: dict[str, Any] = {"ignore_eos": True}
            if config == "kv" and transformer != "off":
                expected["backend_instance_id"] = gw.instance_id(echoed["served_by"])
            assert received["nvext"] == expected
            assert received["messages"] == body["messages"]
