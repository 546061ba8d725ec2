"""The kv-aware-scorer through the real path: the shipped disaggregated config, the Qwen3
tokenizer, an index fed by a simulated engine's own KV events, the scheduler's hooks in the order
the EPP calls them. Nothing on the request is set by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvgate.epp_configs import DISAGGREGATED, DISAGGREGATED_KVGATE, shipped_config
from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.plugins.kv_aware_scorer import PREFILL_KEY_SUFFIX
from kvgate.scheduling.plugins.role_filter import ROLE_LABEL
from kvgate.scheduling.request import LLMRequest, ResponseInfo, SchedulingResult
from kvgate.sim.engine import Engine, EngineConfig, SimRequest
from kvgate.tokens import ModelTokenizer
from tests.scheduling.utils import ConfiguredScheduler

SYSTEM = "You are the disaggregation test assistant. " + " ".join(
    f"Rule {i}: keep answers short and cite line {i * 3}." for i in range(40)
)
DECODE = Endpoint("10.0.0.1:8000", labels={ROLE_LABEL: "decode"})
PREFILL = Endpoint("10.0.0.2:8000", labels={ROLE_LABEL: "prefill"})


def body(question: str, system: str = SYSTEM) -> dict[str, object]:
    return {
        "model": "m",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
    }


class Pd(ConfiguredScheduler):
    """The shipped disaggregated config."""

    def __init__(self, tokenizer: ModelTokenizer, threshold: int) -> None:
        super().__init__(
            shipped_config(DISAGGREGATED).replace(
                "- type: pd-profile-handler",
                f"- type: pd-profile-handler\n  parameters:\n    threshold: {threshold}",
            ),
            tokenizer,
        )

    def engine_caches(self, worker: Endpoint, question: str) -> int:
        """A simulated engine serves the prompt; its KV events reach the index. Returns the
        prompt's length in tokens."""
        tokens = self.tokenizer.tokenize_request(body(question), "chat")
        engine = Engine(EngineConfig(block_size=16, num_gpu_blocks=4096))
        engine.add_request(SimRequest("warm", tokens, max_tokens=1, ignore_eos=True), 0.0)
        now = 0.0
        while engine.has_work:
            step = engine.step(now)
            now = step.end
            for event in step.events:
                self.events.apply_event(worker.address, event)
        return len(tokens)

    async def route_question(
        self, question: str, request_id: str, system: str = SYSTEM
    ) -> tuple[LLMRequest, SchedulingResult]:
        return await self.route(request_id, body(question, system), [DECODE, PREFILL])


@pytest.fixture(scope="module")
def tokenizer(qwen3_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.load(str(qwen3_dir))


async def test_threshold_compares_the_part_the_decode_worker_does_not_cache(
    tokenizer: ModelTokenizer,
) -> None:
    pd = Pd(tokenizer, threshold=200)
    prompt_tokens = pd.engine_caches(DECODE, "What is rule 7?")
    assert prompt_tokens > 600, "the whole prompt is far above the threshold"

    cached, _ = await pd.route_question("What is rule 7? Answer briefly.", "cached")
    assert cached.overlaps is not None and cached.overlaps[DECODE.address] * 16 > 500
    assert cached.routing_headers["x-dynamo-routing-mode"] == "aggregated"

    other_system = SYSTEM.replace("disaggregation", "unrelated")
    cold, _ = await pd.route_question("What is rule 7? Answer briefly.", "cold", other_system)
    assert cold.routing_headers["x-dynamo-routing-mode"] == "disaggregated"


async def test_prefill_and_decode_workers_are_both_booked(tokenizer: ModelTokenizer) -> None:
    pd = Pd(tokenizer, threshold=0)
    request, result = await pd.route_question("A question nobody asked before, " * 20, "r1")
    assert request.routing_headers["x-dynamo-routing-mode"] == "disaggregated"
    assert request.tokens is not None
    prompt = len(request.tokens)
    active = pd.active

    assert active.prefill_tokens(PREFILL.address) == prompt
    assert active.prefill_tokens(DECODE.address) == 0, "decode receives the KV, computes none"
    assert active.in_flight(PREFILL.address) == active.in_flight(DECODE.address) == 1
    assert active.active_blocks(DECODE.address) == prompt // 16

    pd.scheduler.response_streaming(request, result, True)
    assert request.request_id + PREFILL_KEY_SUFFIX not in active, "prefill done: released"
    assert active.in_flight(PREFILL.address) == 0
    assert active.in_flight(DECODE.address) == 1

    pd.scheduler.response_complete(request, result, ResponseInfo(status=200))
    assert len(active) == 0


async def test_an_aborted_disaggregated_request_frees_both_bookings(
    tokenizer: ModelTokenizer,
) -> None:
    pd = Pd(tokenizer, threshold=0)
    request, result = await pd.route_question("Another fresh question, " * 20, "r2")
    pd.scheduler.response_complete(request, result, ResponseInfo(aborted=True))
    assert len(pd.active) == 0
    assert pd.active.prefill_tokens(PREFILL.address) == 0


class PredictedPd(Pd):
    """kvgate's disaggregated config: remote prefill when it is predicted to be faster."""

    def __init__(self, tokenizer: ModelTokenizer) -> None:
        ConfiguredScheduler.__init__(self, shipped_config(DISAGGREGATED_KVGATE), tokenizer)


async def test_predicted_pd_prefills_locally_when_nothing_is_gained_remotely(
    tokenizer: ModelTokenizer,
) -> None:
    pd = PredictedPd(tokenizer)
    request, result = await pd.route_question("A cold question on an idle fleet, " * 20, "idle")
    # Both idle: a remote prefill costs the same compute plus the KV transfer.
    assert request.routing_headers["x-dynamo-routing-mode"] == "aggregated"
    assert result.prefill_endpoint is None


async def test_predicted_pd_prefills_remotely_when_the_decode_worker_is_busy(
    tokenizer: ModelTokenizer,
) -> None:
    pd = PredictedPd(tokenizer)
    # A long request decided locally (both idle) queues its prompt on the decode worker.
    filler, _ = await pd.route_question("Filler: " + "long context words " * 600, "fill")
    assert filler.routing_headers["x-dynamo-routing-mode"] == "aggregated"
    assert pd.active.prefill_tokens(DECODE.address) > 2000
    request, result = await pd.route_question("A cold question behind the queue, " * 20, "busy")
    assert request.routing_headers["x-dynamo-routing-mode"] == "disaggregated"
    assert result.prefill_endpoint is PREFILL


async def test_predicted_pd_keeps_a_prefix_the_decode_worker_caches(
    tokenizer: ModelTokenizer,
) -> None:
    pd = PredictedPd(tokenizer)
    pd.engine_caches(DECODE, "What is rule 7?")
    request, _ = await pd.route_question("What is rule 7? Answer briefly.", "cached")
    assert request.overlaps is not None and request.overlaps[DECODE.address] > 30
    assert request.routing_headers["x-dynamo-routing-mode"] == "aggregated"
