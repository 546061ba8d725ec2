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

Extra keys. vLLM hashes some blocks with more than their tokens (``generate_block_hash_extra_keys``
in ``vllm/v1/core/kv_cache_utils.py``): the first block of a request carrying ``cache_salt`` gets
the salt, so salted prompts share cached blocks only with prompts of the same salt; a block
holding multimodal placeholders gets each item's identifier and offset; prompt embeddings their
digest. Its ``BlockStored`` events carry these keys per block (``extra_keys``; the LoRA name first
when the block belongs to an adapter). kvgate gives each key a u64 (:func:`cache_salt_key`,
:func:`event_extra_keys`) and appends them, little-endian, to the block's token bytes before
hashing it — as Dynamo does with multimodal item hashes — so a block hashes differently exactly
when the engine's does. Blocks without extra keys hash as before.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Callable, Mapping, Sequence
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


BlockExtras = Mapping[int, Sequence[int]]
"""Extra keys by block index (counted from the first hashed block): u64s hashed with the block's
tokens."""


def _tagged_key(tag: bytes, data: bytes) -> int:
    # A tag per kind of key: a salt never equals an identifier that happens to spell the same.
    return _xxh3(tag + b"\0" + data)


def cache_salt_key(salt: str) -> int:
    """The u64 a ``cache_salt`` adds to the first block of a request."""
    return _tagged_key(b"cache_salt", salt.encode("utf-8"))


def salt_extras(salt: str | None) -> BlockExtras | None:
    """The extra keys of a request with ``cache_salt`` ``salt`` (vLLM salts the first block)."""
    return {0: (cache_salt_key(salt),)} if salt else None


def event_extra_keys(keys: object, lora_name: str | None) -> tuple[int, ...]:
    """One block's extra keys as a vLLM ``BlockStored`` event carries them, as u64s.

    vLLM publishes them untagged, in this order: the LoRA name (when ``lora_name`` is set; the
    hash seed already covers it), ``[identifier, offset]`` per multimodal item, the cache salt (a
    string), prompt-embedding digests (bytes). A value of another shape still changes the block's
    hash, so an unknown key never makes kvgate predict a hit the engine would not have.
    """
    if keys is None:
        return ()
    entries = list(keys) if isinstance(keys, list | tuple) else [keys]
    if lora_name is not None and entries and entries[0] == lora_name:
        entries = entries[1:]
    out = []
    for entry in entries:
        if isinstance(entry, str):
            out.append(cache_salt_key(entry))
        elif isinstance(entry, bytes):
            out.append(_tagged_key(b"prompt_embeds", entry))
        elif (
            isinstance(entry, list | tuple)
            and len(entry) == 2
            and isinstance(entry[1], int)
            and not isinstance(entry[1], bool)
        ):
            identifier = entry[0] if isinstance(entry[0], str | bytes) else repr(entry[0])
            data = identifier.encode() if isinstance(identifier, str) else identifier
            out.append(_tagged_key(b"mm", data + struct.pack("<q", entry[1])))
        else:
            out.append(_tagged_key(b"other", repr(entry).encode()))
    return tuple(out)


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
    extras: BlockExtras | None = None,
) -> tuple[list[LocalHash], list[SequenceHash]]:
    """Local and sequence hashes of every full block of ``tokens``, continuing from ``parent``;
    the blocks named in ``extras`` are hashed with their extra keys."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if _native_hash_blocks is not None:
        local, seqs = _native_hash_blocks(tokens, block_size, seed, parent)
    else:
        local, seqs = hash_blocks_python(tokens, block_size, seed, parent)
    if not extras:
        return local, seqs
    local = list(local)
    for index, keys in extras.items():
        if keys and 0 <= index < len(local):
            start = index * block_size
            data = _token_bytes(tokens[start : start + block_size], block_size)
            local[index] = LocalHash(_xxh3(data + struct.pack(f"<{len(keys)}Q", *keys), seed))
    return local, extend_sequence_hashes(parent, local)


def sequence_hashes_of(
    tokens: Sequence[int],
    block_size: int,
    seed: int = DYNAMO_HASH_SEED,
    parent: SequenceHash | None = None,
    extras: BlockExtras | None = None,
) -> list[SequenceHash]:
    """Only the sequence hashes: what routing needs, without the cost of the local ones."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if extras:
        return hash_blocks(tokens, block_size, seed, parent, extras)[1]
    if _native_hash_blocks is not None:
        return _native_hash_blocks(tokens, block_size, seed, parent, False)[1]
    return hash_blocks_python(tokens, block_size, seed, parent)[1]


def block_hashes(
    tokens: Sequence[int],
    block_size: int,
    lora_name: str | None = None,
    cache_salt: str | None = None,
) -> tuple[list[LocalHash], list[SequenceHash]]:
    """Dynamo-compatible local and sequence hashes of every full block of ``tokens``, the first
    one salted with ``cache_salt`` as the engine salts it."""
    return hash_blocks(tokens, block_size, lora_seed(lora_name), extras=salt_extras(cache_salt))
