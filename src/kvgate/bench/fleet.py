"""The shape of a simulated fleet: how fast each worker is and how much KV cache it has.

The default fleet is homogeneous (`kvgate simulate --workers N`); ``--fleet "4x1.0,4x0.4:16000"``
describes a heterogeneous one, group by group.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One simulated worker: a speed factor (step times are divided by it) and its KV blocks
    (None: the fleet's default)."""

    speed: float = 1.0
    num_gpu_blocks: int | None = None

    def __post_init__(self) -> None:
        if not self.speed > 0:
            raise ValueError(f"a worker's speed must be > 0, got {self.speed}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise ValueError(f"a worker needs >= 1 KV block, got {self.num_gpu_blocks}")


def parse_fleet(text: str) -> tuple[WorkerSpec, ...]:
    """``"4x1.0,4x0.5:16000"``: groups of COUNT x SPEED[:KV_BLOCKS], comma-separated."""
    specs: list[WorkerSpec] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        count_text, sep, rest = part.partition("x")
        speed_text, _, blocks_text = rest.partition(":")
        try:
            if not sep:
                raise ValueError
            count = int(count_text)
            spec = WorkerSpec(float(speed_text), int(blocks_text) if blocks_text else None)
        except ValueError as err:
            detail = f": {err}" if str(err) else ""
            raise ValueError(
                f"fleet group {part!r} is not COUNTxSPEED[:KV_BLOCKS]{detail}"
            ) from None
        if count < 1:
            raise ValueError(f"fleet group {part!r} has no workers")
        specs += [spec] * count
    if not specs:
        raise ValueError("the fleet is empty")
    return tuple(specs)
