from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from kvgate.bench.traces import TraceRequest, shared_prefix, write_mooncake
from kvgate.commands.bench import main

MODEL = "Qwen/Qwen3-0.6B"


def requests() -> list[TraceRequest]:
    return shared_prefix(
        groups=2,
        prompts_per_group=4,
        system_blocks=1,
        question_tokens=100,
        output_tokens=4,
        rate_per_s=50.0,
        seed=1,
    ).requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_cli_reports_unreachable_endpoints_as_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "t.jsonl"
    write_mooncake(trace, requests()[:3])
    out = tmp_path / "out.json"
    argv = ["--url", f"http://127.0.0.1:{free_port()}", "--trace", str(trace), "--model", MODEL]
    assert main([*argv, "--label", "down", "--json", str(out), "--quiet"]) == 0
    assert "3 errors (connection: " in capsys.readouterr().err
    report = json.loads(out.read_text(encoding="utf-8"))
    entry = report["policies"]["down"]
    assert (entry["requests"], entry["errors"]) == (0, 3)
    assert entry["ttft_ms"]["p50"] is None
    assert entry["prediction_error"] is None


@pytest.fixture
def models_server() -> Iterator[tuple[str, list[str]]]:
    """A server whose /v1/models answers JSON labelled text/plain (as some routers do) and
    that refuses every completion; it records the paths it was asked for."""
    seen: list[str] = []

    async def models(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(text=json.dumps({"data": [{"id": "served-model"}]}))

    async def refuse(request: web.Request) -> web.Response:
        seen.append(request.path)
        body = await request.json()
        return web.Response(status=418, text=body["model"])

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", refuse)
    app.router.add_post("/v1/completions", refuse)
    port = free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(runner.cleanup())
        loop.close()


def test_cli_asks_for_the_model_and_sends_chat_by_default(
    tmp_path: Path, models_server: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, seen = models_server
    trace = tmp_path / "t.jsonl"
    write_mooncake(trace, requests()[:2])
    assert main(["--url", url, "--trace", str(trace), "--quiet"]) == 0
    assert "2 errors (http 418: 2)" in capsys.readouterr().err
    assert seen == ["/v1/models", "/v1/chat/completions", "/v1/chat/completions"]
    seen.clear()
    argv = ["--url", url, "--trace", str(trace), "--api", "completions", "--model", "m"]
    assert main([*argv, "--quiet"]) == 0
    assert seen == ["/v1/completions", "/v1/completions"]


def test_cli_refuses_token_prompts_on_chat(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "t.jsonl"
    write_mooncake(trace, requests()[:1])
    argv = ["--url", "http://127.0.0.1:1", "--trace", str(trace), "--model", MODEL]
    assert main([*argv, "--prompt-format", "tokens", "--quiet"]) == 2
    assert "need the completions API" in capsys.readouterr().err
    assert main([*argv, "--api", "completions", "--messages", "per-block", "--quiet"]) == 2
    assert "need the chat API" in capsys.readouterr().err
