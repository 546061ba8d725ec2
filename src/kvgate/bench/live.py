"""`kvgate bench`: replay a trace against any OpenAI-compatible endpoint, measured at the client.

Requests go out at the trace's timestamps (scaled by ``--time-scale``), at most
``--max-concurrency`` at once (later arrivals wait for a slot, and their wait counts in their
latency, as a user's would). Each is what a real client sends: by default a streamed
``POST /v1/chat/completions`` with one user message whose text renders the request's hash ids
(`kvgate.bench.prompts.TextSynth`: the same paragraph for the same id, so equal hash ids are
equal text and, through any tokenizer, equal tokens), or with ``--messages per-block`` one user
message per hash id, as a multi-turn client sends its history: the earlier turns are messages
seen before (a tokenizer's per-message cache then hits, as it would for a real conversation,
where one message for the whole prompt is the worst case); ``--api completions`` sends the text as a
completions ``prompt``, and ``--prompt-format tokens`` (completions only) the token ids of
`TokenSynth` instead, for engines that take them. Every request asks for ``max_tokens`` = the
trace's output length, ``ignore_eos`` and usage in the stream. The client records the time to the
first content chunk, the gaps between chunks (ITL), the latency, the serving worker
(``x-kvgate-worker`` header, when the endpoint names one) and ``usage`` (prompt, completion and
``prompt_tokens_details.cached_tokens`` for the hit rate).

Bounds: ``--limit`` requests at most; ``--duration`` seconds at most, after which no request is
started and those in flight are cancelled; each request times out after ``--request-timeout``.
Failures (HTTP errors, timeouts, cancellations, broken streams) are counted by kind in the
report, never dropped. Output: the same table and JSON schema as `kvgate simulate`, with one
policy entry named ``--label``. The command line is `kvgate.commands.bench`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import aiohttp

from kvgate.bench.prompts import TextSynth
from kvgate.bench.report import Progress, RunRecord
from kvgate.bench.traces import TokenSynth, TraceRequest
from kvgate.sse import EventStream, usage_of

WORKER_HEADER = "x-kvgate-worker"

Api = Literal["chat", "completions"]
PromptFormat = Literal["text", "tokens"]
Messages = Literal["one", "per-block"]
PATHS: Final[dict[Api, str]] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass(slots=True)
class Outcome:
    """One request as the client saw it; ``error`` names the failure kind, if any."""

    error: str | None = None
    ttft_s: float | None = None
    latency_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)
    worker: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None


async def stream_completion(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    timeout_s: float,
    api: Api = "completions",
) -> Outcome:
    """POST a streamed request to ``api``'s path; never raises for HTTP or stream problems
    (they become the outcome's ``error``)."""
    started = time.perf_counter()
    out = Outcome()
    last: float | None = None
    try:
        async with session.post(
            f"{url}{PATHS[api]}", json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            out.worker = resp.headers.get(WORKER_HEADER)
            if resp.status != 200:
                await resp.read()
                out.error = f"http {resp.status}"
                return out
            events = EventStream(resp.content)
            async for event in events:
                now = time.perf_counter()
                if _has_content(event):
                    if last is None:
                        out.ttft_s = now - started
                    else:
                        out.gaps_s.append(now - last)
                    last = now
                usage = usage_of(event)
                if usage.counted:
                    out.prompt_tokens = usage.prompt_tokens
                    out.completion_tokens = usage.completion_tokens
                    out.cached_tokens = usage.cached_tokens
            if not events.done:
                out.error = "stream ended early"
    except TimeoutError:
        out.error = "timeout"
    except aiohttp.ClientError as err:
        out.error = f"connection: {type(err).__name__}"
    except ValueError:
        out.error = "bad stream data"
    out.latency_s = time.perf_counter() - started
    return out


def _has_content(event: Any) -> bool:
    """Whether a chunk carries generated text: completions ``text``, chat ``delta.content``
    (or ``reasoning_content``, which a reasoning model streams first)."""
    if not isinstance(event, dict):
        return False
    for choice in event.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning_content")):
            return True
    return False


@dataclass(frozen=True, slots=True)
class BenchSettings:
    url: str
    model: str
    max_concurrency: int = 64
    duration_s: float = 600.0
    request_timeout_s: float = 120.0
    seed: int = 0
    api: Api = "chat"
    prompt_format: PromptFormat = "text"
    messages: Messages = "one"
    """Chat only: the prompt as one user message, or one message per hash id."""

    def __post_init__(self) -> None:
        if self.api not in PATHS:
            raise ValueError(f"api must be one of {', '.join(PATHS)}, got {self.api!r}")
        if self.prompt_format not in ("text", "tokens"):
            raise ValueError(f"prompt format must be text or tokens, got {self.prompt_format!r}")
        if self.prompt_format == "tokens" and self.api != "completions":
            raise ValueError("token-id prompts need the completions API (--api completions)")
        if self.messages not in ("one", "per-block"):
            raise ValueError(f"messages must be one or per-block, got {self.messages!r}")
        if self.messages != "one" and self.api != "chat":
            raise ValueError("messages per block need the chat API (--api chat)")


class RequestBuilder:
    """The body a client sends for a trace request, under `BenchSettings`' api and format."""

    def __init__(self, settings: BenchSettings) -> None:
        self.settings = settings
        self._text = TextSynth(settings.seed)
        self._tokens = TokenSynth(settings.seed)

    def body(self, request: TraceRequest) -> dict[str, Any]:
        s = self.settings
        body: dict[str, Any] = {"model": s.model}
        if s.api == "chat" and s.messages == "per-block":
            body["messages"] = [
                {"role": "user", "content": block} for block in self._text.blocks(request)
            ]
        elif s.api == "chat":
            body["messages"] = [{"role": "user", "content": self._text.prompt(request)}]
        elif s.prompt_format == "tokens":
            body["prompt"] = self._tokens.tokens(request)
        else:
            body["prompt"] = self._text.prompt(request)
        body.update(
            max_tokens=request.output_length,
            ignore_eos=True,
            stream=True,
            stream_options={"include_usage": True},
        )
        return body


def _record(record: RunRecord, out: Outcome, queued_s: float, arrival: float) -> None:
    if out.error is not None:
        record.error(out.error)
        return
    if out.ttft_s is None:
        record.error("no tokens")
        return
    record.ttft_s.append(queued_s + out.ttft_s)
    record.e2e_s.append(queued_s + out.latency_s)
    record.itl_s.extend(out.gaps_s)
    record.first_arrival_s = min(record.first_arrival_s, arrival)
    record.last_finish_s = max(record.last_finish_s, arrival + queued_s + out.latency_s)
    record.output_tokens += out.completion_tokens or len(out.gaps_s) + 1
    if out.prompt_tokens is not None:
        record.prompt_tokens += out.prompt_tokens
        record.cached_tokens += out.cached_tokens or 0
    else:
        record.error("no usage")
    if out.worker is not None:
        record.per_worker[out.worker] = record.per_worker.get(out.worker, 0) + 1


async def run_bench(
    requests: Sequence[TraceRequest],
    settings: BenchSettings,
    *,
    session: aiohttp.ClientSession | None = None,
    progress: Progress | None = None,
) -> RunRecord:
    """Replay ``requests`` open-loop; returns what the client measured."""
    if settings.max_concurrency < 1 or not settings.duration_s > 0:
        raise ValueError("max_concurrency must be >= 1 and duration > 0")
    record = RunRecord()
    builder = RequestBuilder(settings)
    slots = asyncio.Semaphore(settings.max_concurrency)
    start = time.perf_counter()
    done = 0

    async def one(r: TraceRequest, http: aiohttp.ClientSession) -> None:
        nonlocal done
        await asyncio.sleep(max(0.0, start + r.timestamp_ms / 1000.0 - time.perf_counter()))
        arrival = time.perf_counter() - start
        body = builder.body(r)
        async with slots:
            queued = time.perf_counter() - start - arrival
            out = await stream_completion(
                http, settings.url, body, settings.request_timeout_s, settings.api
            )
        _record(record, out, queued, arrival)
        done += 1
        if progress is not None:
            progress.update(done)

    async def all_requests(http: aiohttp.ClientSession) -> None:
        tasks = [asyncio.create_task(one(r, http)) for r in requests]
        finished, unfinished = await asyncio.wait(tasks, timeout=settings.duration_s)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        for task in finished:
            task.result()  # a bug in this module must not pass silently
        for _ in unfinished:
            record.error("cut at --duration")

    started = time.perf_counter()
    if session is None:
        connector = aiohttp.TCPConnector(limit=settings.max_concurrency)
        async with aiohttp.ClientSession(connector=connector) as own:
            await all_requests(own)
    else:
        await all_requests(session)
    record.wall_s = time.perf_counter() - started
    return record


async def first_model(url: str) -> str:
    """The first model ``url/v1/models`` lists, whatever content type the answer claims."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{url}/v1/models") as resp,
    ):
        resp.raise_for_status()
        raw = await resp.read()
    try:
        payload = json.loads(raw)
    except ValueError:
        raise ValueError(f"{url}/v1/models did not answer JSON: pass --model") from None
    models = payload.get("data") if isinstance(payload, dict) else None
    if not models or not isinstance(models[0], dict) or "id" not in models[0]:
        raise ValueError(f"{url}/v1/models lists no model: pass --model")
    return str(models[0]["id"])
