"""The chart's gateway wiring in a real Envoy: its HTTPRoute as an Envoy-based gateway (kGateway,
Istio, Envoy Gateway) translates it — the rule's RequestHeaderModifier as the route's
``request_headers_to_remove`` — in front of the picker as the chart renders it (config and
arguments; static endpoints stand in for the pool) and the GAIE reference data plane (ext_proc in
FULL_DUPLEX_STREAMED, ORIGINAL_DST on ``x-gateway-destination-endpoint``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kvgate.commands.epp import build_parser, settings_from_args
from kvgate.extproc.epp_runtime import EppRuntime
from kvgate.extproc.headers import GATEWAY_INPUTS, PICKER_OUTPUTS
from tests.deploy.test_helm_chart import VALUE_SETS, one, render
from tests.extproc.envoy_harness import (
    bootstrap,
    echo_upstream,
    envoy_running,
    ext_proc_filter,
    http_listener,
    static_cluster,
)

pytestmark = pytest.mark.envoy

MODEL = "Qwen/Qwen3-0.6B"


def envoy_for(route: dict[str, Any], epp_port: int) -> dict[str, Any]:
    (rule,) = route["spec"]["rules"]
    removed = [
        name
        for f in rule.get("filters", [])
        if f["type"] == "RequestHeaderModifier"
        for name in f["requestHeaderModifier"].get("remove", [])
    ]
    mode = {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": "FULL_DUPLEX_STREAMED",
        "response_body_mode": "FULL_DUPLEX_STREAMED",
        "request_trailer_mode": "SEND",
        "response_trailer_mode": "SEND",
    }
    listener = http_listener("gateway", "pool", [ext_proc_filter("epp", mode)])
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (envoy_route,) = hcm["route_config"]["virtual_hosts"][0]["routes"]
    envoy_route["match"] = {"prefix": rule["matches"][0]["path"]["value"]}
    envoy_route["request_headers_to_remove"] = removed
    pool = {
        "name": "pool",
        "type": "ORIGINAL_DST",
        "connect_timeout": "2s",
        "lb_policy": "CLUSTER_PROVIDED",
        "original_dst_lb_config": {
            "use_http_header": True,
            "http_header_name": "x-gateway-destination-endpoint",
        },
    }
    return bootstrap([listener], [pool, static_cluster("epp", epp_port, http2=True)])


async def test_the_charts_route_keeps_gateway_inputs_from_workers_and_routing_intact(
    qwen3_dir: Path, tmp_path: Path
) -> None:
    objects = render(VALUE_SETS["example-kv-routing"])
    config = tmp_path / "epp-config.yaml"
    config.write_text(one(objects, "ConfigMap")["data"]["epp-config.yaml"])
    pool = one(objects, "InferencePool")
    (container,) = one(objects, "Deployment", pool["spec"]["endpointPickerRef"]["name"])["spec"][
        "template"
    ]["spec"]["containers"]
    args = [a.replace("/etc/kvgate/epp-config.yaml", str(config)) for a in container["args"][1:]]
    settings = settings_from_args(build_parser().parse_args(args))
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    async with echo_upstream() as first, echo_upstream() as second:
        settings = dataclasses.replace(
            settings, pool_name=None, endpoints=f"127.0.0.1:{first},127.0.0.1:{second}",
            events_port=None, tokenizer=str(qwen3_dir), bind="127.0.0.1", grpc_port=0,
            health_port=0, metrics_port=0, secure=False, env=env,
        )  # fmt: skip
        async with (
            EppRuntime(settings) as epp,
            envoy_running(
                envoy_for(one(objects, "HTTPRoute"), epp.bound_ports["grpc"]), workdir=tmp_path
            ) as envoy,
            aiohttp.ClientSession() as session,
        ):
            url = f"http://127.0.0.1:{envoy.listener_port('gateway')}/v1/chat/completions"
            forged = dict.fromkeys((*GATEWAY_INPUTS, *PICKER_OUTPUTS), "127.0.0.1:1")
            body = {"model": MODEL, "messages": [{"role": "user", "content": "route me"}]}
            async with session.post(url, data=json.dumps(body), headers=forged) as resp:
                assert resp.status == 200, await resp.text()
                echoed = await resp.json(content_type=None)
            received = echoed["headers"]
            assert not set(GATEWAY_INPUTS) & set(received)
            assert received["x-gateway-destination-endpoint"] == f"127.0.0.1:{echoed['served_by']}"
            assert received["x-worker-instance-id"] != "127.0.0.1:1"
            rewrite = {"x-gateway-model-name-rewrite": MODEL}
            unserved = {**body, "model": "not-served"}
            async with session.post(url, data=json.dumps(unserved), headers=rewrite) as resp:
                assert resp.status == 404
