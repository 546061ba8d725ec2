"""`kvgate body-transformer`: bad flags refused before anything starts, and the command as a
process serving until SIGTERM."""

from __future__ import annotations

import asyncio
import re
import signal
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvgate.commands.body_transformer import main
from kvgate.extproc.listeners import EXT_PROC_SERVICE
from tests.extproc.nvext_cases import agg, chat, dumps
from tests.extproc.utils import BUFFERED, ExtProcStream

TIMEOUT = 10.0


@pytest.mark.parametrize(
    "argv",
    [["--port", "70000"], ["--max-body-bytes", "0"], ["--cert-path", "/tmp"]],
    ids=["bad_port", "zero_limit", "cert_without_tls"],
)
def test_cli_refuses_bad_flags(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "kvgate body-transformer:" in capsys.readouterr().err


async def _read_line(stream: asyncio.StreamReader, pattern: str, timeout: float) -> re.Match[str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen = []
    while loop.time() < deadline:
        line = await asyncio.wait_for(stream.readline(), max(0.01, deadline - loop.time()))
        if not line:
            break
        seen.append(line.decode(errors="replace"))
        match = re.search(pattern, seen[-1])
        if match:
            return match
    raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(seen)}")


async def test_command_serves_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kvgate",
        "body-transformer",
        "--bind",
        "127.0.0.1",
        "--port",
        "0",
        "--grpc-health-port",
        "0",
        "--metrics-port",
        "0",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        match = await _read_line(
            proc.stderr, r"ext_proc on 127\.0\.0\.1:(\d+) \(plaintext\), health on (\d+)", 30
        )
        grpc_port, health_port = int(match.group(1)), int(match.group(2))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=EXT_PROC_SERVICE), timeout=TIMEOUT
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            routed = await ExtProcStream(channel).route(dumps(chat()), agg(), body_mode=BUFFERED)
            assert b'"nvext":{"backend_instance_id":42}' in routed.body
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
