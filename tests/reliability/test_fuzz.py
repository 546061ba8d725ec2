"""Short runs of every fuzz target (the campaigns of 100,000 cases each: `make fuzz`).

Hypothesis feeds each target bytes; a failure is shrunk to the smallest input that still fails.
Each target checks its own properties per case, including that nothing was left behind."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability import fuzz
from tests.reliability.config_fuzz import ConfigTarget
from tests.reliability.events_fuzz import (
    DecodeTarget,
    RawDecodeTarget,
    SocketTarget,
    sample_payloads,
)
from tests.reliability.extproc_fuzz import ExtProcTarget


def short(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


DECODE = DecodeTarget()
RAW = RawDecodeTarget()


@short(400)
@given(st.binary(max_size=fuzz.MAX_LEN["kv-events"]))
def test_kv_event_streams(data: bytes) -> None:
    DECODE(data)


@short(400)
@given(st.one_of(st.binary(max_size=2000), st.sampled_from(sample_payloads())))
def test_kv_event_payload_bytes(data: bytes) -> None:
    RAW(data)


def test_sample_payloads_decode_and_index() -> None:
    before = dict(RAW.outcomes)
    for payload in sample_payloads():
        RAW(payload)
    assert RAW.outcomes["malformed"] == before["malformed"]
    assert RAW.outcomes["blocks_indexed"] > before["blocks_indexed"]


CONFIG = ConfigTarget()


@short(200)
@given(st.binary(max_size=fuzz.MAX_LEN["epp-config"]))
def test_epp_config_documents(data: bytes) -> None:
    CONFIG(data)


def test_config_cases_reach_both_outcomes() -> None:
    target = ConfigTarget()
    rng = random.Random(7)
    for _ in range(200):
        target(rng.randbytes(300))
    assert target.outcomes["built"] > 20 and target.outcomes["EppConfigError"] > 20


@pytest.fixture(scope="module")
def socket_target() -> Iterator[SocketTarget]:
    with SocketTarget() as target:
        yield target


@pytest.mark.slow
@short(200)
@given(st.binary(max_size=fuzz.MAX_LEN["kv-events-socket"]))
def test_kv_event_streams_through_a_real_subscriber(
    socket_target: SocketTarget, data: bytes
) -> None:
    socket_target(data)


@pytest.fixture(scope="module")
def extproc_target(
    qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ExtProcTarget]:
    with ExtProcTarget(qwen3_dir, tmp_path_factory.mktemp("extproc-fuzz")) as target:
        yield target


@pytest.mark.slow
@short(400)
@given(st.binary(max_size=fuzz.MAX_LEN["extproc"]))
def test_ext_proc_sequences(extproc_target: ExtProcTarget, data: bytes) -> None:
    extproc_target(data)


@pytest.mark.slow
def test_ext_proc_cases_route_refuse_and_cancel(extproc_target: ExtProcTarget) -> None:
    """The generator reaches every outcome: routed, each refusal, cancelled, over gRPC."""
    rng = random.Random(7)
    for _ in range(600):
        extproc_target(rng.randbytes(3000))
    seen = extproc_target.outcomes
    for outcome in ("routed", "cancelled", "grpc_cases", "status_400", "status_404", "status_413"):
        assert seen.get(outcome, 0) > 0, (outcome, seen)


def test_the_campaign_runner_counts_cases(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    code = fuzz.main(["--engine", "random", "--cases", "100", "--json", str(out),
                      "--workdir", str(tmp_path), "kv-events", "epp-config"])  # fmt: skip
    assert code == 0
    results = json.loads(out.read_text())
    assert [(r["target"], r["cases"], r["failure"]) for r in results] == [
        ("kv-events", 100, None),
        ("epp-config", 100, None),
    ]
    assert all(r["cases_per_s"] > 0 for r in results)


@pytest.mark.slow
def test_the_atheris_engine_runs_a_target(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    result = fuzz.run_atheris("kv-events-raw", 2000, 60, 0, tmp_path)
    assert result["failure"] is None, result
    assert result["cases"] == 2000
