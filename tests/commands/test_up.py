"""`kvgate up` as a user runs it: starts everything, prints where, stops it all on Ctrl-C; and its
flags."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kvgate.commands.up import build_parser, main
from kvgate.gateway.local import free_port

pytestmark = pytest.mark.envoy


def test_up_serves_then_ctrl_c_stops_every_process(qwen3_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    with subprocess.Popen(
        [sys.executable, "-m", "kvgate", "up", "--workers", "2", "--port", str(port),
         "--tokenizer", str(qwen3_dir), "--speedup", "20", "--run-dir", str(tmp_path),
         "--status-interval", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None
            lines: list[str] = []
            deadline = time.monotonic() + 90
            while not any("Ctrl-C stops everything" in line for line in lines):
                assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
                lines.append(proc.stdout.readline())
            banner = "".join(lines)
            pids = [int(p) for p in re.findall(r"pid (\d+)", banner)]
            assert len(pids) == 3, banner  # engines, epp, envoy
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                data=json.dumps(
                    {
                        "model": "Qwen/Qwen3-0.6B",
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 3,
                    }
                ).encode(),
                headers={"content-type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=20) as resp:
                assert resp.status == 200
            status = proc.stdout.readline()
            while "routed" not in status:
                assert time.monotonic() < deadline, status
                status = proc.stdout.readline()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:  # a failed assertion must not leave the stack running
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"process {pid} survived kvgate up")
    assert (tmp_path / "envoy.yaml").is_file()
    assert (tmp_path / "epp.log").is_file()


def test_replicas_flag_parsing(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args([])
    assert args.epp_replicas == 1 and args.replica_sync is None
    args = build_parser().parse_args(["--epp-replicas", "3", "--no-replica-sync"])
    assert args.epp_replicas == 3 and args.replica_sync is False
    assert build_parser().parse_args(["--replica-sync"]).replica_sync is True
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit) as err:
            main(["--epp-replicas", bad])
        assert err.value.code == 2
        assert "--epp-replicas" in capsys.readouterr().err


def test_response_phase_flag() -> None:
    assert build_parser().parse_args([]).response_phase == "observer"
    assert build_parser().parse_args(["--response-phase", "inline"]).response_phase == "inline"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--response-phase", "both"])


def test_endpoints_file_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    args = build_parser().parse_args(["--endpoints-file", str(endpoints)])
    assert args.endpoints_file == endpoints
    with pytest.raises(SystemExit) as err:
        build_parser().parse_args(["--endpoints-file", str(endpoints), "--workers", "2"])
    assert err.value.code == 2
    assert main(["--endpoints-file", str(endpoints), "--backend", "dynamo"]) == 2
    assert "drop --endpoint/--endpoints-file" in capsys.readouterr().err
    endpoints.write_text("- address: 127.0.0.1:notaport\n")
    assert main(["--endpoints-file", str(endpoints), "--run-dir", str(tmp_path / "run")]) == 1
    assert "endpoints file:" in capsys.readouterr().err
