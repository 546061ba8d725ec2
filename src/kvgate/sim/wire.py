"""msgpack encoding of KV event batches in vLLM's wire format.

A batch is an array ``[ts, events, data_parallel_rank]``. Events come in the two layouts found in
the wild:

- ``"map"`` (vLLM 0.33, the default): ``{"type": "BlockStored", "block_hashes": [...], ...}``;
- ``"array"`` (older vLLM, the Dynamo mocker): ``["BlockStored", block_hashes, ...]`` with the
  fields in declaration order.

Field order for both follows vLLM: BlockStored(block_hashes, parent_block_hash, token_ids,
block_size, lora_id, medium, lora_name, extra_keys), BlockRemoved(block_hashes, medium),
AllBlocksCleared(). ``extra_keys`` carries a request's ``cache_salt`` on its first block.
The simulator serves the base model only, so ``lora_id`` and ``lora_name`` are always nil.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from kvgate.events.types import BlockRemoved, BlockStored, KvEvent

EventLayout = Literal["map", "array"]

_encode = msgspec.msgpack.Encoder().encode


def _as_map(event: KvEvent) -> dict[str, object]:
    if isinstance(event, BlockStored):
        fields: dict[str, object] = {
            "type": "BlockStored",
            "block_hashes": event.block_hashes,
            "parent_block_hash": event.parent_block_hash,
            "token_ids": event.token_ids,
            "block_size": event.block_size,
            "lora_id": None,
            "medium": event.medium,
            "lora_name": event.lora_name,
        }
        if event.extra_keys is not None:
            fields["extra_keys"] = event.extra_keys
        return fields
    if isinstance(event, BlockRemoved):
        return {"type": "BlockRemoved", "block_hashes": event.block_hashes, "medium": event.medium}
    return {"type": "AllBlocksCleared"}


def _as_array(event: KvEvent) -> list[object]:
    if isinstance(event, BlockStored):
        fields: list[object] = [
            "BlockStored",
            event.block_hashes,
            event.parent_block_hash,
            event.token_ids,
            event.block_size,
            None,
            event.medium,
            event.lora_name,
        ]
        # Producers of this layout stop at lora_name; a salted block still needs its keys.
        return fields if event.extra_keys is None else [*fields, event.extra_keys]
    if isinstance(event, BlockRemoved):
        return ["BlockRemoved", event.block_hashes, event.medium]
    return ["AllBlocksCleared"]


def encode_batch(
    ts: float,
    events: list[KvEvent],
    layout: EventLayout = "map",
    data_parallel_rank: int | None = None,
) -> bytes:
    convert = _as_map if layout == "map" else _as_array
    return _encode([ts, [convert(e) for e in events], data_parallel_rank])
