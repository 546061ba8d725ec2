from collections.abc import Callable, Sequence

def leading_runs(blocks: dict[int, int], hashes: Sequence[int]) -> list[tuple[int, int]]: ...
def count_in(
    counts: dict[int, int], masks: dict[int, int], hashes: Sequence[int], bit: int
) -> None: ...
def count_out(
    counts: dict[int, int],
    masks: dict[int, int],
    shared: dict[int, int],
    share: Callable[[int], int],
    hashes: Sequence[int],
    bit: int,
) -> None: ...
