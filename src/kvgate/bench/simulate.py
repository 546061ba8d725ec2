"""`kvgate simulate`: replay a trace in virtual time against simulated engines, per policy.

For each policy a fresh fleet of `kvgate.sim` engines runs on one `VirtualDriver` (a heap of
events in virtual time: no sleeping, no sockets), and the policy's EndpointPickerConfig is built
into the EPP's own `Scheduler`. A request goes through the hooks in the order the EPP calls them:

arrival      prepare → schedule → pre_request, then the engine gets it;
first token  response_streaming(first_chunk=True): the KV scorer's prefill-complete signal;
last token   response_complete, with the usage the engine reports (cached tokens included).

The trace gives tokens, not text: each request's tokens come from `TokenSynth` and are set on the
request with their block hashes before ``prepare`` (the KV scorer then skips tokenizing), and the
body's ``prompt`` is the token id list, which is what the character-based prefix scorer hashes
for a completions request carrying token ids.

Engine state reaches the plugins as it would in a gateway: KV events go to every KV scorer's index
``--event-delay-ms`` after the step that emitted them; endpoint metrics (queue, running, KV usage)
are refreshed every ``--scrape-interval-ms`` as a metrics scraper would.

A policy that predicts (a plugin setting ``LLMRequest.predicted_ttft_s`` / ``predicted_itl_s``
while scheduling) is held to its word: each prediction is compared with the request's simulated
TTFT and mean inter-token gap. Workers may differ (`SimSettings.fleet`: speed, KV capacity).
The command line is `kvgate.commands.simulate`.

Determinism: one seed drives the token content, the plugins' random streams and the engines
(which use no randomness); the event heap orders ties by insertion. The same command prints the
same table.
"""

from __future__ import annotations

import gc
import multiprocessing
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from queue import Empty
from typing import Any, TextIO

from kvgate.bench.bounds import WorkerModel
from kvgate.bench.fleet import WorkerSpec
from kvgate.bench.policies import POLICIES, bench_registry
from kvgate.bench.report import Progress, RunRecord
from kvgate.bench.traces import TokenSynth, TraceRequest
from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import PluginContext
from kvgate.scheduling.picker_config import load_epp_config
from kvgate.scheduling.request import LLMRequest, ResponseInfo, SchedulingError, SchedulingResult
from kvgate.scheduling.scheduler import Scheduler
from kvgate.sim.clock import VirtualClock
from kvgate.sim.engine import ContextLengthError, Engine, EngineConfig, SimRequest, StepResult
from kvgate.sim.timing import PolynomialTiming
from kvgate.sim.virtual import VirtualDriver
from kvgate.tokens.hashing import sequence_hashes_of

MOONCAKE_WORKER_TOKENS = 512_000
"""Default KV capacity per worker: ~1,000 blocks of 512 tokens, the setting under which the
Mooncake paper's synthetic trace separates routing policies (random ≈ 0.06 hit rate)."""


@dataclass(frozen=True, slots=True)
class SimSettings:
    workers: int = 8
    block_size: int = 16
    num_gpu_blocks: int | None = None
    """None: `MOONCAKE_WORKER_TOKENS` / block size."""
    event_delay_s: float = 0.0
    scrape_interval_s: float = 0.05
    seed: int = 0
    fleet: tuple[WorkerSpec, ...] | None = None
    """Per worker speed and KV blocks (``workers`` of them); None: all alike, at speed 1."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.event_delay_s < 0 or self.scrape_interval_s <= 0:
            raise ValueError("event delay must be >= 0 and scrape interval > 0")
        if self.fleet is not None and len(self.fleet) != self.workers:
            raise ValueError(f"the fleet lists {len(self.fleet)} workers, not {self.workers}")

    @property
    def gpu_blocks(self) -> int:
        """A worker's KV blocks unless its spec says otherwise."""
        return self.num_gpu_blocks or MOONCAKE_WORKER_TOKENS // self.block_size

    def worker_models(self) -> list[WorkerModel]:
        """Each worker's engine sizing and timing, in fleet order."""
        specs = self.fleet or (WorkerSpec(),) * self.workers
        models = []
        for spec in specs:
            blocks = spec.num_gpu_blocks or self.gpu_blocks
            config = EngineConfig(
                block_size=self.block_size,
                num_gpu_blocks=blocks,
                max_model_len=blocks * self.block_size,
            )
            models.append(WorkerModel(config, PolynomialTiming(speedup=spec.speed)))
        return models


def _run_sync(coro: Coroutine[Any, Any, None]) -> None:
    # The prepare hooks only await when they tokenize, which replay never asks for; driving the
    # coroutine by hand keeps the replay free of an event loop.
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise RuntimeError("a prepare hook awaited during replay")


@dataclass(slots=True)
class _Flight:
    llm: LLMRequest
    result: SchedulingResult
    arrival: float
    last_token: float = 0.0
    first_token: float = 0.0


ProgressSink = Callable[[int], None]
"""Told how many requests of the replay are done (served or refused)."""

ExtraPlugins = Sequence[tuple[str, str]]
"""Plugin types to add to the benchmark registry, as (type name, ``"module:Class"``): a policy
under development (or a test's plugin) can be replayed before it is registered. Names, not
classes, so they cross to worker processes."""


class Replay:
    """One policy over one trace on a fresh simulated fleet."""

    def __init__(
        self,
        requests: Sequence[TraceRequest],
        config_text: str,
        settings: SimSettings,
        synth: TokenSynth,
        progress: ProgressSink | None = None,
        *,
        plugins: ExtraPlugins = (),
    ) -> None:
        self.requests = requests
        self.settings = settings
        self.synth = synth
        self.progress = progress
        bs = settings.block_size
        models = settings.worker_models()
        self.engines = [Engine(m.config, m.timing) for m in models]
        self.clock = VirtualClock()
        self.driver = VirtualDriver(self.engines, self.clock, on_step=self._on_step)
        self.endpoints = [
            Endpoint(f"10.0.{i // 250}.{i % 250 + 1}:8000") for i in range(settings.workers)
        ]
        for ep, model in zip(self.endpoints, models, strict=True):
            ep.metrics.block_size = bs
            ep.metrics.num_gpu_blocks = model.config.num_gpu_blocks
        context = PluginContext(
            env={"DYNAMO_KV_BLOCK_SIZE": str(bs)},
            now=self.clock.now,
            rng_seed=settings.seed,
            requests_carry_tokens=True,
        )
        registry = bench_registry().extended(plugins)
        loaded = load_epp_config(config_text, registry=registry, context=context)
        self.scheduler: Scheduler = loaded.scheduler()
        self._event_targets = context.kv_events
        self._shared_load = context.shared_load
        self.record = RunRecord(per_worker={ep.address: 0 for ep in self.endpoints})
        self._flights: dict[str, _Flight] = {}
        self._done = 0

    def run(self) -> RunRecord:
        started = time.perf_counter()
        driver = self.driver
        for i, r in enumerate(self.requests):
            driver.call_at(r.timestamp_ms / 1000.0, partial(self._arrive, i))
        self._scrape()
        driver.run()
        self.record.wall_s = time.perf_counter() - started
        return self.record

    # -- the gateway's side ----------------------------------------------------------------

    def _scrape(self) -> None:
        now = self.clock.now()
        for engine, ep in zip(self.engines, self.endpoints, strict=True):
            m = ep.metrics
            m.waiting = engine.num_waiting
            m.running = engine.num_running
            m.kv_usage = engine.cache.usage
            m.updated_at = now
            m.stale = False
            # As the EPP's scraper does: what the gateway had booked when the metrics were read.
            if self._shared_load:
                m.booked_prefilling = self._shared_load.prefilling(ep.address)
        if self._done < len(self.requests):
            self.driver.call_at(now + self.settings.scrape_interval_s, self._scrape)

    def _arrive(self, index: int) -> None:
        trace = self.requests[index]
        request_id = f"r{index}"
        now = self.clock.now()
        tokens = self.synth.tokens(trace)
        bs = self.settings.block_size
        llm = LLMRequest(
            request_id=request_id,
            model="trace",
            kind=None,
            body={"prompt": tokens, "max_tokens": trace.output_length},
            headers={},
            stream=True,
            tokens=tokens,
            block_hashes=sequence_hashes_of(tokens, bs),
            block_size=bs,
        )
        scheduler = self.scheduler
        record = self.record
        try:
            _run_sync(scheduler.prepare(llm, self.endpoints))
            result = scheduler.schedule(llm, self.endpoints)
        except SchedulingError as err:
            record.error(f"scheduling {err.status}")
            self._finished()
            return
        scheduler.pre_request(llm, result)
        address = result.endpoint.address
        worker = self.endpoints.index(result.endpoint)
        sim = SimRequest(request_id, tokens, max_tokens=trace.output_length, ignore_eos=True)
        try:
            self.driver.submit(worker, sim)
        except ContextLengthError:
            record.error("context length")
            scheduler.response_complete(llm, result, ResponseInfo(status=400, aborted=True))
            self._finished()
            return
        record.per_worker[address] += 1
        record.first_arrival_s = min(record.first_arrival_s, now)
        self._flights[request_id] = _Flight(llm, result, now)

    def _on_step(self, index: int, step: StepResult) -> None:
        end = step.end
        flights = self._flights
        record = self.record
        for sim in step.outputs:
            flight = flights[sim.request_id]
            if sim.num_output_tokens == 1:
                ttft = end - flight.arrival
                record.ttft_s.append(ttft)
                flight.first_token = end
                predicted = flight.llm.predicted_ttft_s
                if predicted is not None:
                    record.ttft_prediction_error.append(abs(predicted - ttft) / ttft)
                self.scheduler.response_streaming(flight.llm, flight.result, True)
            else:
                record.itl_s.append(end - flight.last_token)
            flight.last_token = end
            if sim.finish_reason is not None:
                self._complete(flight, sim, end)
        if step.events and self._event_targets:
            events = step.events
            address = self.endpoints[index].address
            delay = self.settings.event_delay_s
            if delay:
                self.driver.call_at(end + delay, lambda: self._apply(address, events))
            else:
                self._apply(address, events)

    def _apply(self, address: str, events: list[Any]) -> None:
        targets = self._event_targets
        for event in events:
            targets.apply_event(address, event)

    def _complete(self, flight: _Flight, sim: SimRequest, end: float) -> None:
        del self._flights[sim.request_id]
        record = self.record
        record.e2e_s.append(end - flight.arrival)
        record.prompt_tokens += sim.num_prompt_tokens
        record.cached_tokens += sim.num_cached_tokens
        record.output_tokens += sim.num_output_tokens
        record.last_finish_s = max(record.last_finish_s, end)
        predicted = flight.llm.predicted_itl_s
        gaps = sim.num_output_tokens - 1
        if predicted is not None and gaps > 0:
            itl = (end - flight.first_token) / gaps
            record.itl_prediction_error.append(abs(predicted - itl) / itl)
        info = ResponseInfo(
            status=200,
            streaming=True,
            served_endpoint=flight.result.endpoint.address,
            prompt_tokens=sim.num_prompt_tokens,
            completion_tokens=sim.num_output_tokens,
            cached_tokens=sim.num_cached_tokens,
        )
        self.scheduler.response_complete(flight.llm, flight.result, info)
        self._finished()

    def _finished(self) -> None:
        self._done += 1
        if self.progress is not None:
            self.progress(self._done)


def resolve_policy(name: str) -> str:
    """The EndpointPickerConfig text of a policy name or ``config:FILE``."""
    if name.startswith("config:"):
        return Path(name[len("config:") :]).read_text(encoding="utf-8")
    config = POLICIES.get(name)
    if config is None:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(POLICIES)}, config:FILE)")
    return config


def replay_policy(
    requests: Sequence[TraceRequest],
    config_text: str,
    settings: SimSettings,
    synth: TokenSynth | None = None,
    progress: ProgressSink | None = None,
    *,
    plugins: ExtraPlugins = (),
) -> RunRecord:
    """One policy's replay, with the cyclic garbage collector out of the way."""
    # Replay allocates millions of long-lived small objects (token lists, index entries, event
    # batches) and frees them in order; the cyclic collector would rescan them again and again
    # and find nothing to collect, so it is paused for the run and the survivors frozen.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        synth = synth or TokenSynth(settings.seed)
        return Replay(requests, config_text, settings, synth, progress, plugins=plugins).run()
    finally:
        gc.enable()
        gc.unfreeze()


# Per worker process: the queue progress goes to, as (policy, done) pairs.
_CHILD_STATE: dict[str, Any] = {}


def _init_child(queue: Any) -> None:
    _CHILD_STATE["queue"] = queue


def _child_replay(
    name: str,
    requests: Sequence[TraceRequest],
    config_text: str,
    settings: SimSettings,
    plugins: ExtraPlugins,
) -> RunRecord:
    queue = _CHILD_STATE["queue"]
    step = max(1, len(requests) // 100)
    # One token table per process, reused by the policies it replays.
    synth = _CHILD_STATE.get("synth")
    if synth is None or synth.seed != settings.seed:
        synth = _CHILD_STATE["synth"] = TokenSynth(settings.seed)

    def report(done: int) -> None:
        if done % step == 0 or done == len(requests):
            queue.put((name, done))

    return replay_policy(requests, config_text, settings, synth, report, plugins=plugins)


def simulate(
    requests: Sequence[TraceRequest],
    policies: Sequence[str],
    settings: SimSettings,
    *,
    jobs: int = 1,
    progress: TextIO | None = None,
    plugins: ExtraPlugins = (),
) -> dict[str, RunRecord]:
    """Replay ``requests`` once per policy; records by policy name, in the order given.

    With ``jobs`` > 1 policies run in that many worker processes at once (each replay is
    independent and seeded alike, so the records are the same as with one job)."""
    configs = {name: resolve_policy(name) for name in policies}
    bars = {
        name: Progress(name, len(requests), progress) if progress is not None else None
        for name in configs
    }
    jobs = max(1, min(jobs, len(configs)))
    if jobs == 1:
        synth = TokenSynth(settings.seed)
        records: dict[str, RunRecord] = {}
        for name, text in configs.items():
            bar = bars[name]
            records[name] = replay_policy(
                requests,
                text,
                settings,
                synth,
                None if bar is None else bar.update,
                plugins=plugins,
            )
        return records
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_init_child, initargs=(queue,)
    ) as pool:
        futures = {
            name: pool.submit(_child_replay, name, requests, text, settings, tuple(plugins))
            for name, text in configs.items()
        }
        pending = set(futures.values())
        while pending:
            _, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(queue, bars)
        _drain(queue, bars)
        return {name: future.result() for name, future in futures.items()}


def _drain(queue: Any, bars: dict[str, Progress | None]) -> None:
    while True:
        try:
            name, done = queue.get_nowait()
        except Empty:
            return
        bar = bars.get(name)
        if bar is not None:
            bar.update(done)
