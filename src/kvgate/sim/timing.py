"""How long one engine step takes, given what the step computes.

A step is one forward pass over a batch: some requests prefill (chunks of their prompt that were
not served from the prefix cache), the others decode one token each. Two published fits are
provided; both divide their result by ``speedup`` so a fleet can run faster than real time while
keeping every ratio (cached vs cold TTFT, prefill vs decode) intact.

- `PolynomialTiming` (default): the Dynamo mocker's fit. Prefill cost grows with the uncached
  tokens of the step, decode cost with the KV-cache utilisation of the decoding requests (memory
  bandwidth bound); a step that does both lasts the sum.
- `LinearTiming`: step = β0 + β1·prefill tokens + β2·decode tokens (BLIS fits of vLLM on H100).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class BatchShape:
    """What a step computes, in the terms the timing models need."""

    prefill_tokens: int
    """Tokens computed for requests still in (or recomputing) their prompt: all uncached."""
    decode_tokens: int
    """Requests generating one token each."""
    decode_kv_usage: float
    """The decoding requests' contexts summed (a block several share, for each) over the pool's
    tokens, clamped to [0, 1]: what attention reads, and what Dynamo 1.6.1's mocker charges."""


class StepTiming(Protocol):
    def step_seconds(self, batch: BatchShape) -> float:
        """Duration of the step in seconds (already divided by the speedup)."""
        ...


def _check_speedup(speedup: float) -> None:
    if not speedup > 0:
        raise ValueError(f"speedup must be > 0, got {speedup}")


@dataclass(frozen=True, slots=True)
class PolynomialTiming:
    """prefill ms = a + b·T + c·T²; decode ms = max(floor, d + e·u + f·u²).

    Defaults are the Dynamo mocker's published coefficients; T is uncached prompt tokens in the
    step, u the decoding requests' summed context over the pool (`BatchShape`). A pure-prefill
    step pays no decode time.
    """

    prefill_ms: tuple[float, float, float] = (16.50142, 1.518344e-2, 4.209989e-7)
    decode_ms: tuple[float, float, float] = (5.74, 54.01, -25.74)
    decode_floor_ms: float = 1.0
    speedup: float = 1.0

    def __post_init__(self) -> None:
        _check_speedup(self.speedup)

    def step_seconds(self, batch: BatchShape) -> float:
        ms = 0.0
        if batch.prefill_tokens:
            a, b, c = self.prefill_ms
            t = batch.prefill_tokens
            ms += a + b * t + c * t * t
        if batch.decode_tokens:
            d, e, f = self.decode_ms
            u = batch.decode_kv_usage
            ms += max(self.decode_floor_ms, d + e * u + f * u * u)
        return ms / 1000.0 / self.speedup


@dataclass(frozen=True, slots=True)
class LinearTiming:
    """step µs = β0 + β1·prefill tokens + β2·decode tokens.

    Defaults are the Qwen2.5-3B (TP1) fit, the smallest model fitted; an empty step costs nothing.
    """

    beta0_us: float = 4796.0
    beta1_us: float = 9.45
    beta2_us: float = 35.63
    speedup: float = 1.0

    def __post_init__(self) -> None:
        _check_speedup(self.speedup)

    def step_seconds(self, batch: BatchShape) -> float:
        if not batch.prefill_tokens and not batch.decode_tokens:
            return 0.0
        us = (
            self.beta0_us
            + self.beta1_us * batch.prefill_tokens
            + self.beta2_us * batch.decode_tokens
        )
        return us / 1e6 / self.speedup
