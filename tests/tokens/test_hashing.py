"""Block hashing against independent oracles.

Local hashes are checked against `ai-dynamo-runtime`'s own `compute_block_hash_for_seq` (the
reference router's function, not ours); sequence hashes against the formula of the reference notes,
computed here with xxhash + struct. The native extension is held to the pure-Python specification.
"""

from __future__ import annotations

import random
import struct
from array import array
from collections.abc import Callable, Sequence

import pytest
import xxhash
from dynamo.llm import compute_block_hash_for_seq
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.tokens import hashing
from kvgate.tokens.hashing import (
    DYNAMO_HASH_SEED,
    LocalHash,
    SequenceHash,
    block_hashes,
    cache_salt_key,
    event_extra_keys,
    extend_sequence_hashes,
    hash_blocks,
    hash_blocks_python,
    local_block_hashes,
    lora_seed,
    sequence_hashes,
    sequence_hashes_of,
)

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
BLOCK_SIZES = [16, 32, 64, 128, 256, 1024, 8192]
GOLDEN_LOCAL = [15310707395893867146, 15292316782987903195]

HashFn = Callable[
    [Sequence[int], int, int, SequenceHash | None], tuple[list[LocalHash], list[SequenceHash]]
]
# Both implementations behind one signature; `hash_blocks` is the native one when it was built.
IMPLEMENTATIONS: dict[str, HashFn] = {
    "hash_blocks": hash_blocks,
    "hash_blocks_python": hash_blocks_python,
}


def ref_sequence(local: Sequence[int], parent: int | None = None) -> list[int]:
    """seq[0] = local[0]; seq[i] = xxh3_64(LE_u64(seq[i-1]) ‖ LE_u64(local[i]), seed=1337)."""
    out: list[int] = []
    prev = parent
    for h in local:
        if prev is None:
            prev = h
        else:
            prev = xxhash.xxh3_64_intdigest(struct.pack("<QQ", prev, h), seed=1337)
        out.append(prev)
    return out


def ref_local(tokens: Sequence[int], block_size: int, seed: int) -> list[int]:
    return [
        xxhash.xxh3_64_intdigest(
            struct.pack(f"<{block_size}I", *tokens[i : i + block_size]), seed=seed
        )
        for i in range(0, len(tokens) // block_size * block_size, block_size)
    ]


def random_tokens(n: int, seed: int, vocab: int = U32_MAX + 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def _length_cases() -> list[pytest.param]:
    cases = []
    for bs in BLOCK_SIZES:
        lengths = {
            "empty": 0,
            "one-token": 1,
            "partial-block": bs - 1,
            "one-block": bs,
            "one-block-plus-1": bs + 1,
            "three-blocks": 3 * bs,
            "three-blocks-plus-1": 3 * bs + 1,
        }
        if bs <= 64:
            # Past the Python path's 64-block chunks: one chunk, one more block, a ragged end.
            lengths |= {"64-blocks": 64 * bs, "65-blocks": 65 * bs, "long-ragged": 200 * bs + 7}
        cases += [pytest.param(bs, n, id=f"bs{bs}-{name}") for name, n in lengths.items()]
    return cases


# ---------------------------------------------------------------------------------------------
# Local hashes against ai-dynamo-runtime


def test_golden_vector_matches_reference_and_ours() -> None:
    tokens = list(range(32))
    assert compute_block_hash_for_seq(tokens, 16) == GOLDEN_LOCAL
    local, seq = block_hashes(tokens, 16)
    assert local == GOLDEN_LOCAL
    assert seq == ref_sequence(GOLDEN_LOCAL)
    assert seq[0] == GOLDEN_LOCAL[0]
    assert seq[1] != GOLDEN_LOCAL[1]


@pytest.mark.parametrize(("block_size", "length"), _length_cases())
def test_local_hashes_match_dynamo_across_lengths(block_size: int, length: int) -> None:
    tokens = random_tokens(length, seed=length * 31 + block_size)
    local, seq = block_hashes(tokens, block_size)
    assert local == compute_block_hash_for_seq(tokens, block_size)
    assert len(local) == length // block_size
    assert seq == ref_sequence(local)
    assert local_block_hashes(tokens, block_size) == local


@pytest.mark.parametrize(
    "lora_name",
    ["adapter-a", "sql-lora", "ünïcode-lora-名前", "x" * 300, ""],
    ids=["ascii", "hyphenated", "unicode", "long-name", "empty-means-base"],
)
def test_lora_local_hashes_match_dynamo(lora_name: str) -> None:
    tokens = random_tokens(5 * 16 + 3, seed=7)
    local, seq = block_hashes(tokens, 16, lora_name)
    assert local == compute_block_hash_for_seq(tokens, 16, lora_name=lora_name)
    assert seq == ref_sequence(local)


def test_lora_changes_every_hash_and_seed_wraps_u64() -> None:
    tokens = random_tokens(64, seed=1)
    base, _ = block_hashes(tokens, 16)
    lora, _ = block_hashes(tokens, 16, "adapter")
    assert not set(base) & set(lora)
    expected_seed = (1337 + xxhash.xxh3_64_intdigest(b"adapter")) % (1 << 64)
    assert lora_seed("adapter") == expected_seed
    assert lora_seed(None) == lora_seed("") == DYNAMO_HASH_SEED == 1337


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(
    block_size=st.sampled_from(BLOCK_SIZES),
    blocks=st.integers(0, 5),
    extra=st.integers(0, 20),
    token_seed=st.integers(0, 2**32),
    vocab=st.sampled_from([2, 151_936, U32_MAX + 1]),
    lora_name=st.none() | st.text(min_size=1, max_size=12),
)
def test_local_hashes_match_dynamo_property(
    *, block_size: int, blocks: int, extra: int, token_seed: int, vocab: int, lora_name: str | None
) -> None:
    tokens = random_tokens(blocks * block_size + min(extra, block_size - 1), token_seed, vocab)
    local, seq = block_hashes(tokens, block_size, lora_name)
    assert local == compute_block_hash_for_seq(tokens, block_size, lora_name=lora_name)
    assert seq == ref_sequence(local)


@settings(max_examples=80, deadline=None)
@given(
    tokens=st.lists(st.integers(0, U32_MAX), max_size=100),
    block_size=st.sampled_from([16, 32]),
)
def test_hand_drawn_tokens_match_dynamo(tokens: list[int], block_size: int) -> None:
    local, _ = block_hashes(tokens, block_size)
    assert local == compute_block_hash_for_seq(tokens, block_size)


def test_u32_edge_token_ids_match_dynamo() -> None:
    tokens = [0, U32_MAX, 1 << 31, (1 << 31) - 1] * 8
    assert block_hashes(tokens, 16)[0] == compute_block_hash_for_seq(tokens, 16)


def test_only_full_blocks_are_hashed() -> None:
    tokens = random_tokens(48, seed=3)
    full = block_hashes(tokens, 16)
    for tail in ([], [1], [7] * 15):
        assert block_hashes(tokens + tail, 16) == full


# ---------------------------------------------------------------------------------------------
# Sequence hashes and chaining


@pytest.mark.parametrize("parent", [None, 0, 12345, U64_MAX], ids=["none", "zero", "mid", "u64max"])
def test_sequence_hashes_follow_reference_formula(parent: int | None) -> None:
    local = [LocalHash(h) for h in ref_local(random_tokens(6 * 16, seed=11), 16, 1337)]
    seq = extend_sequence_hashes(None if parent is None else SequenceHash(parent), local)
    assert seq == ref_sequence(local, parent)
    if parent is None:
        assert seq == sequence_hashes(local)


def test_sequence_hashes_of_nothing() -> None:
    assert sequence_hashes([]) == []
    assert extend_sequence_hashes(SequenceHash(5), []) == []
    assert hash_blocks([], 16) == ([], [])
    assert hash_blocks([1, 2], 16, parent=SequenceHash(9)) == ([], [])


@pytest.mark.parametrize(
    ("block_size", "blocks", "split"),
    [
        pytest.param(16, 8, 0, id="split-before-first-block"),
        pytest.param(16, 8, 1, id="split-after-first-block"),
        pytest.param(16, 8, 5, id="split-mid"),
        pytest.param(16, 8, 8, id="split-at-end"),
        pytest.param(64, 130, 65, id="split-across-python-chunks"),
        pytest.param(8192, 3, 2, id="largest-block-size"),
    ],
)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_hashing_continues_a_chain_exactly(
    impl: str, block_size: int, blocks: int, split: int
) -> None:
    fn = IMPLEMENTATIONS[impl]
    tokens = random_tokens(blocks * block_size + 3, seed=blocks * split)
    whole_local, whole_seq = fn(tokens, block_size, 1337, None)
    head_local, head_seq = fn(tokens[: split * block_size], block_size, 1337, None)
    parent = head_seq[-1] if head_seq else None
    tail_local, tail_seq = fn(tokens[split * block_size :], block_size, 1337, parent)
    assert head_local + tail_local == whole_local
    assert head_seq + tail_seq == whole_seq
    assert extend_sequence_hashes(parent, tail_local) == tail_seq


# ---------------------------------------------------------------------------------------------
# Extra keys (cache_salt, multimodal items): appended to the block's bytes


def test_extra_keys_change_their_block_and_every_later_prefix() -> None:
    tokens = random_tokens(4 * 16, seed=11)
    plain_local, plain_seq = hash_blocks(tokens, 16)
    salt = cache_salt_key("tenant-a")
    local, seq = hash_blocks(tokens, 16, extras={0: (salt,)})
    packed = struct.pack("<16I", *tokens[:16]) + struct.pack("<Q", salt)
    assert local[0] == xxhash.xxh3_64_intdigest(packed, seed=DYNAMO_HASH_SEED)
    assert local[1:] == plain_local[1:]
    assert seq == ref_sequence(local)
    assert all(a != b for a, b in zip(seq, plain_seq, strict=True))
    assert sequence_hashes_of(tokens, 16, extras={0: (salt,)}) == seq
    # A block past the end, or an empty key list, changes nothing.
    assert hash_blocks(tokens, 16, extras={4: (salt,), 1: ()}) == (plain_local, plain_seq)
    assert block_hashes(tokens, 16, cache_salt="tenant-a") == (local, seq)
    assert block_hashes(tokens, 16, cache_salt="tenant-b")[1][0] != seq[0]


def test_event_extra_keys_read_vllms_untagged_form() -> None:
    assert event_extra_keys(None, None) == ()
    # A LoRA block's keys start with the adapter's name, which the hash seed already covers.
    assert event_extra_keys(["adapter", "salt"], "adapter") == (cache_salt_key("salt"),)
    assert event_extra_keys(["adapter"], "adapter") == ()
    assert event_extra_keys(["salt"], None) == (cache_salt_key("salt"),)
    image, shifted = (
        event_extra_keys([["img-hash", 0]], None),
        event_extra_keys([["img-hash", 3]], None),
    )
    assert len(image) == 1 and image != shifted
    # Any other shape still keys the block: never a predicted hit the engine would not have.
    assert len(event_extra_keys([b"digest", {"odd": 1}], None)) == 2
    assert event_extra_keys(["x"], None) != event_extra_keys([["x", 0]], None)


# ---------------------------------------------------------------------------------------------
# Native extension == Python specification


def test_native_extension_is_built() -> None:
    # The whole point of the property tests below; skipping them silently would hide a broken build.
    assert hashing.NATIVE_HASHING


@settings(max_examples=150, deadline=None)
@given(
    block_size=st.sampled_from([1, 2, 16, 32, 64, 128, 256, 1024, 8192]),
    blocks=st.integers(0, 70),
    extra=st.integers(0, 8191),
    token_seed=st.integers(0, 2**32),
    seed=st.integers(0, U64_MAX),
    parent=st.none() | st.integers(0, U64_MAX),
)
def test_native_equals_python(
    *, block_size: int, blocks: int, extra: int, token_seed: int, seed: int, parent: int | None
) -> None:
    blocks = min(blocks, 4) if block_size >= 1024 else blocks
    tokens = random_tokens(blocks * block_size + extra % block_size, token_seed)
    p = None if parent is None else SequenceHash(parent)
    native = hash_blocks(tokens, block_size, seed, p)
    python = hash_blocks_python(tokens, block_size, seed, p)
    assert native == python
    assert native[0] == ref_local(tokens, block_size, seed)
    assert native[1] == ref_sequence(native[0], parent)


def _numpy_int64(tokens: list[int]) -> Sequence[int]:
    np = pytest.importorskip("numpy")
    return np.asarray(tokens, dtype=np.int64)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "convert",
    [tuple, lambda t: array("I", t), lambda t: array("q", t), _numpy_int64],
    ids=["tuple", "array-u32", "array-i64", "numpy-int64"],
)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_any_int_sequence_hashes_like_a_list(
    impl: str, convert: Callable[[list[int]], Sequence[int]]
) -> None:
    fn = IMPLEMENTATIONS[impl]
    tokens = random_tokens(3 * 16 + 5, seed=5, vocab=151_936)
    assert fn(convert(tokens), 16, 1337, None) == fn(tokens, 16, 1337, None)
    assert fn(convert(tokens), 16, 1337, None)[0] == compute_block_hash_for_seq(tokens, 16)


def test_range_input_hashes_like_a_list() -> None:
    assert hash_blocks(range(32), 16)[0] == GOLDEN_LOCAL
    assert hash_blocks_python(range(32), 16, 1337, None)[0] == GOLDEN_LOCAL


# ---------------------------------------------------------------------------------------------
# Invalid input


@pytest.mark.parametrize(
    ("bad", "position"),
    [
        pytest.param(-1, 0, id="negative-first"),
        pytest.param(1 << 32, 0, id="u32max-plus-1-first"),
        pytest.param(1 << 32, 9, id="u32max-plus-1-mid-block"),
        pytest.param(1 << 64, 31, id="huge-last-of-full-blocks"),
        pytest.param(-(1 << 70), 17, id="huge-negative-second-block"),
    ],
)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_token_ids_outside_u32_raise_value_error(impl: str, bad: int, position: int) -> None:
    tokens = list(range(32))
    tokens[position] = bad
    with pytest.raises(ValueError, match=f"token id at position {position} is not a u32"):
        IMPLEMENTATIONS[impl](tokens, 16, 1337, None)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_non_integer_tokens_raise_type_error(impl: str) -> None:
    with pytest.raises(TypeError):
        IMPLEMENTATIONS[impl]([1.5] * 16, 16, 1337, None)


@pytest.mark.parametrize("block_size", [0, -16], ids=["zero", "negative"])
def test_non_positive_block_size_raises(block_size: int) -> None:
    with pytest.raises(ValueError, match="block_size"):
        hash_blocks(list(range(32)), block_size)
