"""Typed KV-cache events, as decoded from an engine's stream.

Engine block hashes are opaque ids (vLLM's are SHA-256 based, SGLang's and the Dynamo mocker's are
their own): they are only ever used to *name* a block in a later removal. kvgate re-hashes the
``token_ids`` of every stored block itself (see `kvgate.tokens.hashing`).

These types are the contract between the engines that publish events (the simulator), the
decoder and the index, so this module imports the standard library only (a test pins it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NewType

EngineHash = NewType("EngineHash", int)


@dataclass(slots=True)
class BlockStored:
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    lora_name: str | None = None
    medium: str | None = None
    extra_keys: list[Any] | None = None
    """Per block, what the engine hashed besides its tokens (vLLM: LoRA name, multimodal items,
    ``cache_salt``, prompt-embedding digests), or None; see `kvgate.tokens.hashing`."""


@dataclass(slots=True)
class BlockRemoved:
    block_hashes: list[EngineHash]
    medium: str | None = None


@dataclass(slots=True)
class AllBlocksCleared:
    pass


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(slots=True)
class EventBatch:
    """One engine step's events, with the publisher's sequence number."""

    seq: int
    ts: float
    events: list[KvEvent] = field(default_factory=list)
    data_parallel_rank: int | None = None
