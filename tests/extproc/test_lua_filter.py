"""The Lua nvext injector of ``deploy/lua-filter/`` running in a real Envoy.

The Lua is taken from the manifests themselves. Every case of the shared table, and a seeded batch
of random and damaged bodies, must come out of Envoy byte for byte as ``kvgate.extproc.nvext``
produces it (the body transformer's merge), with a matching ``content-length``.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml
from multidict import CIMultiDict

from kvgate.extproc.nvext import Injected, inject_nvext
from tests.extproc.envoy_harness import (
    RunningEnvoy,
    bootstrap,
    echo_upstream,
    echoed_body,
    envoy_running,
    http_listener,
    static_cluster,
)
from tests.extproc.nvext_cases import BIG_TEXT, CASE_IDS, CASES, NvextCase, agg, chat, disagg, dumps

pytestmark = pytest.mark.asyncio(loop_scope="module")

LUA_DIR = Path(__file__).resolve().parents[2] / "deploy" / "lua-filter"
ISTIO = LUA_DIR / "istio-envoyfilter.yaml"
ENVOY_GATEWAY = LUA_DIR / "envoygateway-patch.yaml"
TIMEOUT = aiohttp.ClientTimeout(total=20)
SMALL_BUFFER = 64 * 1024


def _istio_filter() -> dict[str, Any]:
    manifest = yaml.safe_load(ISTIO.read_text())
    value: dict[str, Any] = manifest["spec"]["configPatches"][0]["patch"]["value"]
    return value


def _envoy_gateway_filter() -> dict[str, Any]:
    manifest = yaml.safe_load(ENVOY_GATEWAY.read_text())
    value: dict[str, Any] = manifest["spec"]["jsonPatches"][0]["operation"]["value"]
    return value


def _lua(http_filter: Mapping[str, Any]) -> str:
    source: str = http_filter["typed_config"]["default_source_code"]["inline_string"]
    return source


@dataclass
class LuaGateway:
    envoy: RunningEnvoy
    session: aiohttp.ClientSession

    async def post(
        self, listener: str, body: bytes, headers: Mapping[str, str] | CIMultiDict[str]
    ) -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{self.envoy.listener_port(listener)}/v1/chat/completions"
        async with self.session.post(url, data=body, headers=headers) as response:
            if response.status != 200:
                return response.status, {"text": await response.text()}
            return response.status, await response.json()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LuaGateway]:
    listeners = [
        http_listener("istio", "upstream", [_istio_filter()]),
        http_listener("envoy_gateway", "upstream", [_envoy_gateway_filter()]),
        http_listener(
            "small_buffer", "upstream", [_istio_filter()], buffer_limit_bytes=SMALL_BUFFER
        ),
    ]
    async with echo_upstream() as upstream_port:
        config = bootstrap(listeners, [static_cluster("upstream", upstream_port)])
        workdir = tmp_path_factory.mktemp("envoy-lua")
        async with (
            envoy_running(config, workdir=workdir) as envoy,
            aiohttp.ClientSession(timeout=TIMEOUT) as session,
        ):
            yield LuaGateway(envoy, session)


def _python_result(body: bytes, headers: Mapping[str, str]) -> bytes:
    result = inject_nvext(body, headers)
    return result.body if isinstance(result, Injected) else body


# -- the manifests -------------------------------------------------------------------------------


async def test_both_manifests_carry_the_same_lua() -> None:
    istio, envoy_gateway = _lua(_istio_filter()), _lua(_envoy_gateway_filter())
    assert istio == envoy_gateway
    assert "function envoy_on_request" in istio


async def test_istio_filter_goes_just_before_the_router() -> None:
    manifest = yaml.safe_load(ISTIO.read_text())
    assert manifest["apiVersion"] == "networking.istio.io/v1alpha3"
    assert manifest["kind"] == "EnvoyFilter"
    patch = manifest["spec"]["configPatches"][0]
    assert patch["applyTo"] == "HTTP_FILTER"
    assert patch["match"]["context"] == "GATEWAY"
    sub_filter = patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]
    assert sub_filter["name"] == "envoy.filters.http.router"
    assert patch["patch"]["operation"] == "INSERT_BEFORE"


async def test_envoy_gateway_patch_adds_at_the_router_position() -> None:
    manifest = yaml.safe_load(ENVOY_GATEWAY.read_text())
    assert manifest["apiVersion"] == "gateway.envoyproxy.io/v1alpha1"
    assert manifest["kind"] == "EnvoyPatchPolicy"
    assert manifest["spec"]["type"] == "JSONPatch"
    patch = manifest["spec"]["jsonPatches"][0]
    assert patch["type"] == "type.googleapis.com/envoy.config.listener.v3.Listener"
    operation = patch["operation"]
    assert operation["op"] == "add"
    assert "path" not in operation  # with only jsonPath, "add" inserts before the match
    assert "envoy.filters.http.router" in operation["jsonPath"]


# -- behaviour in Envoy --------------------------------------------------------------------------


@pytest.mark.envoy
@pytest.mark.parametrize("listener", ["istio", "envoy_gateway"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
async def test_case_table_matches_the_body_transformer(
    gateway: LuaGateway, case: NvextCase, listener: str
) -> None:
    status, answer = await gateway.post(listener, case.body, case.headers)
    assert status == 200, (answer, gateway.envoy.log_tail())
    received = echoed_body(answer)
    expected = _python_result(case.body, case.headers)
    if case.unchanged:
        assert received == case.body
    else:
        assert json.loads(received) == case.expected
    assert received == expected
    assert answer["content_length"] == str(len(received))


@pytest.mark.envoy
async def test_repeated_header_is_refused(gateway: LuaGateway) -> None:
    headers = CIMultiDict([("x-worker-instance-id", "1"), ("x-worker-instance-id", "2")])
    status, answer = await gateway.post("istio", b"{}", headers)
    assert status == 200
    assert echoed_body(answer) == b"{}"


@pytest.mark.envoy
async def test_chunked_request_gets_a_content_length(gateway: LuaGateway) -> None:
    body = dumps(chat())

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 5):
            yield body[i : i + 5]

    url = f"http://127.0.0.1:{gateway.envoy.listener_port('istio')}/v1/chat/completions"
    async with gateway.session.post(url, data=pieces(), headers=disagg()) as response:
        answer = await response.json()
    expected = _python_result(body, disagg())
    assert echoed_body(answer) == expected
    assert answer["content_length"] == str(len(expected))


@pytest.mark.envoy
async def test_get_without_body(gateway: LuaGateway) -> None:
    url = f"http://127.0.0.1:{gateway.envoy.listener_port('istio')}/v1/models"
    async with gateway.session.get(url, headers=agg()) as response:
        assert response.status == 200
        assert echoed_body(await response.json()) == b""


@pytest.mark.envoy
async def test_unrouted_requests_are_not_buffered(gateway: LuaGateway) -> None:
    """Past the buffer limit a routed body gets Envoy's 413 (it must be buffered to be rewritten),
    while a request without routing headers streams through untouched."""
    body = dumps(chat(prompt=BIG_TEXT))
    status, _ = await gateway.post("small_buffer", body, agg())
    assert status == 413
    status, answer = await gateway.post("small_buffer", body, {})
    assert status == 200
    assert echoed_body(answer) == body


# -- differential fuzzing against the Python merge ----------------------------------------------

_WS = ["", "", "", " ", "\n", "\t", "\r\n  "]
_STRINGS = ["", "a", "nvext", "x y", "é", "你好", "😀", '"', "\\", "/", "\b\f\n\r\t", "\0", "\x7f"]
_NUMBERS = ["0", "-0", "7", "-12", "3.25", "1e5", "2E-3", "-1.5e+10", "1e400", "1" * 23]
_NAMES = ["model", "nvext", "backend_instance_id", "prefill_worker_id", "decode_worker_id", "k"]


def _ws(rng: random.Random) -> str:
    return rng.choice(_WS)


def _string(rng: random.Random) -> str:
    text = rng.choice(_STRINGS + _NAMES)
    return json.dumps(text, ensure_ascii=rng.random() < 0.5)


def _value(rng: random.Random, depth: int) -> str:
    roll = rng.random()
    if depth > 3 or roll < 0.45:
        return rng.choice([_string(rng), rng.choice(_NUMBERS), "true", "false", "null"])
    if roll < 0.7:
        items = [_ws(rng) + _value(rng, depth + 1) + _ws(rng) for _ in range(rng.randrange(4))]
        return "[" + ",".join(items) + "]" if items else "[" + _ws(rng) + "]"
    return _object(rng, depth + 1)


def _object(rng: random.Random, depth: int) -> str:
    members = []
    for _ in range(rng.randrange(5)):
        name = json.dumps(rng.choice(_NAMES)) if rng.random() < 0.6 else _string(rng)
        if name == '"nvext"' and rng.random() < 0.3:
            name = '"\\u006evext"'
        value = _value(rng, depth)
        members.append(_ws(rng) + name + _ws(rng) + ":" + _ws(rng) + value + _ws(rng))
    return "{" + ",".join(members) + "}" if members else "{" + _ws(rng) + "}"


def _damage(rng: random.Random, body: bytes) -> bytes:
    roll = rng.random()
    if roll < 0.5 or not body:
        return body
    i = rng.randrange(len(body))
    if roll < 0.7:
        return body[:i]
    if roll < 0.85:
        return body[:i] + bytes([rng.randrange(256)]) + body[i:]
    return body[:i] + bytes([rng.randrange(256)]) + body[i + 1 :]


def _fuzz_bodies(seed: int, count: int) -> list[tuple[bytes, dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        body = _damage(rng, (_ws(rng) + _object(rng, 0) + _ws(rng)).encode())
        headers = agg(str(rng.randrange(2**64))) if rng.random() < 0.7 else disagg()
        out.append((body, headers))
    return out


@pytest.mark.envoy
async def test_random_and_damaged_bodies_match_the_body_transformer(gateway: LuaGateway) -> None:
    mismatches = []
    injected = 0
    for body, headers in _fuzz_bodies(seed=20261127, count=400):
        status, answer = await gateway.post("istio", body, headers)
        assert status == 200, answer
        expected = _python_result(body, headers)
        injected += expected != body
        if echoed_body(answer) != expected:
            mismatches.append((body, echoed_body(answer), expected))
    assert not mismatches, mismatches[:3]
    assert 100 < injected < 390  # both outcomes are well represented
