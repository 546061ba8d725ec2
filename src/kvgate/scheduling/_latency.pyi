from collections.abc import Callable, Mapping, Sequence
from typing import Any

def predict(
    endpoints: Sequence[Any],
    overlaps: object,
    active_overlaps: object,
    pending: object,
    prefilling: object,
    in_flight: object,
    active_blocks: object,
    context_blocks: object,
    fits: object,
    new_fit: Callable[[str], object],
    isl: int,
    block_size: int,
    default_kv_blocks: int,
    output_tokens: int,
    cost: tuple[float, float, float, float, float, float, float, int],
) -> tuple[list[str], list[float], bytes] | None: ...
def min_max_scores(addresses: list[str], costs: list[float]) -> dict[str, float] | None: ...
def top_scored(scored: list[Any]) -> list[int] | None: ...
def near_ties(costs: list[float], tolerance: float) -> list[int] | None: ...
def settle_near_ties(
    costs: list[float],
    tolerance: float,
    addresses: list[str],
    endpoints: list[Any],
    overlaps: Mapping[str, int],
    recent: Mapping[str, float],
    scale: float,
    blocks: int,
    default_capacity: int,
) -> list[float] | None: ...
