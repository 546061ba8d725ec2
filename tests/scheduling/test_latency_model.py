"""The latency model against simulated engines whose true costs are known: the prior reproduces
the engine it was fitted to, and calibration converges on engines it was not."""

from __future__ import annotations

import random

import pytest

from kvgate.fleet.endpoint import Endpoint, EndpointMetrics
from kvgate.scheduling.active import ActiveSequences
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


def _replay(eng: Engine, arrivals: list[tuple[float, SimRequest]], until: float) -> float:
    """Step ``eng`` through ``arrivals`` (time, request) and stop at the first step boundary at
    or after ``until``; returns that time."""
    now, pending = 0.0, sorted(arrivals, key=lambda a: a[0])
    while now < until:
        while pending and pending[0][0] <= now:
            eng.add_request(pending.pop(0)[1], now)
        now = eng.step(now).end if eng.has_work else pending[0][0] if pending else until
    return now


def _prompt(seed: int, tokens: int) -> list[int]:
    return [seed * 1_000_003 + j for j in range(tokens)]


def test_a_request_that_does_not_fit_in_the_cache_waits_for_running_ones() -> None:
    # The long-prompt benchmark's shape: 1,024 blocks, prompts of 272 blocks, 32 output tokens.
    # Three run, staggered; a fourth would take the cache past its size, so it is admitted only
    # once the first of them ends.
    prompt, output = 4352, 32
    config = EngineConfig(block_size=BLOCK, num_gpu_blocks=1024, max_model_len=8192)
    eng = Engine(config, timing=PolynomialTiming())
    running = [SimRequest(f"r{i}", _prompt(i, prompt), output, ignore_eos=True) for i in range(3)]
    arrivals = [(0.35 * i, r) for i, r in enumerate(running)]
    now = _replay(eng, arrivals, until=0.8)
    assert all(r.first_token_time is not None and r.finish_time is None for r in running)

    active = ActiveSequences(BLOCK)
    for r in running:
        hashes = [hash((r.request_id, b)) for b in range(prompt // BLOCK)]
        active.add(r.request_id, "w", hashes, prompt, 0.0)
        active.mark_prefill_complete(r.request_id)
    newcomer = SimRequest("new", _prompt(9, prompt), output, ignore_eos=True)
    new_hashes = [hash(("new", b)) for b in range(prompt // BLOCK)]

    def predicted(num_gpu_blocks: int, held: int = 0) -> float:
        ep = Endpoint("w", metrics=EndpointMetrics(num_gpu_blocks=num_gpu_blocks))
        made = LatencyModel().predict_endpoints(
            [ep],
            isl=prompt,
            block_size=BLOCK,
            overlaps={},
            load=active.tables(),
            default_kv_blocks=37_500,
            expected_output_tokens=output,
            active_overlaps={"w": held} if held else active.active_overlaps(new_hashes),
        )
        return made["w"].ttft_s

    eng.add_request(newcomer, now)
    while newcomer.first_token_time is None:
        now = eng.step(now).end
    observed = newcomer.first_token_time - newcomer.arrival_time
    # With a cache of the default size it would fit at once: the prefill terms alone.
    assert predicted(37_500) < 0.4 * observed
    # The gateway does not know how far each running request is; the model takes them spread
    # evenly (here the first ends 8 decode steps later: 0.28 s observed, 0.40 s predicted).
    assert 0.5 * observed < predicted(1024) < 2 * observed
    # Blocks the running requests already hold need no room: a request sharing their prefix fits.
    assert predicted(1024, held=prompt // BLOCK - 1) < 0.6 * observed


def test_waiting_requests_count_against_what_was_booked_when_the_metrics_were_read() -> None:
    # Three requests routed here were waiting in the engine when it was scraped; all three have
    # started streaming since. The scrape still says 3 waiting: that is not another router's work.
    prompt = 4096
    active = ActiveSequences(BLOCK)
    for i in range(3):
        active.add(f"r{i}", "w", [hash(("r", i, b)) for b in range(prompt // BLOCK)], prompt, 0.0)
        active.mark_prefill_complete(f"r{i}")

    def predicted(metrics: EndpointMetrics) -> float:
        made = LatencyModel().predict_endpoints(
            [Endpoint("w", metrics=metrics)],
            isl=prompt,
            block_size=BLOCK,
            overlaps={},
            load=active.tables(),
            default_kv_blocks=37_500,
            expected_output_tokens=8,
        )
        return made["w"].ttft_s

    alone = predicted(EndpointMetrics(waiting=0, stale=False))
    booked_then = EndpointMetrics(waiting=3, stale=False, booked_prefilling=3)
    assert predicted(booked_then) == alone
    # Without the count at the scrape, the stale 3 look like three more prompts queued there.
    unknown = EndpointMetrics(waiting=3, stale=False)
    assert predicted(unknown) > 3 * alone
    # Waiting beyond what was booked then is counted: another router's request.
    assert predicted(EndpointMetrics(waiting=4, stale=False, booked_prefilling=3)) > 1.8 * alone


def test_decode_cost_counts_each_requests_context_even_where_they_share_blocks() -> None:
    # Three copies of one prompt decode on the worker: the cache holds their blocks once, but each
    # decode step reads all three contexts (the engine, GPU attention and Dynamo's mocker alike).
    prompt, copies = 4096, 3
    config = EngineConfig(block_size=BLOCK, num_gpu_blocks=1024, max_model_len=8192)
    eng = Engine(config, timing=PolynomialTiming())
    running = [SimRequest(f"c{i}", _prompt(1, prompt), 400, ignore_eos=True) for i in range(copies)]
    now = _replay(eng, [(0.0, r) for r in running], until=0.5)
    assert all(r.first_token_time is not None and r.finish_time is None for r in running)
    active = ActiveSequences(BLOCK)
    shared = [hash(("c", b)) for b in range(prompt // BLOCK)]
    for r in running:
        active.add(r.request_id, "w", shared, prompt, 0.0)
        active.mark_prefill_complete(r.request_id)
    assert (active.active_blocks("w"), active.context_blocks("w")) == (256, 768)

    newcomer = SimRequest("new", _prompt(2, 1024), 9, ignore_eos=True)
    eng.add_request(newcomer, now)
    while newcomer.finish_time is None:
        now = eng.step(now).end
    assert newcomer.first_token_time is not None
    observed_itl = (newcomer.finish_time - newcomer.first_token_time) / 8

    ep = Endpoint("w", metrics=EndpointMetrics(num_gpu_blocks=1024))
    made = LatencyModel().predict_endpoints(
        [ep],
        isl=1024,
        block_size=BLOCK,
        overlaps={},
        load=active.tables(),
        default_kv_blocks=37_500,
        expected_output_tokens=9,
    )
    assert made["w"].itl_s == pytest.approx(observed_itl, rel=0.03)
    # Counting the shared blocks once would predict a step a third shorter than the engine's.
    distinct_u = (256 + 64) / 1024
    assert EngineCost().decode_ms(distinct_u) / 1000 < 0.75 * observed_itl
