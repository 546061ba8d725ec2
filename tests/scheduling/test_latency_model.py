"""The latency model against simulated engines whose true costs are known: the prior reproduces
the engine it was fitted to, and calibration converges on engines it was not."""

from __future__ import annotations

import random

import pytest

from kvgate.scheduling.latency_model import CalibrationSettings, EngineCost, LatencyModel
from kvgate.scheduling.request import LatencyPrediction
from kvgate.sim.engine import Engine, EngineConfig, SimRequest
from kvgate.sim.timing import LinearTiming, PolynomialTiming, StepTiming

BLOCK = 16


def engine(timing: StepTiming) -> Engine:
    return Engine(EngineConfig(block_size=BLOCK, num_gpu_blocks=8192), timing=timing)


def served_ttft(eng: Engine, prompts: list[int], output: int = 4) -> list[float]:
    """Submit prompts of these lengths at t=0 (distinct content, nothing cached) and return each
    one's time to first token as the engine computes it."""
    base = random.Random(len(prompts)).randrange(1 << 20)
    requests = [
        SimRequest(f"r{i}", [base + i * 100_003 + j for j in range(n)], output, ignore_eos=True)
        for i, n in enumerate(prompts)
    ]
    for r in requests:
        eng.add_request(r, 0.0)
    now = 0.0
    while eng.has_work:
        now = eng.step(now).end
    return [r.first_token_time or 0.0 for r in requests]


def predict(model: LatencyModel, uncached: int, pending: int = 0) -> LatencyPrediction:
    return model.predict(
        "w",
        uncached_tokens=uncached,
        pending_prefill_tokens=pending,
        decoding=0,
        decode_usage=0.0,
        usage_after=0.0,
        expected_output_tokens=16,
    )


@pytest.mark.parametrize("tokens", [17, 900, 8192, 8193, 20_000])
def test_the_prior_is_the_mocker_engines_cost_on_an_idle_worker(tokens: int) -> None:
    (observed,) = served_ttft(engine(PolynomialTiming()), [tokens])
    assert predict(LatencyModel(), tokens).ttft_s == pytest.approx(observed, rel=1e-9)


def test_queued_prefill_work_is_waited_for() -> None:
    ahead, own = 12_000, 3_000
    _, observed = served_ttft(engine(PolynomialTiming()), [ahead, own])
    prediction = predict(LatencyModel(), own, pending=ahead).ttft_s
    # The engine chunks the two prompts together (8,192 tokens, then the rest of the first with
    # all of the second): the same arithmetic.
    assert prediction == pytest.approx(observed, rel=1e-9)
    assert prediction > 2 * predict(LatencyModel(), own).ttft_s


@pytest.mark.parametrize(
    "timing",
    [PolynomialTiming(speedup=0.4), LinearTiming(), PolynomialTiming(speedup=3.0)],
    ids=["2.5x-slower", "linear-cost-shape", "3x-faster"],
)
def test_calibration_converges_on_an_engine_of_another_speed_or_shape(timing: StepTiming) -> None:
    rng = random.Random(5)
    model = LatencyModel()
    sizes = [rng.randrange(64, 24_000) for _ in range(150)]
    truth = [served_ttft(engine(timing), [n])[0] for n in sizes]

    def error(pairs: list[tuple[int, float]]) -> float:
        errors = sorted(abs(predict(model, n).ttft_s - t) / t for n, t in pairs)
        return errors[len(errors) // 2]

    held_out = list(zip(sizes[100:], truth[100:], strict=True))
    before = error(held_out)
    for n, t in zip(sizes[:100], truth[:100], strict=True):
        model.observe_ttft("w", predict(model, n), t)
    after = error(held_out)
    assert before > 0.4, "the engine really differs from the prior"
    assert after < 0.1, f"median relative error {after:.2f} after 100 observations"


def test_one_wild_observation_moves_the_model_only_a_little() -> None:
    model = LatencyModel()
    settled = predict(model, 4000)
    for _ in range(30):
        model.observe_ttft("w", settled, settled.ttft_s)  # the prior is exactly right
    model.observe_ttft("w", settled, settled.ttft_s * 100)  # one request stalled
    assert predict(model, 4000).ttft_s < settled.ttft_s * 1.5


def test_a_new_worker_starts_from_the_pool_average() -> None:
    model = LatencyModel()
    for worker in ("a", "b"):
        for _ in range(50):
            p = model.predict(
                worker,
                uncached_tokens=5000,
                pending_prefill_tokens=0,
                decoding=0,
                decode_usage=0.0,
                usage_after=0.0,
                expected_output_tokens=16,
            )
            model.observe_ttft(worker, p, p.ttft_s * 2)
    fresh = model.fit("c")
    assert fresh.ttft_ms(1.0, 1.0) == pytest.approx(
        (model.fit("a").ttft_ms(1.0, 1.0) + model.fit("b").ttft_ms(1.0, 1.0)) / 2
    )
    assert fresh.ttft_ms(1.0, 1.0) > 3.0, "it learned the pool is about twice slower"


def test_itl_calibration_follows_the_observed_cadence() -> None:
    model = LatencyModel(calibration=CalibrationSettings(itl_smoothing=0.2))
    target = 3 * EngineCost().decode_ms(0.0) / 1000
    for _ in range(60):
        model.observe_itl("w", predict(model, 100), target)
    assert predict(model, 100).itl_s == pytest.approx(target, rel=0.05)
