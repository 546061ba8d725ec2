from __future__ import annotations

import contextlib
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.events.decode import MalformedEvent, decode_batch, parse_seq
from kvgate.events.types import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent
from tests.events.publisher import encode_batch, removed, stored, wire_event

U64_MAX = 2**64 - 1
enc = msgspec.msgpack.encode


def decode(batch: Any, on_unknown: list[str] | None = None) -> list[KvEvent]:
    return decode_batch(7, enc(batch), None if on_unknown is None else on_unknown.append).events


# -- well-formed batches ---------------------------------------------------------------------------

SAMPLE: list[KvEvent] = [
    stored([1, 2], parent=None, block_size=4),
    stored([3], parent=2, block_size=4, medium="CPU", first_token=8),
    removed([1, U64_MAX]),
    AllBlocksCleared(),
]


@pytest.mark.parametrize("layout", ["map", "array"])
@pytest.mark.parametrize("hashes", ["int", "bytes"])
@pytest.mark.parametrize("dp_rank", [None, 0, 3], ids=["no-dp-rank", "dp0", "dp3"])
def test_round_trip_in_every_layout(layout: Any, hashes: Any, dp_rank: int | None) -> None:
    payload = encode_batch(SAMPLE, layout=layout, hashes=hashes, dp_rank=dp_rank, ts=12.5)
    batch = decode_batch(41, payload)
    assert batch.seq == 41
    assert batch.ts == 12.5
    assert batch.data_parallel_rank == dp_rank
    assert batch.events == SAMPLE


def test_mocker_layout_without_lora_id_and_medium_decodes_them_as_none() -> None:
    batch = decode_batch(0, encode_batch(SAMPLE, layout="mocker"))
    first = batch.events[0]
    assert isinstance(first, BlockStored)
    assert (first.medium, first.lora_name) == (None, None)
    assert first.block_hashes == [1, 2]
    assert batch.events[2] == removed([1, U64_MAX], medium=None)


def test_bytes_hash_keeps_the_last_eight_bytes_big_endian() -> None:
    digest = bytes(range(32))
    [event] = decode([0.0, [["BlockStored", [digest], digest[:5], [1, 2], 2]]])
    assert isinstance(event, BlockStored)
    assert event.block_hashes == [int.from_bytes(digest[-8:], "big")]
    assert event.parent_block_hash == int.from_bytes(digest[:5], "big")


def test_int_and_bytes_hashes_may_mix_in_one_event() -> None:
    [event] = decode([0.0, [{"type": "BlockRemoved", "block_hashes": [5, b"\x01\x00"]}]])
    assert event == removed([5, 256], medium=None)


@pytest.mark.parametrize(
    "wire",
    [
        ["BlockStored", [1], None, [1, 2], 2],
        ["BlockStored", [1], None, [1, 2], 2, 0],
        {"type": "BlockStored", "block_hashes": [1], "token_ids": [1, 2], "block_size": 2},
    ],
    ids=["array-stops-after-block_size", "array-stops-after-lora_id", "map-without-optionals"],
)
def test_missing_optional_fields_decode_as_none(wire: Any) -> None:
    [event] = decode([1.0, [wire]])
    assert event == stored([1], tokens=[1, 2], block_size=2, medium=None)


def test_unknown_fields_are_ignored() -> None:
    newer_map = {
        "type": "BlockStored",
        "block_hashes": [9],
        "parent_block_hash": 8,
        "token_ids": [1, 2],
        "block_size": 2,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": "adapter",
        "extra_keys": [["adapter", ["mm", 1]]],
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
    }
    newer_array = ["BlockRemoved", [9], "GPU", 0, "LOCAL", None]
    batch = decode_batch(0, enc([1.0, [newer_map], 0, "future batch field"]))
    assert batch.events == [
        stored(
            [9],
            parent=8,
            tokens=[1, 2],
            block_size=2,
            lora_name="adapter",
            medium="GPU",
            extra_keys=[["adapter", ["mm", 1]]],
        )
    ]
    assert decode([1.0, [newer_array]]) == [removed([9], medium="GPU")]


def test_lora_id_of_any_type_does_not_cost_the_event() -> None:
    [event] = decode([1.0, [["BlockStored", [1], None, [1, 2], 2, {"odd": True}, "GPU"]]])
    assert isinstance(event, BlockStored)
    assert event.medium == "GPU"


def test_integer_timestamp_is_accepted() -> None:
    assert decode_batch(0, enc([5, []])).ts == 5.0


def test_mixed_layouts_in_one_batch() -> None:
    wire = [wire_event(SAMPLE[0], "map"), wire_event(SAMPLE[2], "array")]
    assert decode([0.0, wire]) == [SAMPLE[0], SAMPLE[2]]


@pytest.mark.parametrize(
    "layouts",
    [["map", "array", "array", "map", "mocker", "map"]],
    ids=["decoder-remembers-the-last-layout-but-follows-a-switch"],
)
def test_alternating_layouts_across_batches(layouts: list[Any]) -> None:
    events: list[KvEvent] = [stored([1, 2], medium=None), removed([1], medium=None)]
    for layout in layouts:
        assert decode_batch(0, encode_batch(events, layout=layout)).events == events


@pytest.mark.parametrize("unknown", [["BlockMoved", [1]], {"type": "BlockMoved", "x": 1}])
def test_unknown_event_type_is_skipped_and_reported(unknown: Any) -> None:
    seen: list[str] = []
    wire = [wire_event(SAMPLE[0], "map"), unknown, wire_event(SAMPLE[2], "map")]
    assert decode([0.0, wire], seen) == [SAMPLE[0], SAMPLE[2]]
    assert seen == ["BlockMoved"]


def test_unknown_event_type_without_a_handler_is_still_skipped() -> None:
    assert decode_batch(0, enc([0.0, [["Nope"], ["AllBlocksCleared"]]])).events == [
        AllBlocksCleared()
    ]


# -- malformed input -------------------------------------------------------------------------------

MALFORMED: dict[str, Any] = {
    "batch-is-a-map": {"ts": 1.0, "events": []},
    "batch-too-short": [1.0],
    "ts-is-a-string": ["now", []],
    "events-not-a-list": [1.0, {"type": "AllBlocksCleared"}],
    "dp-rank-is-a-string": [1.0, [], "zero"],
    "event-is-an-int": [1.0, [5]],
    "event-is-an-empty-array": [1.0, [[]]],
    "map-event-without-type": [1.0, [{"block_hashes": [1]}]],
    "tag-is-not-a-string": [1.0, [[3, [1]]]],
    "stored-without-block_size": [1.0, [["BlockStored", [1], None, [1, 2]]]],
    "stored-map-without-token_ids": [
        1.0,
        [{"type": "BlockStored", "block_hashes": [1], "block_size": 2}],
    ],
    "hash-is-a-string": [1.0, [["BlockRemoved", ["abc"]]]],
    "hash-is-a-float": [1.0, [["BlockRemoved", [1.5]]]],
    "hash-is-empty-bytes": [1.0, [["BlockRemoved", [b""]]]],
    "token-is-a-string": [1.0, [["BlockStored", [1], None, ["a", "b"], 2]]],
    "medium-is-an-int": [1.0, [["BlockRemoved", [1], 7]]],
    "bad-event-after-good-one": [1.0, [["AllBlocksCleared"], ["BlockRemoved", "x"]]],
}


@pytest.mark.parametrize("batch", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_batches_raise_malformed_event(batch: Any) -> None:
    with pytest.raises(MalformedEvent):
        decode_batch(0, enc(batch))


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xc1", b"\x92\xcb", b"\x91" * 100_000, b"not msgpack at all"],
    ids=["empty", "reserved-byte", "truncated", "deeply-nested", "text"],
)
def test_garbage_bytes_raise_malformed_event(payload: bytes) -> None:
    with pytest.raises(MalformedEvent):
        decode_batch(0, payload)


def test_malformed_event_is_a_value_error_with_a_reason() -> None:
    with pytest.raises(ValueError, match=r"event 0: .*block_size|at least length"):
        decode_batch(0, enc([1.0, [["BlockStored", [1], None, [1, 2]], ["Unknown"]]]))


@given(st.binary(max_size=300))
@settings(max_examples=500, deadline=None)
def test_random_bytes_never_raise_anything_but_malformed_event(payload: bytes) -> None:
    with contextlib.suppress(MalformedEvent):
        decode_batch(0, payload)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=U64_MAX)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
    | st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "type"]),
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(st.sampled_from(["type", "block_hashes", "token_ids", "x"]), children)
    ),
    max_leaves=30,
)


@pytest.mark.slow
@given(st.lists(msgpack_values, max_size=4), st.sampled_from([0, 1, 2]))
@settings(max_examples=500, deadline=None)
def test_random_msgpack_structures_never_raise_anything_but_malformed_event(
    items: list[Any], shape: int
) -> None:
    # Shapes close to a batch reach deeper into the decoder than arbitrary bytes do.
    batch: Any = items if shape == 0 else [1.0, items] if shape == 1 else [1.0, items, 0]
    with contextlib.suppress(MalformedEvent):
        decode_batch(0, enc(batch))


hash_values = st.integers(min_value=0, max_value=U64_MAX)
events_strategy = st.one_of(
    st.builds(
        lambda hashes, parent, size, medium, lora: BlockStored(
            hashes, parent, list(range(size * len(hashes))), size, lora, medium
        ),
        st.lists(hash_values, min_size=1, max_size=4),
        st.none() | hash_values,
        st.sampled_from([1, 16, 32]),
        st.none() | st.sampled_from(["GPU", "CPU"]),
        st.none() | st.text(max_size=5),
    ),
    st.builds(BlockRemoved, st.lists(hash_values, max_size=4), st.none() | st.just("GPU")),
    st.just(AllBlocksCleared()),
)


@given(
    st.lists(events_strategy, max_size=6),
    st.sampled_from(["map", "array"]),
    st.sampled_from(["int", "bytes"]),
)
@settings(max_examples=200, deadline=None)
def test_any_wellformed_batch_round_trips(events: list[KvEvent], layout: Any, hashes: Any) -> None:
    assert decode_batch(0, encode_batch(events, layout=layout, hashes=hashes)).events == events


# -- seq frame -------------------------------------------------------------------------------------


def test_parse_seq_is_big_endian_unsigned() -> None:
    assert parse_seq(b"\x00" * 7 + b"\x01") == 1
    assert parse_seq((2**40 + 3).to_bytes(8, "big")) == 2**40 + 3
    assert parse_seq(b"\xff" * 8) == U64_MAX


@pytest.mark.parametrize("frame", [b"", b"\x00" * 7, b"\x00" * 9])
def test_parse_seq_refuses_other_lengths(frame: bytes) -> None:
    with pytest.raises(MalformedEvent, match="8 bytes"):
        parse_seq(frame)


@pytest.mark.parametrize("layout", ["map", "array"])
def test_extra_keys_decode_in_both_layouts(layout: Any) -> None:
    """vLLM 0.33 publishes, per block, what it hashed besides the tokens (here a cache salt on
    the first block); the index needs them to hash the blocks as the engine did."""
    event = stored([1, 2], block_size=2, extra_keys=[["tenant-a"], None])
    assert decode_batch(0, encode_batch([event], layout=layout)).events == [event]
