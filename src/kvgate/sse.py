"""OpenAI-style server-sent events: the ``data:`` lines of a streamed response and its usage.

An OpenAI-compatible server streams a completion as one JSON object per ``data:`` line, ends it
with ``data: [DONE]``, and, when the client asked for ``stream_options.include_usage``, puts
``usage`` (prompt, completion and ``prompt_tokens_details.cached_tokens``) in the last object
before ``[DONE]``. Other SSE lines (``event:``, ``id:``, ``:`` comments, blank separators) carry
nothing kvgate reads.

Three readers share these rules: clients that read a stream as it arrives (`EventStream`: the
live benchmark, the demo's chat client) and the endpoint picker, which sees a response go by and
keeps only its tail (`last_usage`).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import msgspec

DONE: Final = b"[DONE]"

_decode = msgspec.json.decode


def data_of(line: bytes) -> bytes | None:
    """The payload of a ``data:`` line, stripped; None for any other line."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    return line[5:].strip()


class EventStream:
    """The JSON objects of a streamed response, in order, up to ``data: [DONE]``.

    Iterate once with ``async for``; afterwards `done` says whether ``[DONE]`` arrived (a stream
    that ends without it was cut short). A payload that is not JSON raises ValueError, so the
    caller decides whether that is an error or noise."""

    __slots__ = ("_lines", "done")

    def __init__(self, lines: AsyncIterable[bytes]) -> None:
        self._lines = lines
        self.done = False

    async def __aiter__(self) -> AsyncIterator[Any]:
        async for raw in self._lines:
            data = data_of(raw)
            if data is None:
                continue
            if data == DONE:
                self.done = True
                return
            try:
                event = _decode(data)
            except (msgspec.DecodeError, RecursionError) as err:
                raise ValueError(f"not JSON in a data line: {err}") from None
            yield event


@dataclass(slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None

    @property
    def counted(self) -> bool:
        """Whether the server reported token counts at all."""
        return self.prompt_tokens is not None or self.completion_tokens is not None


def usage_of(body: Any) -> Usage:
    """The ``usage`` of a response object or stream event; all None when it has none.

    Counts that are not integers are ignored rather than trusted."""
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


def last_usage(stream_tail: bytes) -> Usage:
    """The usage of the last event that reports one, in (the tail of) an SSE body.

    Lines that do not decode are skipped: a tail kept from a longer body may start mid-line."""
    for raw in reversed(stream_tail.split(b"\n")):
        data = data_of(raw)
        if data is None or data == DONE:
            continue
        try:
            event = _decode(data)
        except (msgspec.DecodeError, RecursionError):  # nested past any use: not usage
            continue
        usage = usage_of(event)
        if usage.counted:
            return usage
    return Usage()


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
