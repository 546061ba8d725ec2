"""Reading ``usage`` from a response as it streams past, without keeping the whole body.

A non-streaming response carries usage in its final JSON; a streaming one (SSE) in the last
``data:`` event before ``data: [DONE]``, and only when the client asked for
``stream_options.include_usage``. Only a bounded tail of the body is kept: usage always sits at the
end, and the picker must not hold a copy of every response in memory.
"""

from __future__ import annotations

import json

from kvgate.sse import Usage, last_usage, usage_of

_TAIL_BYTES = 64 * 1024
_BODY_BYTES = 4 * 1024 * 1024


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
            return last_usage(bytes(self._buf))
        if self._truncated:
            return Usage()
        try:
            body = json.loads(self._buf)
        except (ValueError, RecursionError):
            return Usage()
        return usage_of(body)
