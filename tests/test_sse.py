from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable

import pytest

from kvgate.sse import EventStream, Usage, data_of, last_usage, usage_of

USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 8}}


async def lines(raw: Iterable[bytes]) -> AsyncIterator[bytes]:
    for line in raw:
        yield line


def sse(*events: object, done: bool = True) -> list[bytes]:
    out: list[bytes] = [b": keep-alive\n", b"event: message\n"]
    for e in events:
        out += [f"data: {json.dumps(e)}\n".encode(), b"\n"]
    if done:
        out.append(b"data: [DONE]\n")
    return out


def test_data_of_reads_data_lines_only() -> None:
    assert data_of(b"data: {}\r\n") == b"{}"
    assert data_of(b"data:{}") == b"{}"
    assert data_of(b"event: x") is None
    assert data_of(b": comment") is None
    assert data_of(b"") is None


async def test_event_stream_yields_objects_until_done() -> None:
    stream = EventStream(lines([*sse({"a": 1}, {"b": 2}), b'data: {"after": "done"}\n']))
    assert [e async for e in stream] == [{"a": 1}, {"b": 2}]
    assert stream.done


async def test_event_stream_without_done_says_so() -> None:
    stream = EventStream(lines(sse({"a": 1}, done=False)))
    assert [e async for e in stream] == [{"a": 1}]
    assert not stream.done


async def test_event_stream_refuses_data_that_is_not_json() -> None:
    stream = EventStream(lines([b"data: {oops\n"]))
    with pytest.raises(ValueError, match="not JSON"):
        _ = [e async for e in stream]


def test_usage_of_reads_counts_and_ignores_what_is_not_an_integer() -> None:
    assert usage_of({"usage": USAGE}) == Usage(12, 3, 8)
    assert usage_of({"usage": {"prompt_tokens": "12", "completion_tokens": True}}) == Usage()
    assert usage_of({"usage": None}) == Usage()
    assert usage_of([1, 2]) == Usage()
    assert not Usage().counted
    assert Usage(prompt_tokens=0).counted


def test_last_usage_takes_the_last_event_that_reports_one() -> None:
    body = b"".join(sse({"choices": []}, {"usage": {"prompt_tokens": 1}}, {"usage": USAGE}))
    assert last_usage(body) == Usage(12, 3, 8)
    # A tail that starts mid-line (the picker keeps only the end of a long stream).
    assert last_usage(body[body.index(b"data:") + 3 :]) == Usage(12, 3, 8)
    assert last_usage(b"data: {cut\ndata: [DONE]\n") == Usage()
