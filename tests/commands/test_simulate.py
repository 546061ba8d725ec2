from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvgate.bench.policies import POLICIES
from kvgate.bench.traces import Workload, load_mooncake, shared_prefix, write_mooncake
from kvgate.commands.simulate import main


def workload() -> Workload:
    return shared_prefix(
        groups=8,
        prompts_per_group=12,
        system_blocks=4,
        question_tokens=200,
        output_tokens=16,
        rate_per_s=4.0,
        seed=2,
    )


def test_cli_writes_the_json_schema(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    write_mooncake(trace, workload().requests)
    config = tmp_path / "epp.yaml"
    config.write_text(POLICIES["round-robin"], encoding="utf-8")
    out = tmp_path / "out.json"
    code = main(
        [
            "--trace",
            str(trace),
            "--workers",
            "4",
            "--num-gpu-blocks",
            "4096",
            "--policy",
            f"kv,config:{config}",
            "--json",
            str(out),
            "--jobs",
            "1",
            "--quiet",
        ]
    )
    assert code == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["trace"] == str(trace)
    assert report["ideal_hit_rate"] == pytest.approx(workload().ideal_hit_rate)
    assert list(report["policies"]) == ["kv", f"config:{config}"]
    entry = report["policies"]["kv"]
    assert set(entry["ttft_ms"]) == {"p50", "p90", "p99", "mean"}
    assert set(entry["itl_ms"]) == set(entry["e2e_ms"]) == {"p50", "p90"}
    for key in ("hit_rate", "throughput_tok_s", "load_max_over_mean"):
        assert isinstance(entry[key], float), key
    assert entry["requests"] == len(workload().requests)
    # The bounds: nothing beats the floor, no policy's hit rate beats the infinite cache.
    floor = report["floor_ttft_ms"]
    assert set(floor) == {"p50", "p90", "p99"}
    # (The same step times summed in another order: equal up to rounding.)
    assert 0.0 < floor["p50"] <= entry["ttft_ms"]["p50"] * (1 + 1e-9)
    assert floor["p90"] <= entry["ttft_ms"]["p90"] * (1 + 1e-9)
    assert entry["hit_rate"] <= report["pooled_hit_rate"] <= report["ideal_hit_rate"]
    # The pooled cache holds less than the infinite one: its floor is no lower.
    pooled_floor = report["pooled_floor_ttft_ms"]
    assert all(pooled_floor[p] >= floor[p] for p in ("p50", "p90", "p99"))
    # kvgate's policy predicts TTFT; the other config (the reference cost) does not.
    assert set(entry["prediction_error"]) == {"p50", "p90"}
    assert 0.0 <= entry["prediction_error"]["p50"] <= entry["prediction_error"]["p90"]
    assert report["policies"][f"config:{config}"]["prediction_error"] is None


def test_cli_generates_workloads_with_their_fleet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, saved = tmp_path / "out.json", tmp_path / "hetero.jsonl"
    argv = ["--workload", "hetero:sessions_per_worker=4", "--workers", "4", "--load", "1.5"]
    argv += ["--policy", "round-robin", "--json", str(out), "--save-trace", str(saved)]
    assert main([*argv, "--jobs", "1", "--quiet"]) == 0
    printed = capsys.readouterr()
    assert "floor TTFT (idle worker, infinite cache)" in printed.out
    assert "pooled floor TTFT (idle worker, that pooled cache)" in printed.out
    assert "4 workers (heterogeneous)" in printed.err
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["trace"] == "workload:hetero:sessions_per_worker=4 load=1.5 seed=0"
    requests = load_mooncake(saved)
    assert report["policies"]["round-robin"]["requests"] == len(requests) > 16
    # Half the fleet is slower: the slow half of round-robin's requests wait longer than the
    # floor's fastest worker; replayed on an explicit all-fast fleet they do not.
    assert main([*argv, "--fleet", "4x1.0", "--jobs", "1", "--quiet"]) == 0
    fast = json.loads(out.read_text(encoding="utf-8"))
    assert fast["floor_ttft_ms"] == report["floor_ttft_ms"]
    slow_mean = report["policies"]["round-robin"]["ttft_ms"]["mean"]
    assert fast["policies"]["round-robin"]["ttft_ms"]["mean"] < slow_mean


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--policy", "nope"], "unknown policy 'nope'", id="unknown-name"),
        pytest.param(["--policy", "config:/none"], "/none", id="no-file"),
        pytest.param(["--fleet", "4x1.0", "--workers", "2"], "fleet has 4", id="fleet-workers"),
        pytest.param(["--fleet", "4xfast"], "not COUNTxSPEED", id="bad-fleet"),
        pytest.param(["--load", "0"], "--load must be > 0", id="no-load"),
    ],
)
def test_cli_refuses_bad_options(
    tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.jsonl"
    write_mooncake(trace, workload().requests[:2])
    assert main(["--trace", str(trace), *argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "kvgate simulate:" in err and message in err


def test_cli_refuses_bad_workloads(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workload", "rag:top_k=many", "--quiet"]) == 2
    assert "top_k='many' is not a int" in capsys.readouterr().err
