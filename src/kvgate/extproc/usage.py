"""Reading ``usage`` from a response as it streams past, without keeping the whole body.

A non-streaming response carries usage in its final JSON; a streaming one (SSE) in the last
``data:`` event before ``data: [DONE]``, and only when the client asked for
``stream_options.include_usage``. Only a bounded tail of the body is kept: usage always sits at the
end, and the picker must not hold a copy of every response in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_TAIL_BYTES = 64 * 1024
_BODY_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None


class UsageTracker:
    def __init__(self) -> None:
        self._buf = bytearray()
        self._streaming = False
        self._truncated = False

    def feed(self, chunk: bytes, *, streaming: bool) -> None:
        self._streaming = streaming
        if not chunk:
            return
        self._buf += chunk
        limit = _TAIL_BYTES if streaming else _BODY_BYTES
        if len(self._buf) > limit:
            if not streaming:
                self._truncated = True
            del self._buf[: len(self._buf) - limit]

    def result(self) -> Usage:
        if self._streaming:
            return _from_sse(bytes(self._buf))
        if self._truncated:
            return Usage()
        try:
            body = json.loads(self._buf)
        except (ValueError, RecursionError):
            return Usage()
        return _from_object(body)


def _from_sse(data: bytes) -> Usage:
    for raw in reversed(data.split(b"\n")):
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            continue
        try:
            event = json.loads(payload)
        except (ValueError, RecursionError):
            continue
        usage = _from_object(event)
        if usage.prompt_tokens is not None or usage.completion_tokens is not None:
            return usage
    return Usage()


def _from_object(body: Any) -> Usage:
    if not isinstance(body, dict):
        return Usage()
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return Usage()
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(
        prompt_tokens=_int(usage.get("prompt_tokens")),
        completion_tokens=_int(usage.get("completion_tokens")),
        cached_tokens=_int(cached),
    )


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
