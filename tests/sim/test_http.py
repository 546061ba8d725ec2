"""The HTTP API over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import socket
import statistics
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvgate.sim.engine import EngineConfig
from kvgate.sim.http import INSTANCE_HEADER, WORKER_HEADER
from kvgate.sim.prompts import TokensCodec
from tests.sim.utils import MODEL, WorkerFactory, stream

LOREM = (
    "Routing decides almost everything when caches are small and prefixes are long. "
    "Each worker keeps the blocks it has seen, and a request that lands where its prefix "
    "lives skips most of its prefill. "
)


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


async def test_models_health_and_worker_identity(
    make_worker: WorkerFactory, http: aiohttp.ClientSession
) -> None:
    async with make_worker(instance_id=4242) as worker:
        async with http.get(worker.url + "/health") as resp:
            assert resp.status == 200
            assert resp.headers[WORKER_HEADER] == worker.address
            assert resp.headers[INSTANCE_HEADER] == "4242"
        async with http.get(worker.url + "/v1/models") as resp:
            body = await resp.json()
        assert [m["id"] for m in body["data"]] == [MODEL]
        assert body["data"][0]["max_model_len"] == 4096


async def test_instance_id_defaults_to_the_port(
    make_worker: WorkerFactory, http: aiohttp.ClientSession
) -> None:
    async with make_worker() as worker, http.get(worker.url + "/health") as resp:
        assert resp.headers[INSTANCE_HEADER] == worker.address.rsplit(":", 1)[1]


async def test_chat_non_streamed(make_worker: WorkerFactory, http: aiohttp.ClientSession) -> None:
    async with make_worker() as worker:
        body = chat("Say five words.", max_tokens=5, ignore_eos=True)
        async with http.post(worker.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            assert resp.headers[WORKER_HEADER] == worker.address
            reply = await resp.json()
    [choice] = reply["choices"]
    assert reply["object"] == "chat.completion" and reply["model"] == MODEL
    assert choice["finish_reason"] == "length"
    assert len(choice["message"]["content"].split()) == 5
    usage = reply["usage"]
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}


async def test_chat_streamed_with_usage(
    make_worker: WorkerFactory, http: aiohttp.ClientSession
) -> None:
    async with make_worker() as worker:
        body = chat(
            "Count to four.",
            max_completion_tokens=4,
            ignore_eos=True,
            stream_options={"include_usage": True},
        )
        reply = await stream(http, worker.url + "/v1/chat/completions", body)
    assert reply.status == 200 and reply.done
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    assert reply.headers[WORKER_HEADER] == worker.address
    assert reply.chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c for c in reply.chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content) == 4
    assert [c["choices"][0]["finish_reason"] for c in content] == [None, None, None, "length"]
    assert reply.chunks[-1]["choices"] == []
    assert reply.usage["completion_tokens"] == 4
    assert all(c["object"] == "chat.completion.chunk" for c in reply.chunks)
    assert len({c["id"] for c in reply.chunks}) == 1


async def test_completions_streamed_and_not(
    make_worker: WorkerFactory, http: aiohttp.ClientSession
) -> None:
    async with make_worker() as worker:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3, "ignore_eos": True}
        reply = await stream(http, worker.url + "/v1/completions", body)
        async with http.post(worker.url + "/v1/completions", json=body) as resp:
            whole = await resp.json()
        async with http.post(worker.url + "/v1/completions", json={"prompt": "Hi"}) as resp:
            default = await resp.json()
    assert reply.done and len(reply.chunks) == 3 and "usage" not in reply.chunks[-1]
    assert reply.chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert whole["object"] == "text_completion"
    assert whole["choices"][0]["text"] == reply.text, "same prompt, same deterministic output"
    assert default["usage"]["completion_tokens"] == 16, "vLLM's completions default, no model"


async def test_repeated_long_prefix_is_cached_and_faster(
    make_worker: WorkerFactory, http: aiohttp.ClientSession, codec: TokensCodec
) -> None:
    system = LOREM * 50
    engine = EngineConfig(num_gpu_blocks=2048, max_model_len=8192)
    async with make_worker(engine=engine, speedup=1.0) as worker:
        url = worker.url + "/v1/chat/completions"

        def request(question: str) -> dict[str, Any]:
            return {
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ],
                "max_tokens": 2,
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
            }

        cold = await stream(http, url, request("What decides routing?"))
        warm, *more_warm = [
            await stream(http, url, request(q))
            for q in ("What do workers keep?", "What is a block?", "Who evicts?")
        ]
    prompt_tokens = cold.usage["prompt_tokens"]
    # A prompt this long is tokenized in the worker's thread, to the same tokens.
    assert prompt_tokens == len(codec.tokenize(request("What decides routing?"), "chat")) > 1500
    assert cold.usage["prompt_tokens_details"]["cached_tokens"] == 0
    cached = warm.usage["prompt_tokens_details"]["cached_tokens"]
    assert cached > 1500 and cached % 16 == 0
    # Model: ~48 ms of prefill cold vs ~17 ms warm. Wall-clock on a shared machine: the best of
    # three warm requests, so that one stalled moment (seen once: 233 ms) cannot decide it.
    best_warm = min(r.ttft for r in (warm, *more_warm))
    assert best_warm < cold.ttft - 0.015, (cold.ttft, [r.ttft for r in (warm, *more_warm)])


async def test_stream_chunks_arrive_as_tokens_are_made(
    make_worker: WorkerFactory, http: aiohttp.ClientSession
) -> None:
    """Decode steps take ~6 ms: each token's chunk must reach the client about then, not in a
    burst at the end (buffering) nor ~40 ms apart (Nagle + delayed ACK)."""
    async with make_worker(speedup=1.0) as worker:
        body = chat("Stream slowly.", max_tokens=20, ignore_eos=True)
        reply = await stream(http, worker.url + "/v1/chat/completions", body)
    times = reply.chunk_times[1:]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 19
    assert times[-1] - times[0] > 0.06, "chunks were held back and sent together"
    assert 0.003 < statistics.median(gaps) < 0.02, gaps


async def test_accepted_sockets_have_tcp_nodelay(
    make_worker: WorkerFactory, http: aiohttp.ClientSession
) -> None:
    """Loopback hides Nagle's delay (Linux ACKs quickly there), so look at the socket itself."""
    async with make_worker() as worker, http.get(worker.url + "/health") as resp:
        assert resp.status == 200
        # aiohttp's server object holds the live connections; reached through the worker's
        # private runner because nothing public should expose sockets.
        server = worker._http.server  # type: ignore[union-attr]
        [connection] = server.connections  # type: ignore[union-attr]
        sock = connection.transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_client_disconnect_frees_the_request(
    make_worker: WorkerFactory, http: aiohttp.ClientSession
) -> None:
    async with make_worker(speedup=1.0) as worker:
        body = chat("Never ending.", max_tokens=2000, ignore_eos=True, stream=True)
        async with http.post(worker.url + "/v1/chat/completions", json=body) as resp:
            await resp.content.readline()
            assert worker.engine.num_running == 1
            resp.close()
        for _ in range(100):
            if not worker.engine.has_work:
                break
            await asyncio.sleep(0.02)
        assert not worker.engine.has_work
        assert worker.engine.cache.usage == 0.0
        assert worker.engine.stats.finished == {"abort": 1}


async def test_shutdown_ends_open_streams(
    make_worker: WorkerFactory, http: aiohttp.ClientSession
) -> None:
    async with make_worker(speedup=1.0) as worker:
        body = chat("Long answer.", max_tokens=2000, ignore_eos=True)
        pending = asyncio.create_task(stream(http, worker.url + "/v1/chat/completions", body))
        while worker.engine.stats.generation_tokens < 2:
            await asyncio.sleep(0.01)
    reply = await asyncio.wait_for(pending, timeout=5)
    assert reply.done
    assert reply.chunks[-1]["choices"][0]["finish_reason"] == "abort"


async def test_tokenize_matches_the_shared_tokenizer(
    make_worker: WorkerFactory, http: aiohttp.ClientSession, codec: TokensCodec
) -> None:
    body = chat("Tokenize me, please.")
    async with make_worker() as worker:
        async with http.post(worker.url + "/tokenize", json=body) as resp:
            chat_tokens = await resp.json()
        async with http.post(worker.url + "/tokenize", json={"prompt": "plain"}) as resp:
            plain = await resp.json()
    assert chat_tokens["tokens"] == codec.tokenize(body, "chat")
    assert chat_tokens["count"] == len(chat_tokens["tokens"])
    assert chat_tokens["max_model_len"] == 4096
    assert plain["tokens"] == codec.tokenize({"prompt": "plain"}, "completions")


async def test_render_endpoints(
    make_worker: WorkerFactory, http: aiohttp.ClientSession, codec: TokensCodec
) -> None:
    body = chat("Render me.")
    async with make_worker() as worker:
        async with http.post(worker.url + "/v1/chat/completions/render", json=body) as resp:
            rendered = await resp.json()
        async with http.post(worker.url + "/v1/completions/render", json={"prompt": "abc"}) as resp:
            [completion] = await resp.json()
    assert rendered["token_ids"] == codec.tokenize(body, "chat")
    assert rendered["prompt"] == codec.render_chat(body)
    assert "<|im_start|>user\nRender me.<|im_end|>" in rendered["prompt"]
    assert completion["token_ids"] == codec.tokenize({"prompt": "abc"}, "completions")
    assert completion["prompt"] == "abc"


async def test_sglang_style_info(make_worker: WorkerFactory, http: aiohttp.ClientSession) -> None:
    async with make_worker() as worker:
        async with http.get(worker.url + "/get_model_info") as resp:
            info = await resp.json()
        async with http.get(worker.url + "/get_server_info") as resp:
            server = await resp.json()
        async with http.get(worker.url + "/get_load") as resp:
            load = await resp.json()
    assert info["model_path"] == MODEL and info["is_generation"] is True
    assert server["page_size"] == 16 and server["max_total_num_tokens"] == 512 * 16
    assert load == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]


async def test_metrics_parse_as_prometheus_text(
    make_worker: WorkerFactory, http: aiohttp.ClientSession
) -> None:
    async with make_worker() as worker:
        body = chat(LOREM * 3, max_tokens=2, ignore_eos=True)
        for _ in range(2):
            async with http.post(worker.url + "/v1/chat/completions", json=body) as resp:
                usage = (await resp.json())["usage"]
        async with http.get(worker.url + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    samples = {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    engine = (("engine", "0"),)
    assert samples[("vllm:num_requests_running", engine)] == 0
    assert samples[("vllm:num_requests_waiting", engine)] == 0
    assert samples[("vllm:kv_cache_usage_perc", engine)] == 0.0, "finished: blocks evictable"
    assert samples[("vllm:prefix_cache_queries_total", engine)] == 2 * usage["prompt_tokens"]
    hits = usage["prompt_tokens_details"]["cached_tokens"]
    assert hits > 0 and samples[("vllm:prefix_cache_hits_total", engine)] == hits
    config = (("block_size", "16"), ("enable_prefix_caching", "True"), ("num_gpu_blocks", "512"))
    assert samples[("vllm:cache_config_info", config)] == 1
    assert samples[("vllm:time_to_first_token_seconds_count", engine)] == 2
    assert samples[("vllm:time_to_first_token_seconds_bucket", (*engine, ("le", "+Inf")))] == 2
    assert samples[("vllm:request_success_total", (*engine, ("finished_reason", "length")))] == 2


ERROR_CASES: list[tuple[str, str, bytes | dict[str, Any], int, str | None]] = [
    ("malformed-json", "/v1/chat/completions", b'{"model": ', 400, None),
    ("body-not-an-object", "/v1/completions", b"[1, 2]", 400, None),
    ("unknown-model", "/v1/chat/completions", {**chat("x"), "model": "nope"}, 404, "model"),
    ("messages-not-a-list", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("max-tokens-wrong-type", "/v1/chat/completions", chat("x", max_tokens="9"), 400, "max_tokens"),
    ("max-tokens-zero", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("stream-wrong-type", "/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    (
        "ignore-eos-wrong-type",
        "/v1/completions",
        {"prompt": "x", "ignore_eos": 1},
        400,
        "ignore_eos",
    ),
    (
        "usage-without-stream",
        "/v1/chat/completions",
        chat("x", stream_options={"include_usage": True}),
        400,
        "stream_options",
    ),
    ("n-above-one", "/v1/chat/completions", chat("x", n=2), 400, "n"),
    ("prompt-too-long", "/v1/completions", {"prompt": "hello " * 5000}, 400, "prompt"),
    (
        "output-too-long",
        "/v1/chat/completions",
        chat("x", max_tokens=4096),
        400,
        "messages",
    ),
    ("tokenize-bad-prompt", "/tokenize", {"prompt": {"a": 1}}, 400, "prompt"),
    (
        "cache-salt-vllm-refuses",
        "/v1/chat/completions",
        chat("x", cache_salt=""),
        400,
        "cache_salt",
    ),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[case[0] for case in ERROR_CASES])
async def test_bad_requests_get_openai_errors(
    make_worker: WorkerFactory,
    http: aiohttp.ClientSession,
    case: tuple[str, str, bytes | dict[str, Any], int, str | None],
) -> None:
    _, path, body, status, param = case
    async with make_worker() as worker:
        kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
        async with http.post(worker.url + path, **kwargs) as resp:
            assert resp.status == status
            assert resp.content_type == "application/json"
            error = (await resp.json())["error"]
        assert not worker.engine.has_work
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"]
    assert error["param"] == param
    assert "Traceback" not in error["message"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nowhere", 404), ("GET", "/v1/chat/completions", 405)],
    ids=["unknown-route", "wrong-method"],
)
async def test_routing_errors_are_json_too(
    make_worker: WorkerFactory, http: aiohttp.ClientSession, method: str, path: str, status: int
) -> None:
    async with make_worker() as worker, http.request(method, worker.url + path) as resp:
        assert resp.status == status
        assert (await resp.json())["error"]["code"] == status
