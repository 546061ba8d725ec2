from __future__ import annotations

import random

import pytest

from kvgate.scheduling.framework import SchedulerProfile
from kvgate.scheduling.plugins.disagg_profile_handler import (
    PREFILLER_HEADER,
    ROUTING_MODE_HEADER,
    PdProfileHandler,
    PdProfileHandlerParams,
    uncached_tokens,
)
from kvgate.scheduling.plugins.max_score_picker import MaxScorePicker
from kvgate.scheduling.plugins.role_filter import ROLE_LABEL, DecodeFilter, PrefillFilter
from kvgate.scheduling.plugins.single_profile_handler import SingleProfileHandler
from kvgate.scheduling.request import LLMRequest, SchedulingError
from kvgate.scheduling.scheduler import Scheduler
from tests.scheduling.utils import chat, endpoint, request

DECODE = endpoint("10.0.0.1:8000", labels={ROLE_LABEL: "decode"})
PREFILL = endpoint("10.0.0.2:8000", labels={ROLE_LABEL: "prefill"})


def picker(name: str) -> MaxScorePicker:
    return MaxScorePicker(name, rng=random.Random(0))


def pd_scheduler(
    *, threshold: int = 0, with_prefill: bool = True, prefiller_header: str = "instance-id"
) -> Scheduler:
    profiles = {"decode": SchedulerProfile("decode", [DecodeFilter("df")], [], picker("dp"))}
    if with_prefill:
        profiles["prefill"] = SchedulerProfile("prefill", [PrefillFilter("pf")], [], picker("pp"))
    params = PdProfileHandlerParams(threshold=threshold, prefiller_header=prefiller_header)  # type: ignore[arg-type]
    handler = PdProfileHandler("pd", params)
    return Scheduler(handler, profiles, [])


def test_single_profile_handler_runs_the_one_profile() -> None:
    profile = SchedulerProfile("only", picker=picker("p"))
    result = Scheduler(SingleProfileHandler("s"), {"only": profile}, []).schedule(
        request(), [DECODE]
    )
    assert result.primary_profile == "only"
    assert result.endpoint is DECODE


@pytest.mark.parametrize("names", [[], ["a", "b"]], ids=["no-profile", "two-profiles"])
def test_single_profile_handler_refuses_other_than_one_profile(names: list[str]) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        SingleProfileHandler("s").validate_profiles(names)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        pytest.param(["prefill"], "named 'decode'", id="decode-missing"),
        pytest.param(["decode", "warmup"], "warmup would never run", id="stray-profile"),
    ],
)
def test_pd_handler_profile_checks(names: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PdProfileHandler("pd").validate_profiles(names)


def test_pd_handler_accepts_decode_alone_or_with_prefill() -> None:
    PdProfileHandler("pd").validate_profiles(["decode"])
    PdProfileHandler("pd").validate_profiles(["decode", "prefill"])


@pytest.mark.parametrize(
    ("prefiller_header", "expected"),
    [
        pytest.param("instance-id", str(PREFILL.worker_instance_id()), id="dynamo-instance-id"),
        pytest.param("address", PREFILL.address, id="llm-d-address"),
    ],
)
def test_disaggregated_when_a_prefill_worker_is_chosen(
    prefiller_header: str, expected: str
) -> None:
    req = chat("hello")
    result = pd_scheduler(prefiller_header=prefiller_header).schedule(req, [DECODE, PREFILL])
    assert result.primary_profile == "decode"
    assert result.endpoint is DECODE
    assert result.profiles["prefill"].endpoints == [PREFILL]
    assert result.prefill_endpoint is PREFILL
    assert req.routing_headers == {
        ROUTING_MODE_HEADER: "disaggregated",
        PREFILLER_HEADER: expected,
    }


def test_aggregated_without_a_prefill_profile() -> None:
    req = chat("hello")
    result = pd_scheduler(with_prefill=False).schedule(req, [DECODE, PREFILL])
    assert list(result.profiles) == ["decode"]
    assert result.prefill_endpoint is None
    assert req.routing_headers == {ROUTING_MODE_HEADER: "aggregated"}


def test_aggregated_when_no_prefill_worker_is_left() -> None:
    req = chat("hello")
    result = pd_scheduler().schedule(req, [DECODE])
    assert list(result.profiles) == ["decode"]
    assert req.routing_headers == {ROUTING_MODE_HEADER: "aggregated"}


def test_aggregated_when_prefill_lands_on_the_decode_worker() -> None:
    both = endpoint("10.0.0.3:8000")
    req = chat("hello")
    result = pd_scheduler().schedule(req, [both])
    assert list(result.profiles) == ["decode"]
    assert req.routing_headers[ROUTING_MODE_HEADER] == "aggregated"


def test_no_decode_worker_is_refused() -> None:
    with pytest.raises(SchedulingError) as err:
        pd_scheduler().schedule(chat("hello"), [PREFILL])
    assert err.value.status == 429
    assert "'decode'" in str(err.value)


def tokenized(tokens: int, decode_overlap_blocks: int | None = None) -> LLMRequest:
    """A request as the prepare phase leaves it (the KV scorer's products)."""
    req = chat("ignored")
    req.tokens = list(range(tokens))
    req.block_size = 16
    if decode_overlap_blocks is not None:
        req.overlaps = {DECODE.address: decode_overlap_blocks, PREFILL.address: 0}
    return req


@pytest.mark.parametrize(
    ("req", "expected"),
    [
        pytest.param(tokenized(100), 100, id="tokens-without-overlap"),
        pytest.param(tokenized(100, 4), 36, id="overlap-blocks-are-cached"),
        pytest.param(tokenized(32, 9), 0, id="never-negative"),
        pytest.param(chat("x" * 400), 100, id="chat-characters-over-four"),
        pytest.param(
            request(
                {"messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 80}]}]}
            ),
            20,
            id="content-parts",
        ),
        pytest.param(request({"prompt": "p" * 41}, kind="completions"), 10, id="prompt"),
        pytest.param(request({"messages": "junk"}), 0, id="unreadable-body"),
    ],
)
def test_uncached_token_estimate(req: LLMRequest, expected: int) -> None:
    assert uncached_tokens(req, DECODE) == expected


@pytest.mark.parametrize(
    ("req", "mode"),
    [
        pytest.param(tokenized(200, 2), "disaggregated", id="large-uncached-suffix"),
        pytest.param(tokenized(200, 10), "aggregated", id="mostly-cached"),
        pytest.param(chat("x" * 40), "aggregated", id="short-prompt-by-characters"),
    ],
)
def test_threshold_decides_on_the_uncached_part(req: LLMRequest, mode: str) -> None:
    pd_scheduler(threshold=100).schedule(req, [DECODE, PREFILL])
    assert req.routing_headers[ROUTING_MODE_HEADER] == mode
