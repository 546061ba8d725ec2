"""Step-time models against hand-computed values."""

from __future__ import annotations

import pytest

from kvgate.sim.timing import BatchShape, LinearTiming, PolynomialTiming


def shape(prefill: int = 0, decode: int = 0, usage: float = 0.0) -> BatchShape:
    return BatchShape(prefill_tokens=prefill, decode_tokens=decode, decode_kv_usage=usage)


@pytest.mark.parametrize(
    ("batch", "ms"),
    [
        (shape(prefill=1000), 16.50142 + 15.18344 + 0.4209989),
        (shape(decode=8, usage=0.5), 5.74 + 27.005 - 6.435),
        (shape(decode=1, usage=0.0), 5.74),
        (shape(prefill=1000, decode=8, usage=0.5), 32.1058589 + 26.31),
        (shape(), 0.0),
    ],
    ids=["prefill-only", "decode-only", "decode-empty-cache", "mixed-step-is-the-sum", "empty"],
)
def test_polynomial(batch: BatchShape, ms: float) -> None:
    assert PolynomialTiming().step_seconds(batch) == pytest.approx(ms / 1000)


def test_polynomial_decode_floor() -> None:
    # The fitted parabola goes below 1 ms only outside [0, 1]; the floor still applies.
    model = PolynomialTiming(decode_ms=(0.5, 0.0, 0.0))
    assert model.step_seconds(shape(decode=1)) == pytest.approx(0.001)


def test_cached_tokens_make_prefill_cheaper() -> None:
    model = PolynomialTiming()
    cold = model.step_seconds(shape(prefill=2000))
    warm = model.step_seconds(shape(prefill=16))
    assert cold - warm > 0.029


def test_linear() -> None:
    model = LinearTiming(beta0_us=7052, beta1_us=19.54, beta2_us=25.43)
    assert model.step_seconds(shape(prefill=512, decode=10)) == pytest.approx(
        (7052 + 19.54 * 512 + 25.43 * 10) / 1e6
    )
    assert model.step_seconds(shape()) == 0.0


@pytest.mark.parametrize("model", [PolynomialTiming, LinearTiming])
def test_speedup_divides_every_time(model: type[PolynomialTiming] | type[LinearTiming]) -> None:
    batch = shape(prefill=300, decode=4, usage=0.2)
    assert model(speedup=10).step_seconds(batch) == pytest.approx(model().step_seconds(batch) / 10)
    with pytest.raises(ValueError, match="speedup"):
        model(speedup=0)
