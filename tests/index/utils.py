"""Builders for index and scheduling tests.

Sequence hashes here are computed independently of `kvgate.tokens.hashing` (straight from the
formula in the reference notes, with xxhash + struct), so the index tests do not trust the code
they feed. Engine block ids are opaque: derived with BLAKE2 from the content and a salt, so they are
unrelated to our hashes yet stable for the same content (as vLLM's are).
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Sequence

import xxhash

from kvgate.events.types import BlockStored, EngineHash

BS = 16


def tokens_of(seed: int, blocks: int, block_size: int = BS, vocab: int = 151_936) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(blocks * block_size)]


def ref_local(
    tokens: Sequence[int], block_size: int = BS, lora_name: str | None = None
) -> list[int]:
    seed = 1337
    if lora_name:
        seed = (1337 + xxhash.xxh3_64_intdigest(lora_name.encode())) % (1 << 64)
    return [
        xxhash.xxh3_64_intdigest(struct.pack(f"<{block_size}I", *tokens[i : i + block_size]), seed)
        for i in range(0, len(tokens) // block_size * block_size, block_size)
    ]


def ref_chain(parent: int | None, local: Sequence[int]) -> list[int]:
    """seq[0] = local[0] (or chained on ``parent``); seq[i] = xxh3(seq[i-1] ‖ local[i])."""
    out: list[int] = []
    prev = parent
    for h in local:
        prev = h if prev is None else xxhash.xxh3_64_intdigest(struct.pack("<QQ", prev, h), 1337)
        out.append(prev)
    return out


def ref_seq(tokens: Sequence[int], block_size: int = BS, lora_name: str | None = None) -> list[int]:
    return ref_chain(None, ref_local(tokens, block_size, lora_name))


def engine_id(seq_hash: int, salt: int = 0) -> EngineHash:
    digest = hashlib.blake2b(struct.pack("<QQ", seq_hash, salt), digest_size=8).digest()
    return EngineHash(int.from_bytes(digest, "little"))


def engine_ids(seqs: Sequence[int], salt: int = 0) -> list[EngineHash]:
    return [engine_id(s, salt) for s in seqs]


def stored(
    tokens: Sequence[int],
    first: int,
    last: int,
    *,
    salt: int = 0,
    block_size: int = BS,
    lora_name: str | None = None,
    with_parent: bool = True,
) -> BlockStored:
    """A BlockStored event for blocks ``first..last-1`` of ``tokens``, chained to block
    ``first-1`` (by its engine id) unless ``first`` is 0."""
    seqs = ref_seq(tokens, block_size, lora_name)
    ids = engine_ids(seqs, salt)
    return BlockStored(
        block_hashes=ids[first:last],
        parent_block_hash=ids[first - 1] if first and with_parent else None,
        token_ids=list(tokens[first * block_size : last * block_size]),
        block_size=block_size,
        lora_name=lora_name,
    )


def leading(held: set[int], seqs: Sequence[int]) -> int:
    """How many leading hashes of ``seqs`` are in ``held``."""
    n = 0
    for s in seqs:
        if s not in held:
            break
        n += 1
    return n
