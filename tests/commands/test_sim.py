"""`kvgate sim` as a real process: worker lines, KV events, replay, clean shutdown on a signal; and
the settings and ports it refuses."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import zmq
import zmq.asyncio

from kvgate.commands.sim import main
from tests.sim.utils import WORKER_LINE, Subscriber


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.term()


def assert_port_free(port: int) -> None:
    # SO_REUSEADDR: connections just closed leave TIME_WAIT entries on the port, which are not a
    # listener left behind; binding still fails if anything is listening.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
async def test_cli_serves_then_exits_cleanly_on_signal(
    qwen3_dir: Path, signum: int, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    code = "import sys; from kvgate.commands.sim import main; sys.exit(main(sys.argv[1:]))"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        "--workers",
        "2",
        "--base-port",
        "0",
        "--tokenizer",
        str(qwen3_dir),
        "--num-gpu-blocks",
        "512",
        "--max-model-len",
        "4096",
        "--speedup",
        "50",
        "--event-layout",
        "array",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=True,
    )
    assert proc.stdout is not None
    try:
        lines = []
        while True:
            raw = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
            assert raw, "process exited before it was ready"
            line = raw.decode().strip()
            if line.startswith("ready"):
                break
            lines.append(line)
        assert line == "ready workers=2"
        matches = [WORKER_LINE.fullmatch(x) for x in lines]
        assert all(matches), lines
        urls = [m.group(2) for m in matches if m]
        events, replay = matches[0].group(3), matches[0].group(4)  # type: ignore[union-attr]
        sub = Subscriber(zmq_context, events)
        await sub.ready()
        async with aiohttp.ClientSession() as http:
            for url in urls:
                body = {"messages": [{"role": "user", "content": "hi " * 40}], "max_tokens": 3}
                async with http.post(url + "/v1/chat/completions", json=body) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["usage"]["completion_tokens"] == 3
        _, seq, batch = await sub.recv()
        sub.close()
        assert seq == 0 and batch[1][0][0] == "BlockStored", "array layout as asked"
        dealer = zmq.asyncio.Context(zmq_context).socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(replay)
        await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        first = await asyncio.wait_for(dealer.recv_multipart(), 5)
        dealer.close(linger=0)
        assert int.from_bytes(first[2], "big") == 0, "the replay socket answers under uvloop"
        proc.send_signal(signum)
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    _, stderr = await proc.communicate()
    assert b"Traceback" not in stderr, stderr.decode()
    for m in matches:
        assert m
        for endpoint in (m.group(2), m.group(3), m.group(4)):
            assert_port_free(int(endpoint.rsplit(":", 1)[1]))


def test_cli_refuses_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workers", "0"]) == 2
    assert "workers must be >= 1" in capsys.readouterr().err
    assert main(["--num-gpu-blocks", "10", "--max-model-len", "4096"]) == 2
    assert "max_model_len" in capsys.readouterr().err
    assert main(["--tokenizer", "/nonexistent/tokenizer-dir", "--base-port", "0"]) == 2
    assert "cannot load tokenizer" in capsys.readouterr().err


def test_cli_reports_a_busy_port(qwen3_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = ["--base-port", str(port), "--no-events", "--tokenizer", str(qwen3_dir)]
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert "error" in err
    assert err.startswith("kvgate sim: "), err
