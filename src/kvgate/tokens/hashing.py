"""KV block hashing: Dynamo-compatible block hashes and kvgate's internal prefix keys.

A *local* hash identifies one block's tokens alone: xxh3_64 with seed 1337 over the token ids as
little-endian u32, byte-for-byte what `ai-dynamo-runtime`'s router computes (a LoRA adapter
changes the seed, so adapters never share cache entries with the base model). A *sequence* hash
chains every block up to and including this one (``seq[i] = xxh3(seq[i-1] ‖ local[i])``), so it
identifies a whole prefix; it is what Dynamo puts on the wire and what `kvgate tokenize` prints.

The prefix index is keyed by sequence hashes. Hashing sits on the request path for every block of
every request, so `hash_blocks` uses a small native extension (`_blockhash.c`, linked against the
system's libxxhash) when it was built, and the pure-Python functions below otherwise. The Python
functions are the specification; tests hold the extension to them.

Only full blocks are hashed: a trailing partial block is never shared by an engine's prefix cache.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Any, NewType

import xxhash

LocalHash = NewType("LocalHash", int)
SequenceHash = NewType("SequenceHash", int)

DYNAMO_HASH_SEED = 1337
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1
_pack_pair = struct.Struct("<QQ").pack
_xxh3 = xxhash.xxh3_64_intdigest
_NEEDS_BYTESWAP = sys.byteorder != "little"

# Splitting the packed tokens into per-block byte strings with one precompiled Struct call is the
# cheapest way to feed xxh3 one block at a time (no per-block slicing in Python). Structs are
# cached per (block bytes, blocks) for up to one chunk; longer prompts are unpacked chunk by chunk.
_CHUNK_BLOCKS = 64
_splitters: dict[tuple[int, int], struct.Struct] = {}


def _splitter(block_bytes: int, blocks: int) -> struct.Struct:
    key = (block_bytes, blocks)
    found = _splitters.get(key)
    if found is None:
        found = _splitters[key] = struct.Struct(f"{block_bytes}s" * blocks)
    return found


def lora_seed(lora_name: str | None) -> int:
    """Seed for a request's local hashes; the base model uses 1337."""
    if not lora_name:
        return DYNAMO_HASH_SEED
    return (DYNAMO_HASH_SEED + _xxh3(lora_name.encode())) & _U64


def _token_bytes(tokens: Sequence[int], count: int) -> bytes:
    packed = array("I")
    try:
        if isinstance(tokens, list):
            packed.fromlist(tokens if count == len(tokens) else tokens[:count])
        else:
            # iter(): array.extend refuses an array of another type code (e.g. "q") outright.
            packed.extend(iter(tokens[:count]))
    except OverflowError:
        # Same error as the native extension: a token id outside u32 is bad input, not arithmetic.
        position = next(i for i, t in enumerate(tokens[:count]) if not 0 <= t <= _U32)
        raise ValueError(f"token id at position {position} is not a u32") from None
    if _NEEDS_BYTESWAP:
        packed.byteswap()
    return packed.tobytes()


def local_block_hashes(
    tokens: Sequence[int], block_size: int, seed: int = DYNAMO_HASH_SEED
) -> list[LocalHash]:
    """Hash each full block of ``tokens`` on its own."""
    blocks = len(tokens) // block_size
    if blocks == 0:
        return []
    data = _token_bytes(tokens, blocks * block_size)
    block_bytes = block_size * 4
    if blocks <= _CHUNK_BLOCKS:
        pieces: Sequence[bytes] = _splitter(block_bytes, blocks).unpack(data)
    else:
        full = _splitter(block_bytes, _CHUNK_BLOCKS)
        chunk_bytes = block_bytes * _CHUNK_BLOCKS
        whole = blocks // _CHUNK_BLOCKS
        pieces = []
        for offset in range(0, whole * chunk_bytes, chunk_bytes):
            pieces.extend(full.unpack_from(data, offset))
        rest = blocks - whole * _CHUNK_BLOCKS
        if rest:
            pieces.extend(_splitter(block_bytes, rest).unpack_from(data, whole * chunk_bytes))
    return list(map(_xxh3, pieces, repeat(seed, blocks)))  # type: ignore[arg-type]


def sequence_hashes(local: Sequence[LocalHash]) -> list[SequenceHash]:
    """Dynamo's chained prefix hashes. The chain always uses the base seed: a LoRA adapter
    already changed every local hash."""
    if not local:
        return []
    xxh3 = _xxh3
    pack = _pack_pair
    prev: int = local[0]
    out = [SequenceHash(prev)]
    append = out.append
    for h in local[1:]:
        prev = xxh3(pack(prev, h), DYNAMO_HASH_SEED)
        append(SequenceHash(prev))
    return out


def extend_sequence_hashes(
    parent: SequenceHash | None, local: Sequence[LocalHash]
) -> list[SequenceHash]:
    """Sequence hashes of ``local`` blocks that follow the block whose sequence hash is ``parent``
    (None: they start a sequence)."""
    if parent is None:
        return sequence_hashes(local)
    xxh3 = _xxh3
    pack = _pack_pair
    prev: int = parent
    out: list[SequenceHash] = []
    append = out.append
    for h in local:
        prev = xxh3(pack(prev, h), DYNAMO_HASH_SEED)
        append(SequenceHash(prev))
    return out


def hash_blocks_python(
    tokens: Sequence[int], block_size: int, seed: int, parent: SequenceHash | None
) -> tuple[list[LocalHash], list[SequenceHash]]:
    local = local_block_hashes(tokens, block_size, seed)
    return local, extend_sequence_hashes(parent, local)


_native_hash_blocks: Callable[..., tuple[Any, list[SequenceHash]]] | None
try:
    from kvgate.tokens._blockhash import hash_blocks as _native_hash_blocks
except ImportError:  # pragma: no cover - depends on how kvgate was installed
    _native_hash_blocks = None

NATIVE_HASHING = _native_hash_blocks is not None


def hash_blocks(
    tokens: Sequence[int],
    block_size: int,
    seed: int = DYNAMO_HASH_SEED,
    parent: SequenceHash | None = None,
) -> tuple[list[LocalHash], list[SequenceHash]]:
    """Local and sequence hashes of every full block of ``tokens``, continuing from ``parent``."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if _native_hash_blocks is not None:
        local, seqs = _native_hash_blocks(tokens, block_size, seed, parent)
        return local, seqs
    return hash_blocks_python(tokens, block_size, seed, parent)


def sequence_hashes_of(
    tokens: Sequence[int],
    block_size: int,
    seed: int = DYNAMO_HASH_SEED,
    parent: SequenceHash | None = None,
) -> list[SequenceHash]:
    """Only the sequence hashes: what routing needs, without the cost of the local ones."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if _native_hash_blocks is not None:
        return _native_hash_blocks(tokens, block_size, seed, parent, False)[1]
    return hash_blocks_python(tokens, block_size, seed, parent)[1]


def block_hashes(
    tokens: Sequence[int], block_size: int, lora_name: str | None = None
) -> tuple[list[LocalHash], list[SequenceHash]]:
    """Dynamo-compatible local and sequence hashes of every full block of ``tokens``."""
    return hash_blocks(tokens, block_size, lora_seed(lora_name))
