"""Shared by the fault drills: simulated engines as processes of their own (so that one can be
killed or frozen alone), `kvgate up` over them, load through Envoy, and the picker's bookkeeping
read from its ``/healthz``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from kvgate.gateway.client import ChatResult, chat
from kvgate.gateway.local import LocalGateway, LocalGatewayConfig, RunningGateway, free_port

T = TypeVar("T")
MODEL = "Qwen/Qwen3-0.6B"
SYSTEM = "You are the fault-drill assistant. " + " ".join(
    f"Fact {i}: the gateway keeps prefix {i} warm after a fault." for i in range(60)
)
IDLE = {"open_streams": 0, "buffered_request_bytes": 0, "awaiting_observer": 0,
        "inflight_bookings": 0, "own_inflight_bookings": 0}  # fmt: skip


def body(question: str, *, system: str | None = SYSTEM, stream: bool = False,
         max_tokens: int = 6) -> dict[str, Any]:  # fmt: skip
    """A chat request; the engine generates exactly ``max_tokens`` (its EOS is ignored)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    out: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": max_tokens,
                           "ignore_eos": True}  # fmt: skip
    if stream:
        out.update(stream=True, stream_options={"include_usage": True})
    return out


class SimProcess:
    """One simulated engine (`kvgate sim --workers 1`) in a process and session of its own."""

    def __init__(self, tokenizer: Path, log: Path, *, speedup: float = 20.0) -> None:
        self.http, self.events, self.replay = free_port(), free_port(), free_port()
        self.log = log
        argv = [sys.executable, "-X", "faulthandler", "-m", "kvgate", "sim", "--workers", "1",
                "--base-port", str(self.http), "--events-base-port", str(self.events),
                "--replay-base-port", str(self.replay), "--tokenizer", str(tokenizer),
                "--model", MODEL, "--speedup", f"{speedup:g}"]  # fmt: skip
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.http}"

    def entry(self) -> dict[str, object]:
        return {"address": self.address, "instance_id": self.http,
                "events": f"tcp://127.0.0.1:{self.events}",
                "replay": f"tcp://127.0.0.1:{self.replay}"}  # fmt: skip

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while "ready workers=" not in self.log.read_text(errors="replace"):
            assert self.process.poll() is None, self.log.read_text(errors="replace")
            assert time.monotonic() < deadline, f"simulator not ready: {self.log}"
            time.sleep(0.1)

    def signal(self, sig: signal.Signals) -> None:
        os.killpg(self.process.pid, sig)

    def close(self) -> None:
        if self.process.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
        self.process.wait(timeout=10)


@contextmanager
def sim_processes(count: int, tokenizer: Path, run_dir: Path, **kwargs: Any) -> Iterator[
    list[SimProcess]
]:  # fmt: skip
    sims: list[SimProcess] = []
    try:
        for i in range(count):
            sims.append(SimProcess(tokenizer, run_dir / f"sim{i}.log", **kwargs))
        for sim in sims:
            sim.wait_ready()
        yield sims
    finally:
        for sim in sims:
            sim.close()


@contextmanager
def gateway_over(
    sims: list[SimProcess],
    tokenizer: Path,
    run_dir: Path,
    *,
    entries: list[dict[str, object]] | None = None,
    **config: Any,
) -> Iterator[tuple[LocalGateway, RunningGateway]]:
    """`kvgate up` over ``sims`` (endpoints-file ``entries`` if given, else each sim's own)."""
    settings = LocalGatewayConfig(
        endpoint_entries=entries or [s.entry() for s in sims], port=free_port(),
        tokenizer=str(tokenizer), run_dir=run_dir / "gateway", **config,
    )  # fmt: skip
    local = LocalGateway(settings)
    with local as running:
        yield local, running


def get_json(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        out = json.loads(resp.read())
    assert isinstance(out, dict)
    return out


def bookkeeping(running: RunningGateway) -> list[dict[str, int]]:
    """Each replica's per-request state (what ``/healthz`` reports)."""
    return [get_json(url)["bookkeeping"] for url in running.epp_healthz_urls]


def wait_idle(running: RunningGateway, timeout_s: float = 15.0) -> list[dict[str, int]]:
    """Bookkeeping of every replica once all of it is back to 0 (asserts it gets there)."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = bookkeeping(running)
        if all(h == IDLE for h in held):
            return held
        assert time.monotonic() < deadline, f"bookkeeping not back to 0: {held}"
        time.sleep(0.2)


@dataclass
class Outcome:
    """What a batch of requests came to: statuses (0: the connection failed), serving workers."""

    statuses: Counter[int] = field(default_factory=Counter)
    workers: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    results: list[ChatResult] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)
    """When each request was sent (monotonic seconds), in order."""
    status_of: list[int] = field(default_factory=list)
    """Each request's status (0: the connection failed or the stream was cut), in order."""

    def add(self, result: ChatResult | BaseException) -> None:
        self.status_of.append(0 if isinstance(result, BaseException) else result.status)
        if isinstance(result, BaseException):
            self.statuses[0] += 1
            self.errors.append(f"{type(result).__name__}: {result}")
            return
        self.results.append(result)
        self.statuses[result.status] += 1
        if result.worker:
            self.workers[result.worker] += 1
        if result.error:
            self.errors.append(result.error)


async def send_all(url: str, bodies: list[dict[str, Any]], *, rate: float = 20.0,
                   timeout_s: float = 30.0) -> Outcome:  # fmt: skip
    """``bodies`` at ``rate`` per second, each on a fresh connection, all awaited."""
    return await send_while(url, iter(bodies), lambda: True, rate=rate, timeout_s=timeout_s)


async def send_while(url: str, bodies: Iterator[dict[str, Any]], go_on: Callable[[], bool], *,
                     rate: float = 20.0, timeout_s: float = 30.0) -> Outcome:  # fmt: skip
    """Requests from ``bodies`` at ``rate`` per second while ``go_on()``, then all awaited."""
    outcome = Outcome()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        tasks = []
        for payload in bodies:
            if not go_on():
                break
            outcome.sent_at.append(time.monotonic())
            tasks.append(asyncio.create_task(chat(session, url, payload, timeout_s=timeout_s)))
            await asyncio.sleep(1.0 / rate)
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            outcome.add(result)
    return outcome


def routes_by_prefix(url: str, workers: list[str], *, tries: int = 20) -> ChatResult:
    """Routing is correct: a shared prefix lands where it is cached, with cached tokens, on a
    live worker. Returns the last request's result."""

    async def go() -> ChatResult:
        async with aiohttp.ClientSession() as session:
            system = SYSTEM + f" Drill {time.monotonic_ns()}."  # a prefix nobody caches yet
            first = await chat(session, url, body("First question?", system=system))
            assert first.status == 200, first.error
            assert first.worker in workers, (first.worker, workers)
            # A try sent before the picker heard the first one's KV events may land elsewhere,
            # and that worker then caches the prefix too: either is a right place after it.
            cached_on = {first.worker}
            for _ in range(tries):  # KV events reach the picker a moment after the answer
                again = await chat(session, url, body("Second question?", system=system))
                assert again.status == 200, again.error
                if again.cached_tokens:
                    break
                cached_on.add(again.worker)
                await asyncio.sleep(0.2)
            assert again.worker in cached_on, (again.worker, cached_on)
            assert again.cached_tokens and again.cached_tokens > 500, again
            return again

    return asyncio.run(go())


class BackgroundLoop:
    """An asyncio loop in a thread of its own, for servers a synchronous test keeps running."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class TcpLink:
    """A TCP forwarder from a port of its own to ``target_port``: `cut` drops every connection
    and refuses new ones (a network partition), `restore` accepts again on the same port."""

    def __init__(self, background: BackgroundLoop, target_port: int) -> None:
        self.background = background
        self.port = free_port()
        self.target_port = target_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.restore()

    def restore(self) -> None:
        self.background.run(self._listen())

    def cut(self) -> None:
        self.background.run(self._cut())

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._connection, "127.0.0.1", self.port, reuse_address=True
        )

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            _pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True
        )
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


def metric(running: RunningGateway, name: str, replica: int = 0) -> float:
    """The sum of every sample of ``name`` on one replica's /metrics."""
    with urllib.request.urlopen(running.epp_metrics_urls[replica], timeout=5) as resp:
        text = resp.read().decode()
    found = re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M)
    return sum(float(v) for v in found)


def kv_events(running: RunningGateway, replica: int = 0) -> dict[str, int]:
    events = get_json(running.epp_healthz_urls[replica])["kv_events"]
    assert isinstance(events, dict)
    return events


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def decisions(running: RunningGateway, replica: int = 0) -> Counter[str]:
    """Routing decisions so far, per endpoint (``kvgate_decisions_total``)."""
    with urllib.request.urlopen(running.epp_metrics_urls[replica], timeout=5) as resp:
        text = resp.read().decode()
    found = re.findall(r'^kvgate_decisions_total\{endpoint="([^"]+)"\} ([0-9.e+-]+)$', text, re.M)
    return Counter({endpoint: int(float(value)) for endpoint, value in found})


def report(drill: str, **figures: object) -> None:
    """One line of figures per drill (``pytest -s`` shows them; docs/reliability.md quotes them)."""
    print(f"\nDRILL {drill}: " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)
