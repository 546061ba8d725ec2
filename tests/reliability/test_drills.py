"""Fault drills on the real path: `kvgate up` (a real Envoy, the EPP as a process, a real
nats-server with replicas) over simulated engines that each run as a process of their own, so one
can be killed, frozen or cut off alone. Each drill ends with the picker's per-request bookkeeping
back to 0 and a shared prefix routed where it is cached, on a live worker."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import signal
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
import zmq.asyncio

from kvgate.events.types import BlockStored
from kvgate.gateway.client import ChatResult, chat
from kvgate.gateway.local import RunningGateway, free_port
from kvgate.tokens import ModelTokenizer
from tests.events.publisher import TestPublisher, stored
from tests.reliability.choices import Choices
from tests.reliability.drills import (
    SYSTEM,
    BackgroundLoop,
    Outcome,
    SimProcess,
    TcpLink,
    body,
    bookkeeping,
    decisions,
    gateway_over,
    get_json,
    kv_events,
    metric,
    report,
    routes_by_prefix,
    send_all,
    send_while,
    sim_processes,
    wait_for,
    wait_idle,
)
from tests.reliability.events_fuzz import messages

pytestmark = [pytest.mark.envoy, pytest.mark.slow]


def test_a_worker_killed_mid_stream(qwen3_dir: Path, tmp_path: Path) -> None:
    with (
        sim_processes(3, qwen3_dir, tmp_path, speedup=1.0) as sims,
        gateway_over(sims, qwen3_dir, tmp_path) as (_, running),
    ):
        victim = sims[0].address

        async def load() -> tuple[int, Outcome]:
            # Nine long streams with distinct prompts spread over the three workers by load.
            bodies = [body(f"Tell a long story {i}.", system=f"Story teller {i}. " + SYSTEM,
                           stream=True, max_tokens=600) for i in range(9)]  # fmt: skip
            before = decisions(running)
            task = asyncio.create_task(send_all(running.url, bodies, rate=30.0))
            await asyncio.sleep(1.0)
            routed = decisions(running) - before
            assert routed.total() == 9, routed
            sims[0].signal(signal.SIGKILL)
            return routed[victim], await task

        on_victim, outcome = asyncio.run(load())
        # A stream is whole when its last event, the usage, arrived; a cut one ends without it
        # (or with a connection error).
        whole = [r for r in outcome.results if r.status == 200 and r.completion_tokens]
        cut = len(outcome.status_of) - len(whole)
        report("worker killed mid-stream", streams=9, on_killed_worker=on_victim,
               whole=len(whole), cut=cut)  # fmt: skip
        assert on_victim >= 1, "no stream was on the killed worker"
        assert cut == on_victim and victim not in {r.worker for r in whole}, outcome.results
        wait_idle(running)
        wait_for(lambda: metric(running, "inference_pool_ready_pods") == 2, "the dead worker")
        routes_by_prefix(running.url, [sims[1].address, sims[2].address])
        wait_idle(running)


@pytest.mark.parametrize("mode", ["FailOpen", "FailClose"])
def test_the_picker_killed_under_load(qwen3_dir: Path, tmp_path: Path, mode: str) -> None:
    with (
        sim_processes(2, qwen3_dir, tmp_path) as sims,
        gateway_over(sims, qwen3_dir, tmp_path, failure_mode=mode) as (local, running),
    ):
        workers = [s.address for s in sims]

        async def load() -> tuple[Outcome, float, float, float]:
            # 10 requests a second, every other one streaming; the picker is killed after 2 s
            # and started again 1 s later (it is back once it loaded its tokenizer); the load
            # goes on for 3 s more.
            bodies = (body(f"Question {i} under load?", stream=i % 2 == 0, max_tokens=12)
                      for i in itertools.count())  # fmt: skip
            stop_at = math.inf
            task = asyncio.create_task(
                send_while(running.url, bodies, lambda: time.monotonic() < stop_at, rate=10.0)
            )
            await asyncio.sleep(2.0)
            await asyncio.to_thread(local.supervisor.kill, running.epp)
            killed = time.monotonic()
            await asyncio.sleep(1.0)
            restarting = time.monotonic()
            await asyncio.to_thread(local.restart_epp)
            back = time.monotonic()
            stop_at = back + 3.0
            return await task, killed, restarting, back

        outcome, killed, restarting, back = asyncio.run(load())
        sent = list(zip(outcome.sent_at, outcome.status_of, strict=True))
        before = [s for t, s in sent if t < killed - 0.5]
        # Only the requests sent before the new picker was even started are sure to find none:
        # it serves a moment before restart_epp's readiness poll notices.
        during = [s for t, s in sent if killed <= t < restarting]
        restart = [s for t, s in sent if restarting <= t < back]
        after = [s for t, s in sent if t > back + 1.0]
        report(f"picker killed under load ({mode})", requests=len(sent),
               outage_s=round(back - killed, 1), before=dict(Counter(before)),
               down=dict(Counter(during)), restarting=dict(Counter(restart)),
               after=dict(Counter(after)))  # fmt: skip
        assert set(before) == {200} and set(after) == {200}, (before, after)
        if mode == "FailOpen":
            assert set(outcome.status_of) == {200}, outcome.errors[:3]
        else:
            assert during and set(during) <= {500, 502, 503}, during
        assert set(outcome.workers) <= set(workers)
        wait_idle(running)
        routes_by_prefix(running.url, workers)
        wait_idle(running)


@pytest.mark.nats
def test_nats_lost_and_back_with_two_replicas(qwen3_dir: Path, tmp_path: Path) -> None:
    with (
        sim_processes(2, qwen3_dir, tmp_path, speedup=1.0) as sims,
        gateway_over(sims, qwen3_dir, tmp_path, epp_replicas=2) as (local, running),
    ):
        workers = [s.address for s in sims]
        nats = local.nats_child
        assert nats is not None

        def states() -> list[str]:
            return [get_json(url)["replica_sync"]["state"] for url in running.epp_healthz_urls]

        def synced() -> bool:
            for url, other in zip(running.epp_healthz_urls, reversed(running.replica_ids),
                                  strict=True):  # fmt: skip
                status = get_json(url)["replica_sync"]
                peer = status["peers"].get(other)
                if status["state"] != "connected" or not peer or not peer["synced"]:
                    return False
            return True

        async def drill() -> tuple[Outcome, Outcome, float, int]:
            # Long streams are in flight on both replicas when NATS goes, and end while it is
            # gone: their frees cannot be published, yet no replica may keep the other's.
            streams = [body(f"Stream {i} across the outage.", stream=True, max_tokens=700)
                       for i in range(6)]  # fmt: skip
            long_ones = asyncio.create_task(send_all(running.url, streams, rate=10.0))
            await asyncio.sleep(1.0)
            in_flight = sum(b["own_inflight_bookings"] for b in bookkeeping(running))
            await asyncio.to_thread(local.supervisor.kill, nats)
            lost = time.monotonic()
            await asyncio.to_thread(
                wait_for, lambda: states() == ["disconnected"] * 2, "replicas to see NATS go"
            )
            during = await send_all(
                running.url, [body(f"While NATS is down {i}?") for i in range(10)], rate=10.0
            )
            first = await long_ones
            local.supervisor.restart(nats)
            await asyncio.to_thread(wait_for, synced, "replicas to resync", 30.0)
            return first, during, time.monotonic() - lost, in_flight

        streamed, during, outage_s, in_flight = asyncio.run(drill())
        dropped = [metric(running, "kvgate_replica_sync_dropped_ops_total", r) for r in (0, 1)]
        report("NATS lost and back (2 replicas)", outage_s=round(outage_s, 1), in_flight=in_flight,
               long_streams=dict(streamed.statuses), during_outage=dict(during.statuses),
               dropped_sync_ops=dropped)  # fmt: skip
        assert in_flight == 6  # the long streams were all under way when NATS went
        assert streamed.statuses == {200: 6}, streamed.errors[:3]
        assert during.statuses == {200: 10}, during.errors[:3]
        assert sum(dropped) > 0  # the outage really cost messages
        wait_idle(running)
        routes_by_prefix(running.url, workers)
        wait_idle(running)


@pytest.mark.parametrize("replay", [True, False], ids=["with-replay", "without-replay"])
def test_a_kv_event_gap(qwen3_dir: Path, tmp_path: Path, replay: bool) -> None:
    """Events lost on the way (the link between engines and picker cut, then restored): with the
    engine's replay socket the picker refills what it missed; without, it drops that worker's
    blocks rather than route on a stale view."""
    background = BackgroundLoop()
    try:
        with sim_processes(2, qwen3_dir, tmp_path) as sims:
            links = [TcpLink(background, s.events) for s in sims]
            entries = []
            for sim, link in zip(sims, links, strict=True):
                entry = {**sim.entry(), "events": f"tcp://127.0.0.1:{link.port}"}
                if not replay:
                    del entry["replay"]
                entries.append(entry)
            try:
                with gateway_over(sims, qwen3_dir, tmp_path, entries=entries) as (_, running):
                    gap_drill(running, sims, links, replay)
            finally:
                for link in links:
                    link.cut()
    finally:
        background.close()


def gap_drill(running: RunningGateway, sims: list[SimProcess], links: list[TcpLink],
              replay: bool) -> None:  # fmt: skip
    workers = [s.address for s in sims]
    # Both engines publish, and the picker follows both streams, before anything is lost.
    for i, worker in enumerate(workers):
        heard = kv_events(running)["events"]
        warm = asyncio.run(chat_to(worker, body("Warm up?", system=f"Engine {i}. " * 40)))
        assert warm.status == 200
        wait_for(lambda h=heard: kv_events(running)["events"] > h, f"events of {worker}")
    lost_system = "Told while the picker heard nothing. " + SYSTEM

    async def ask(question: str, url: str = running.url) -> ChatResult:
        async with aiohttp.ClientSession() as session:
            return await chat(session, url, body(question, system=lost_system))

    for link in links:
        link.cut()
    lost = asyncio.run(ask("A question whose blocks the picker never hears of?"))
    assert lost.status == 200 and lost.worker in workers, lost
    for link in links:
        link.restore()
    time.sleep(1.0)  # the picker's SUB sockets reconnect
    before = kv_events(running)
    # The engine publishes again: its next batch shows the picker what it missed.
    other = asyncio.run(chat_to(lost.worker, body("Something else?", system="Unrelated. " * 40)))
    assert other.status == 200
    wait_for(lambda: kv_events(running)["gaps"] > before["gaps"], "the gap to be seen")
    key = "replays_ok" if replay else "resets"
    wait_for(lambda: kv_events(running)[key] > before[key], f"{key} after the gap")
    predicted = metric(running, "kvgate_predicted_cached_tokens_total")
    follow = asyncio.run(ask("And a follow-up to the lost question?"))
    predicted = metric(running, "kvgate_predicted_cached_tokens_total") - predicted
    events = kv_events(running)
    report(f"KV-event gap ({'with' if replay else 'without'} replay)",
           gaps=events["gaps"] - before["gaps"], replays_ok=events["replays_ok"],
           resets=events["resets"], follow_up_predicted_cached=int(predicted),
           follow_up_engine_cached=follow.cached_tokens)  # fmt: skip
    assert follow.status == 200
    if replay:
        # The refilled blocks route the follow-up to the worker that really caches them.
        assert follow.worker == lost.worker
        assert predicted > 500 and follow.cached_tokens and follow.cached_tokens > 500
    else:
        assert predicted == 0  # forgotten, not guessed
    wait_idle(running)
    routes_by_prefix(running.url, workers)  # the index follows the streams again
    wait_idle(running)


async def chat_to(worker: str, payload: dict[str, object]) -> ChatResult:
    """Straight to a worker, past the gateway."""
    async with aiohttp.ClientSession() as session:
        return await chat(session, f"http://{worker}", payload)


def test_garbage_on_the_event_socket(qwen3_dir: Path, tmp_path: Path) -> None:
    """A worker's event socket sends malformed messages (the KV-event fuzzer's: bad frames, bad
    seq frames, damaged and random payloads), then good batches. The picker survives it, counts
    the malformed, and routes on the good ones. (Bytes that are not ZMQ at all: see
    test_event_socket.py.)"""
    background = BackgroundLoop()
    try:
        with sim_processes(2, qwen3_dir, tmp_path) as sims:
            events_port = free_port()
            entries = [sims[0].entry(),
                       {**sims[1].entry(), "events": f"tcp://127.0.0.1:{events_port}"}]  # fmt: skip
            del entries[1]["replay"]
            with gateway_over(sims, qwen3_dir, tmp_path, entries=entries) as (_, running):
                garbage_drill(running, sims, background, events_port, qwen3_dir)
    finally:
        background.close()


def garbage_drill(running: RunningGateway, sims: list[SimProcess], background: BackgroundLoop,
                  port: int, qwen3_dir: Path) -> None:  # fmt: skip
    target = sims[1].address
    rng = random.Random(5)
    garbage = [
        message.frames
        for _ in range(300)
        for message in messages(Choices(rng.randbytes(2000)), damage_frames=True)
    ]
    prompt = body("Which blocks did the garbage spare?", system="Spared. " * 120)
    tokens = ModelTokenizer.load(str(qwen3_dir)).tokenize_chat(prompt)
    blocks = len(tokens) // 16
    good = stored(list(range(1, blocks + 1)), block_size=16, tokens=tokens[: blocks * 16])
    heard = kv_events(running)["events"]
    background.run(publish(port, garbage, good))
    wait_for(lambda: kv_events(running)["events"] > heard, "the good batch")
    predicted = metric(running, "kvgate_predicted_cached_tokens_total")
    routed = asyncio.run(send_all(running.url, [prompt]))
    predicted = metric(running, "kvgate_predicted_cached_tokens_total") - predicted
    events = kv_events(running)
    report("garbage on the event socket", messages=len(garbage),
           malformed=events["malformed"], resets=events["resets"],
           block_size_mismatches=events["block_size_mismatches"],
           internal_errors=events["internal_errors"], sink_errors=events["sink_errors"],
           predicted_cached_after=int(predicted))  # fmt: skip
    assert events["malformed"] > 0
    assert events["internal_errors"] == 0 and events["sink_errors"] == 0
    assert routed.workers == {target: 1}, routed.workers
    assert predicted == blocks * 16
    wait_idle(running)


async def publish(port: int, garbage: list[list[bytes]], good: BlockStored) -> None:
    """The garbage, then one good batch, from a publisher bound on ``port``."""
    context = zmq.asyncio.Context()
    try:
        async with TestPublisher(context, bind=f"tcp://127.0.0.1:{port}") as publisher:
            await publisher.wait_subscribed(timeout=10.0)
            for frames in garbage:
                publisher.send_frames(frames)
            publisher.publish([good])
            await asyncio.sleep(0.5)  # a closing PUB drops what it has not sent
    finally:
        context.destroy(linger=0)


def test_a_worker_whose_metrics_hang(qwen3_dir: Path, tmp_path: Path) -> None:
    """A frozen worker (SIGSTOP): its port still accepts connections, nothing ever answers, so
    every scrape of its /metrics hangs until the scraper's timeout. It is routed around without
    the picker piling up tasks or sockets, and used again once it answers."""
    with (
        sim_processes(3, qwen3_dir, tmp_path) as sims,
        gateway_over(sims, qwen3_dir, tmp_path) as (_, running),
    ):
        workers = [s.address for s in sims]
        frozen = sims[2]
        routes_by_prefix(running.url, workers)
        frozen.signal(signal.SIGSTOP)
        try:
            wait_for(lambda: metric(running, "inference_pool_ready_pods") == 2, "routing around")

            async def load() -> tuple[Outcome, list[float], list[float]]:
                tasks: list[float] = []
                fds: list[float] = []

                async def sample() -> None:
                    for _ in range(10):
                        tasks.append(metric(running, "kvgate_asyncio_tasks"))
                        fds.append(metric(running, "process_open_fds"))
                        await asyncio.sleep(1.0)

                sampler = asyncio.create_task(sample())
                bodies = [body(f"While one worker hangs {i}?") for i in range(50)]
                outcome = await send_all(running.url, bodies, rate=5.0)
                await sampler
                return outcome, tasks, fds

            outcome, tasks, fds = asyncio.run(load())
        finally:
            frozen.signal(signal.SIGCONT)
        report("metrics endpoint that hangs", requests=50, statuses=dict(outcome.statuses),
               workers=dict(outcome.workers), asyncio_tasks=f"{min(tasks):.0f}..{max(tasks):.0f}",
               open_fds=f"{min(fds):.0f}..{max(fds):.0f}")  # fmt: skip
        assert outcome.statuses == {200: 50}, outcome.errors[:3]
        assert frozen.address not in outcome.workers
        assert max(tasks) - min(tasks) <= 5 and max(fds) - min(fds) <= 5, (tasks, fds)
        wait_for(lambda: metric(running, "inference_pool_ready_pods") == 3, "the worker back")
        back = asyncio.run(send_all(running.url, [body(f"Back {i}?", system=f"New {i}. " * 40)
                                                  for i in range(12)], rate=4.0))  # fmt: skip
        assert back.statuses == {200: 12} and back.workers[frozen.address] > 0, back.workers
        wait_idle(running)
        routes_by_prefix(running.url, workers)
        wait_idle(running)
