from __future__ import annotations

import json
import struct

import pytest
import xxhash

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.plugins.prefix_cache_scorer import (
    PrefixCacheScorer,
    PrefixCacheScorerParams,
    hash_prompt,
    prompt_bytes,
)
from kvgate.scheduling.request import LLMRequest, ProfileResult, SchedulingResult
from tests.scheduling.utils import chat, completion, endpoint

BLOCK = 64  # 16 tokens × 4 characters
A, B, C = endpoint("10.0.0.1:8000"), endpoint("10.0.0.2:8000"), endpoint("10.0.0.3:8000")


def reference_hashes(data: bytes, model: str, salt: str = "", block: int = BLOCK) -> list[int]:
    """The reference scorer's chain, written independently with xxhash's streaming API."""
    h = xxhash.xxh64()
    h.update(model.encode())
    h.update(salt.encode())
    prev = h.intdigest()
    out = []
    for start in range(0, len(data) // block * block, block):
        h.reset()
        h.update(data[start : start + block])
        h.update(struct.pack("<Q", prev))
        prev = h.intdigest()
        out.append(prev)
    return out


def scorer(**params: object) -> PrefixCacheScorer:
    return PrefixCacheScorer("prefix", PrefixCacheScorerParams(**params))  # type: ignore[arg-type]


def place(s: PrefixCacheScorer, req: LLMRequest, *chosen: Endpoint) -> None:
    """As the scheduler does: score, then tell the scorer where the request went."""
    s.score(req, [A, B, C])
    profiles = {f"p{i}": ProfileResult(f"p{i}", [ep]) for i, ep in enumerate(chosen)}
    s.pre_request(req, SchedulingResult("p0", profiles))


def text(blocks: int, fill: str = "x") -> str:
    return "".join(f"{i:04d}" + fill * (BLOCK - 4) for i in range(blocks))


def test_block_hashes_match_a_pinned_vector() -> None:
    hashes = hash_prompt(
        b"0123456789abcdef" * 8, block_chars=BLOCK, max_blocks=256, model="llama", cache_salt=None
    )
    assert [hex(h) for h in hashes] == ["0x6e59d8ec539f103b", "0xce91136ffc108e22"]


@pytest.mark.parametrize(
    ("prompt", "salt"),
    [
        pytest.param("q" * 200, None, id="partial-last-block-dropped"),
        pytest.param("é" * 100, None, id="utf8-bytes-not-characters"),
        pytest.param("z" * 64 * 3, "tenant-a", id="cache-salt-seeds-the-chain"),
        pytest.param("short", None, id="under-one-block-no-hashes"),
    ],
)
def test_block_hashes_follow_the_reference_chain(prompt: str, salt: str | None) -> None:
    got = hash_prompt(
        prompt.encode(), block_chars=BLOCK, max_blocks=256, model="m", cache_salt=salt
    )
    assert got == reference_hashes(prompt.encode(), "m", salt or "")


def test_hashing_stops_at_max_prefix_blocks() -> None:
    got = hash_prompt(
        text(10).encode(), block_chars=BLOCK, max_blocks=4, model="m", cache_salt=None
    )
    assert got == reference_hashes(text(10).encode(), "m")[:4]


def test_chat_text_is_the_compact_json_of_messages() -> None:
    messages = [{"role": "system", "content": "sé"}, {"role": "user", "content": "hi " * 50}]
    req = chat("unused")
    req.body["messages"] = messages
    full = json.dumps(messages, separators=(",", ":"), ensure_ascii=False).encode()
    assert prompt_bytes(req, 10**6) == full
    short = prompt_bytes(req, 10)
    assert short is not None and full.startswith(short) and len(short) >= 10


def test_completion_text_is_the_prompt() -> None:
    assert prompt_bytes(completion("abc" * 30), 10**6) == b"abc" * 30


def test_a_token_id_prompt_is_hashed_as_json() -> None:
    req = completion("unused")
    req.body["prompt"] = [1, 2, 3]
    assert prompt_bytes(req, 100) == b"[1,2,3]"


def test_an_unencodable_body_has_nothing_to_hash() -> None:
    req = chat("x")
    req.body["messages"] = [{"content": object()}]
    assert prompt_bytes(req, 100) is None


def test_nothing_to_hash_scores_nothing() -> None:
    req = chat("x")
    del req.body["messages"]
    assert prompt_bytes(req, 100) is None
    assert scorer().score(req, [A, B]) == {}


def test_learns_only_from_its_own_picks() -> None:
    s = scorer()
    req = chat(text(8))
    assert s.score(req, [A, B]) == {}
    s.pre_request(req, SchedulingResult("d", {"d": ProfileResult("d", [A, B])}))
    assert s.score(chat(text(8), request_id="again"), [A, B]) == {A.address: 1.0}


def test_score_is_the_fraction_of_leading_blocks_cached() -> None:
    s = scorer()
    place(s, completion(text(4)), A)
    place(s, completion(text(2)), B)
    longer = completion(text(4) + text(4, "y"), request_id="r2")
    assert s.score(longer, [A, B, C]) == {A.address: 4 / 8, B.address: 2 / 8}


def test_a_different_model_or_salt_shares_nothing() -> None:
    s = scorer()
    place(s, completion(text(4), model="m1"), A)
    assert s.score(completion(text(4), model="m2", request_id="2"), [A]) == {}
    place(s, completion(text(4), cache_salt="t1", request_id="3"), A)
    assert s.score(completion(text(4), cache_salt="t2", request_id="4"), [A]) == {}
    assert s.score(completion(text(4), cache_salt="t1", request_id="5"), [A]) == {A.address: 1.0}


def test_only_candidates_are_scored() -> None:
    s = scorer()
    place(s, completion(text(3)), A)
    assert s.score(completion(text(3), request_id="2"), [B, C]) == {}


def test_records_the_pick_of_every_profile() -> None:
    s = scorer()
    place(s, completion(text(3)), A, B)
    assert s.score(completion(text(3), request_id="2"), [A, B, C]) == {
        A.address: 1.0,
        B.address: 1.0,
    }


def test_lru_evicts_a_prompt_from_its_tail() -> None:
    s = scorer(lru_capacity_per_server=4, auto_tune=False)
    place(s, completion(text(3, "a")), A)
    place(s, completion(text(2, "b"), request_id="2"), A)  # 5 blocks > 4: one goes
    assert s.indexed_blocks == 4
    # The oldest block is the first prompt's last one; its leading two still match.
    assert s.score(completion(text(3, "a"), request_id="3"), [A]) == {A.address: 2 / 3}


def test_auto_tune_reads_block_size_and_capacity_from_metrics() -> None:
    s = scorer()
    big = endpoint("10.0.0.9:8000", block_size=32, num_gpu_blocks=2)
    req = completion(text(4))  # 256 characters = 2 blocks of 32 tokens × 4
    s.score(req, [big])
    s.pre_request(req, SchedulingResult("d", {"d": ProfileResult("d", [big])}))
    assert s.indexed_blocks == 2
    place(s, completion(text(8), request_id="2"), big)
    assert s.indexed_blocks == 2  # capacity from num_gpu_blocks


def test_fixed_block_size_when_auto_tune_is_off() -> None:
    s = scorer(auto_tune=False, block_size_tokens=1)
    big = endpoint("10.0.0.9:8000", block_size=32)
    req = completion("abcdefghij")  # 10 characters = 2 blocks of 4
    s.score(req, [big])
    s.pre_request(req, SchedulingResult("d", {"d": ProfileResult("d", [big])}))
    assert s.indexed_blocks == 2


def test_pre_request_without_scoring_still_learns() -> None:
    s = scorer()
    req = completion(text(2))
    s.pre_request(req, SchedulingResult("d", {"d": ProfileResult("d", [A])}))
    assert s.score(completion(text(2), request_id="2"), [A]) == {A.address: 1.0}


def test_departed_endpoint_state_is_dropped_and_its_slot_reused_clean() -> None:
    s = scorer()
    place(s, completion(text(3)), A)
    place(s, completion(text(3, "b"), request_id="2"), B)
    s.on_endpoints_changed([], [A])
    assert s.indexed_blocks == 3
    assert s.score(completion(text(3), request_id="3"), [A, B]) == {}
    newcomer = endpoint("10.0.0.7:8000")
    place(s, completion(text(1, "c"), request_id="4"), newcomer)
    assert s.score(completion(text(3), request_id="5"), [newcomer, B]) == {}
    assert s.score(completion(text(3, "b"), request_id="6"), [newcomer, B]) == {B.address: 1.0}


def test_forgetting_an_unknown_endpoint_is_harmless() -> None:
    s = scorer()
    s.on_endpoints_changed([A], [C])
    assert s.indexed_blocks == 0
