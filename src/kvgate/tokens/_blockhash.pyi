from collections.abc import Sequence

from kvgate.tokens.hashing import LocalHash, SequenceHash

def hash_blocks(
    tokens: Sequence[int], block_size: int, seed: int, parent: int | None
) -> tuple[list[LocalHash], list[SequenceHash]]: ...
