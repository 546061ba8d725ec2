"""Shared by the gateway tests: requests through a running gateway, its metrics and health."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from typing import Any

import aiohttp

from kvgate.gateway.client import ChatResult, chat

MODEL = "Qwen/Qwen3-0.6B"


def send(url: str, payload: dict[str, Any], headers: dict[str, str] | None = None) -> ChatResult:
    async def go() -> ChatResult:
        async with aiohttp.ClientSession() as session:
            return await chat(session, url, payload, headers=headers, timeout_s=30)

    return asyncio.run(go())


def send_many(url: str, payloads: list[dict[str, Any]]) -> list[ChatResult]:
    """One after the other, on fresh connections (Envoy opens one ext_proc stream per request)."""

    async def go() -> list[ChatResult]:
        async with aiohttp.ClientSession() as session:
            return [await chat(session, url, p, timeout_s=30) for p in payloads]

    return asyncio.run(go())


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def metric_value(text: str, name: str) -> float:
    """The sum of every sample of ``name`` (all label sets) in a Prometheus exposition."""
    found = re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M)
    return sum(float(v) for v in found)
