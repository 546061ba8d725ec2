"""Shared by the Dynamo tests: request bodies, EPP metrics, and the workers' own counters."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from kvgate.dynamo.processes import DynamoFleet, dynamo_installed
from kvgate.gateway.client import ChatResult, chat

MODEL = "Qwen/Qwen3-0.6B"


def require_dynamo() -> None:
    if not dynamo_installed():
        pytest.skip("ai-dynamo is not installed (`make install` installs it)")


def system_prompt(group: int, facts: int = 40) -> str:
    """A long system prompt of its own per group (~10 tokens per fact)."""
    return f"You are assistant {group}. " + " ".join(
        f"Fact {group}.{i}: keep prefix {group} warm." for i in range(facts)
    )


def chat_body(question: str, system: str | None = None, max_tokens: int = 4) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens}


def send(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> ChatResult:
    async def go() -> ChatResult:
        async with aiohttp.ClientSession() as session:
            return await chat(session, url, body, headers=headers, timeout_s=30)

    return asyncio.run(go())


def send_all(url: str, bodies: list[dict[str, Any]]) -> list[ChatResult]:
    """All at once (concurrently), results in order."""

    async def go() -> list[ChatResult]:
        async with aiohttp.ClientSession() as session:
            return list(
                await asyncio.gather(*(chat(session, url, b, timeout_s=30) for b in bodies))
            )

    return asyncio.run(go())


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for found in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(found.group(2))
    return total


def by_label(text: str, name: str, label: str, **labels: str) -> Counter[str]:
    """Samples of ``name`` summed per value of ``label`` (e.g. decisions per endpoint)."""
    out: Counter[str] = Counter()
    for found in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
        if label in have and all(have.get(k) == v for k, v in labels.items()):
            out[have[label]] += int(float(found.group(2)))
    return out


def delta(
    after: Counter[str] | dict[Any, int], before: Counter[str] | dict[Any, int]
) -> dict[Any, int]:
    """Keys whose count grew, with the growth."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def served(fleet: DynamoFleet, action: Callable[[], Any]) -> tuple[Any, dict[int, int]]:
    """Run ``action``; return its result and how many requests each worker's own counter
    (``dynamo_component_requests_total``) gained meanwhile, by instance id."""
    before = fleet.requests_by_worker()
    result = action()
    after = fleet.requests_by_worker()
    return result, delta(after, before)


def healthz(metrics_url: str) -> dict[str, Any]:
    return dict(json.loads(get(metrics_url.removesuffix("/metrics") + "/healthz")))


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if predicate():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout_s:g} s: {what}")
        time.sleep(0.05)


def settled(metrics_url: str, quiet_s: float = 0.15, timeout_s: float = 3.0) -> None:
    """Wait until the EPP's KV-event count stops changing: the blocks the last request stored
    are in its index (events travel engine -> EPP asynchronously)."""
    deadline = time.monotonic() + timeout_s
    last = metric(get(metrics_url), "kvgate_kv_events_ingested")
    changed = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.03)
        now = metric(get(metrics_url), "kvgate_kv_events_ingested")
        if now != last:
            last, changed = now, time.monotonic()
        elif time.monotonic() - changed >= quiet_s:
            return
