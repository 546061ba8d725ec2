"""Decode vLLM-format KV event payloads (msgpack) into `kvgate.events.types`.

Wire format (see the vLLM ``ZmqEventPublisher``): each ZMQ message is ``[topic, seq, payload]``;
``seq`` is an 8-byte big-endian counter and ``payload`` one msgpack-encoded ``EventBatch``, an array
``[ts, events, data_parallel_rank]`` whose last element may be absent. Two event layouts exist in
the wild and both are accepted, even mixed in one batch:

- map: ``{"type": "BlockStored", "block_hashes": ..., ...}`` (newer vLLM);
- array: ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
  lora_name, extra_keys, ...]`` (older vLLM, the Dynamo mocker; they stop before ``extra_keys``).

Tolerance rules: optional fields that are missing decode to ``None``; fields this module does not
know (map keys, trailing array elements) are ignored; block hashes arrive as integers or as bytes
(the last 8 bytes, big-endian, become the integer id). An event whose *type* is unknown is dropped
and reported through ``on_unknown``, the rest of the batch survives. Anything else that does not
fit raises `MalformedEvent`; no other exception escapes `decode_batch`.

Speed: the common case (every event in one layout, all known types) is a single typed msgspec
decode straight into structs, validated in C, then one small Python object per event. Only when
that fails (mixed layouts, an unknown event type, a malformed batch) does the slower per-event path
run, which also produces the error reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeAlias, cast

import msgspec

from kvgate.events.types import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineHash,
    EventBatch,
    KvEvent,
)

__all__ = ["MalformedEvent", "UnknownEventHandler", "decode_batch", "parse_seq"]

UnknownEventHandler: TypeAlias = Callable[[str], None]
"""Called with the type name of each event `decode_batch` skipped because it does not know it."""

_SEQ_LEN: Final = 8
_EVENT_TYPES: Final = frozenset({"BlockStored", "BlockRemoved", "AllBlocksCleared"})


class MalformedEvent(ValueError):
    """A frame or payload that does not follow the wire format; the message says what is wrong."""


def parse_seq(frame: bytes) -> int:
    """The publisher's sequence number: exactly 8 bytes, big-endian, unsigned."""
    if len(frame) != _SEQ_LEN:
        raise MalformedEvent(f"seq frame must be {_SEQ_LEN} bytes, got {len(frame)}")
    return int.from_bytes(frame, "big")


# Wire structs. Fields are declared in the publisher's order because the array layout is
# positional; kw_only lets a required field follow an optional one without changing that order.
# gc=False: these structs live only for the duration of one decode and never form cycles, so the
# collector need not track them (measurably cheaper for batches with many events).


class _Stored(msgspec.Struct, kw_only=True, gc=False):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None = None
    token_ids: list[int]
    block_size: int
    # Deprecated upstream and unused here; declared only to keep later positions aligned, and typed
    # Any so a producer's odd value for it cannot cost us the event.
    lora_id: Any = None
    medium: str | None = None
    lora_name: str | None = None
    # One entry per block (vLLM 0.33), checked where it is used; Any for the same reason as above.
    extra_keys: Any = None

    def to_event(self) -> KvEvent:
        parent = self.parent_block_hash
        return BlockStored(
            _hashes(self.block_hashes),
            None if parent is None else _hash(parent),
            self.token_ids,
            self.block_size,
            self.lora_name,
            self.medium,
            self.extra_keys,
        )


class _Removed(msgspec.Struct, kw_only=True, gc=False):
    block_hashes: list[int | bytes]
    medium: str | None = None

    def to_event(self) -> KvEvent:
        return BlockRemoved(_hashes(self.block_hashes), self.medium)


class _Cleared(msgspec.Struct, gc=False):
    def to_event(self) -> KvEvent:
        return AllBlocksCleared()


class _StoredArray(_Stored, tag="BlockStored", array_like=True):
    pass


class _RemovedArray(_Removed, tag="BlockRemoved", array_like=True):
    pass


class _ClearedArray(_Cleared, tag="AllBlocksCleared", array_like=True):
    pass


class _StoredMap(_Stored, tag="BlockStored"):
    pass


class _RemovedMap(_Removed, tag="BlockRemoved"):
    pass


class _ClearedMap(_Cleared, tag="AllBlocksCleared"):
    pass


# msgspec refuses a union mixing array-like and map structs, hence one union (and one batch type)
# per layout.
_ArrayEvent: TypeAlias = _StoredArray | _RemovedArray | _ClearedArray
_MapEvent: TypeAlias = _StoredMap | _RemovedMap | _ClearedMap


class _ArrayBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[_ArrayEvent]
    data_parallel_rank: int | None = None


class _MapBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[_MapEvent]
    data_parallel_rank: int | None = None


class _RawBatch(msgspec.Struct, array_like=True, gc=False):
    """The batch envelope with events left untyped, for the per-event path."""

    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


_array_decoder: Final = msgspec.msgpack.Decoder(_ArrayBatch)
_map_decoder: Final = msgspec.msgpack.Decoder(_MapBatch)
_raw_decoder: Final = msgspec.msgpack.Decoder(_RawBatch)

# A producer sticks to one layout, so remember which typed decoder worked last and try it first:
# a stream in the other layout then pays one failed attempt per switch, not per batch. Shared by
# all callers; concurrent switches can only cost an extra attempt, never a wrong result.
_typed_decoders: list[msgspec.msgpack.Decoder[_ArrayBatch] | msgspec.msgpack.Decoder[_MapBatch]] = [
    _map_decoder,
    _array_decoder,
]

# msgspec.DecodeError is a ValueError, and so is the UnicodeDecodeError msgspec lets through for a
# string that is not UTF-8; absurdly nested input raises RecursionError.
_DECODE_ERRORS: Final = (ValueError, RecursionError)


def decode_batch(
    seq: int, payload: bytes, on_unknown: UnknownEventHandler | None = None
) -> EventBatch:
    """Decode one payload; raise `MalformedEvent` if it does not follow the wire format."""
    for decoder in _typed_decoders:
        try:
            typed = decoder.decode(payload)
        except _DECODE_ERRORS:
            continue
        if decoder is not _typed_decoders[0]:
            _typed_decoders.reverse()
        return EventBatch(
            seq, typed.ts, [ev.to_event() for ev in typed.events], typed.data_parallel_rank
        )
    return _decode_per_event(seq, payload, on_unknown)


def _decode_per_event(
    seq: int, payload: bytes, on_unknown: UnknownEventHandler | None
) -> EventBatch:
    try:
        raw = _raw_decoder.decode(payload)
    except _DECODE_ERRORS as exc:
        raise MalformedEvent(f"not an event batch: {exc}") from None
    events: list[KvEvent] = []
    for index, item in enumerate(raw.events):
        wire: _ArrayEvent | _MapEvent
        try:
            if isinstance(item, list):
                wire = msgspec.convert(item, _ArrayEvent)
            else:
                wire = msgspec.convert(item, _MapEvent)
        except _DECODE_ERRORS as exc:
            tag = _tag_of(item)
            if tag is not None and tag not in _EVENT_TYPES:
                if on_unknown is not None:
                    on_unknown(tag)
                continue
            raise MalformedEvent(f"event {index}: {exc}") from None
        events.append(wire.to_event())
    return EventBatch(seq, raw.ts, events, raw.data_parallel_rank)


def _tag_of(item: object) -> str | None:
    """The type name an event claims, if it has the shape of a tagged event at all."""
    if isinstance(item, list) and item:
        tag = item[0]
    elif isinstance(item, dict):
        tag = item.get("type")
    else:
        return None
    return tag if isinstance(tag, str) else None


def _hash(value: int | bytes) -> EngineHash:
    if type(value) is bytes:
        if not value:
            raise MalformedEvent("empty block hash")
        return EngineHash(int.from_bytes(value[-8:], "big"))
    return EngineHash(cast(int, value))


def _hashes(values: list[int | bytes]) -> list[EngineHash]:
    # `bytes in map(type, ...)` scans in C; integer hashes (the default) then pass through as the
    # very list msgspec built, with no per-hash Python work.
    if bytes in map(type, values):
        return [_hash(value) for value in values]
    return cast("list[EngineHash]", values)
