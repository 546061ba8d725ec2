from collections.abc import Sequence
from typing import overload

from kvgate.tokens.hashing import LocalHash, SequenceHash

@overload
def hash_blocks(
    tokens: Sequence[int], block_size: int, seed: int, parent: int | None
) -> tuple[list[LocalHash], list[SequenceHash]]: ...
@overload
def hash_blocks(
    tokens: Sequence[int], block_size: int, seed: int, parent: int | None, with_local: bool
) -> tuple[list[LocalHash] | None, list[SequenceHash]]: ...
