"""Wire format of replica sync: msgpack, one tagged message per NATS message.

Data subject (``<subject>``), published by each replica from one task, so NATS keeps their order:

``deltas``    changes to the sender's own bookings since its previous message, numbered by ``seq``
              (1, 2, 3... per sender, one per ``deltas`` message);
``hb``        heartbeat: the sender is alive, and the ``seq`` of its last ``deltas``;
``snap``      the sender's whole in-flight state as of ``seq``, in ``parts`` messages;
``bye``       the sender is shutting down: forget its bookings now.

Control subject (``<subject>.sync``): ``sync?`` asks one replica (``target``) or all (``None``)
to publish a snapshot.

Every field is bounded, so a hostile or corrupt message is refused by the decoder instead of
allocating without limit; the receiver counts and drops what does not decode.
"""

from __future__ import annotations

from typing import Annotated, TypeAlias

import msgspec

_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
_Worker = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
_Count = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
_Hash = int  # u64; msgspec bounds stop at int64, and a bogus hash only fails to match
_Hashes = Annotated[list[_Hash], msgspec.Meta(max_length=1 << 20)]

MAX_OPS = 1 << 16
MAX_PARTS = 1 << 16


class Add(msgspec.Struct, tag="add", array_like=True, frozen=True):
    scorer: _Name
    request: _RequestId
    worker: _Worker
    hashes: _Hashes
    prefill_tokens: _Count


class PrefillDone(msgspec.Struct, tag="pd", array_like=True, frozen=True):
    scorer: _Name
    request: _RequestId


class Free(msgspec.Struct, tag="free", array_like=True, frozen=True):
    scorer: _Name
    request: _RequestId


Op: TypeAlias = Add | PrefillDone | Free


class Deltas(msgspec.Struct, tag="deltas", frozen=True):
    router: _Name
    seq: _Count
    ops: Annotated[list[Op], msgspec.Meta(max_length=MAX_OPS)]


class Heartbeat(msgspec.Struct, tag="hb", frozen=True):
    router: _Name
    seq: _Count
    in_flight: _Count


class Snapshot(msgspec.Struct, tag="snap", frozen=True):
    router: _Name
    seq: _Count
    snapshot: _Count
    """Identifies the snapshot its parts belong to (per sender)."""
    part: Annotated[int, msgspec.Meta(ge=0, lt=MAX_PARTS)]
    parts: Annotated[int, msgspec.Meta(ge=1, le=MAX_PARTS)]
    entries: Annotated[list[Add], msgspec.Meta(max_length=MAX_OPS)]
    """In-flight requests; ``prefill_tokens`` is 0 once their prefill completed."""


class Bye(msgspec.Struct, tag="bye", frozen=True):
    router: _Name


class SyncRequest(msgspec.Struct, tag="sync?", frozen=True):
    router: _Name
    target: _Name | None = None


Message: TypeAlias = Deltas | Heartbeat | Snapshot | Bye | SyncRequest

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class MalformedSyncMessage(ValueError):
    """A payload that is not a valid sync message."""


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(payload: bytes) -> Message:
    try:
        message: Message = _decoder.decode(payload)
    # msgspec raises UnicodeDecodeError (a ValueError) for invalid UTF-8 in a string.
    except (msgspec.MsgspecError, ValueError, OverflowError) as err:
        raise MalformedSyncMessage(str(err)) from None
    if isinstance(message, Snapshot) and message.part >= message.parts:
        raise MalformedSyncMessage(f"snapshot part {message.part} of {message.parts}")
    return message


def add_size(op: Add) -> int:
    """Upper bound of an `Add`'s encoded size, for splitting messages under NATS' payload limit."""
    # Up to 4 UTF-8 bytes per character; ids are short, so the slack costs nothing.
    return 9 * len(op.hashes) + 4 * (len(op.scorer) + len(op.request) + len(op.worker)) + 40
