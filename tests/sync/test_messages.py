"""The sync wire format: round trips, and any byte string decodes or is refused cleanly."""

from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.sync.messages import (
    Add,
    Bye,
    Deltas,
    Free,
    Heartbeat,
    MalformedSyncMessage,
    PrefillDone,
    Snapshot,
    SyncRequest,
    add_size,
    decode,
    encode,
)

names = st.text(min_size=1, max_size=40)
hashes = st.lists(st.integers(0, (1 << 64) - 1), max_size=50)
counts = st.integers(0, (1 << 63) - 1)
adds = st.builds(Add, names, names, names, hashes, counts)
ops = st.one_of(adds, st.builds(PrefillDone, names, names), st.builds(Free, names, names))
messages = st.one_of(
    st.builds(Deltas, names, counts, st.lists(ops, max_size=8)),
    st.builds(Heartbeat, names, counts, counts),
    st.integers(1, 5).flatmap(
        lambda parts: st.builds(
            Snapshot, names, counts, counts, st.integers(0, parts - 1), st.just(parts),
            st.lists(adds, max_size=5),
        )
    ),
    st.builds(Bye, names),
    st.builds(SyncRequest, names, st.none() | names),
)  # fmt: skip


@given(messages)
def test_every_message_round_trips(message: object) -> None:
    assert decode(encode(message)) == message  # type: ignore[arg-type]


@given(adds)
def test_add_size_bounds_the_encoding(op: Add) -> None:
    assert len(encode(Deltas("r", 1, [op]))) <= add_size(op) + 64


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_are_refused(payload: bytes) -> None:
    with contextlib.suppress(MalformedSyncMessage):
        decode(payload)


@settings(max_examples=300)
@given(messages, st.data())
def test_corrupted_messages_decode_or_are_refused(message: object, data: st.DataObject) -> None:
    raw = bytearray(encode(message))  # type: ignore[arg-type]
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    with contextlib.suppress(MalformedSyncMessage):
        decode(bytes(raw[:cut]))


@pytest.mark.parametrize(
    "message",
    [
        {"type": "deltas", "router": "", "seq": 1, "ops": []},  # empty router id
        {"type": "deltas", "router": "r", "seq": -1, "ops": []},  # negative seq
        {"type": "hb", "router": "r", "seq": 1},  # missing field
        {"type": "snap", "router": "r", "seq": 1, "snapshot": 1, "part": 2, "parts": 2,
         "entries": []},  # part out of range
        {"type": "deltas", "router": "r", "seq": 1, "ops": [["add", "s", "q", "w", [1], -5]]},
        {"type": "deltas", "router": "r", "seq": 1, "ops": [["launch", "s", "q"]]},
        {"type": "deltas", "router": "r" * 300, "seq": 1, "ops": []},  # too long
    ],
)  # fmt: skip
def test_invalid_messages_are_refused_with_a_reason(message: dict[str, object]) -> None:
    with pytest.raises(MalformedSyncMessage) as err:
        decode(msgspec.msgpack.encode(message))
    assert str(err.value)
