"""A small streaming OpenAI client for the demo and the end-to-end tests: one chat request, with
time to first token, the serving worker (response header) and usage (including cached tokens)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from kvgate.sse import EventStream, usage_of

WORKER_HEADER = "x-kvgate-worker"
INSTANCE_HEADER = "x-worker-instance-id-served"
NVEXT_HEADER = "x-kvgate-received-nvext"


@dataclass
class ChatResult:
    status: int
    worker: str | None
    ttft_s: float | None
    latency_s: float
    text: str
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    chunks: int = 0
    error: str | None = None
    instance_id: int | None = None
    """The serving worker's instance id (simulated engines report it)."""
    received_nvext: dict[str, Any] | None = None
    """The ``nvext`` object the worker received (simulated engines echo it)."""


async def chat(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    timeout_s: float = 60.0,
) -> ChatResult:
    """POST ``body`` to ``url/v1/chat/completions``; streams when ``body["stream"]``."""
    started = time.perf_counter()
    stream = bool(body.get("stream"))
    async with session.post(
        f"{url}/v1/chat/completions",
        json=body,
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    ) as resp:
        worker = resp.headers.get(WORKER_HEADER)
        if resp.status != 200:
            text = await resp.text()
            return ChatResult(resp.status, worker, None, time.perf_counter() - started, "",
                              error=text[:500])  # fmt: skip
        if not stream:
            payload = await resp.json()
            elapsed = time.perf_counter() - started
            result = ChatResult(200, worker, elapsed, elapsed, _message_text(payload))
            _identity(result, resp.headers)
            _usage(result, payload)
            return result
        ttft: float | None = None
        parts: list[str] = []
        result = ChatResult(200, worker, None, 0.0, "")
        _identity(result, resp.headers)
        async for event in EventStream(resp.content):
            result.chunks += 1
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - started
                    parts.append(piece)
            _usage(result, event)
        result.ttft_s = ttft
        result.latency_s = time.perf_counter() - started
        result.text = "".join(parts)
        return result


def _identity(result: ChatResult, headers: Mapping[str, str]) -> None:
    instance = headers.get(INSTANCE_HEADER)
    if instance is not None and instance.isdigit():
        result.instance_id = int(instance)
    nvext = headers.get(NVEXT_HEADER)
    if nvext is not None:
        result.received_nvext = json.loads(nvext)


def _message_text(payload: dict[str, Any]) -> str:
    choices = payload.get("choices") or [{}]
    return str((choices[0].get("message") or {}).get("content") or "")


def _usage(result: ChatResult, payload: Any) -> None:
    usage = usage_of(payload)
    if not usage.counted:
        return
    result.prompt_tokens = usage.prompt_tokens
    result.completion_tokens = usage.completion_tokens
    result.cached_tokens = usage.cached_tokens
