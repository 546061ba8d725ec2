"""End to end: a real Envoy, the real EPP and simulated engines as separate processes, real
sockets, requests from an HTTP client — the path `kvgate up` runs."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvgate.errors import StartupError
from kvgate.gateway import local
from kvgate.gateway.client import ChatResult
from kvgate.gateway.local import LocalGateway, LocalGatewayConfig, RunningGateway, free_port
from kvgate.gateway.supervisor import free_port_block
from tests.gateway.utils import MODEL, get, metric_value, send

pytestmark = pytest.mark.envoy

SYSTEM = "You are the end-to-end test assistant. " + " ".join(
    f"Fact {i}: the gateway keeps prefix {i} warm." for i in range(150)
)


def body(question: str, *, system: str | None = SYSTEM, stream: bool = False) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    out: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": 6}
    if stream:
        out.update(stream=True, stream_options={"include_usage": True})
    return out


@pytest.fixture(scope="module")
def kv_gateway(
    qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    config = LocalGatewayConfig(
        workers=3,
        port=free_port(),
        tokenizer=str(qwen3_dir),
        speedup=20.0,
        run_dir=tmp_path_factory.mktemp("kv-gateway"),
    )
    with LocalGateway(config) as running:
        yield running


def test_shared_prefix_lands_on_the_same_worker_with_cached_tokens(
    kv_gateway: RunningGateway,
) -> None:
    first = send(kv_gateway.url, body("What is the first fact?"))
    assert first.status == 200, first.error
    assert first.worker in kv_gateway.workers
    deadline = time.monotonic() + 10
    second = send(kv_gateway.url, body("And what is the second fact?"))
    # KV events travel engine → EPP asynchronously; the first follow-up may beat them.
    while second.cached_tokens in (None, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
        second = send(kv_gateway.url, body("And what is the second fact?"))
    assert second.worker == first.worker
    assert second.cached_tokens is not None and second.cached_tokens > 1000


def test_cache_salt_is_honoured_from_prediction_to_engine(kv_gateway: RunningGateway) -> None:
    """A salted prompt is cached apart (the simulated engines key the first block with the salt,
    as vLLM does) and the picker predicts exactly that: hits for the same salt, none for the
    unsalted prompt or another salt."""
    system = "Salted tenants keep their own cache. " * 60
    predicted = "kvgate_predicted_cached_tokens_total"

    def ask(salt: str | None) -> tuple[ChatResult, float]:
        payload = body("Whose cache is this?", system=system)
        if salt is not None:
            payload["cache_salt"] = salt
        before = metric_value(get(kv_gateway.epp_metrics_url), predicted)
        result = send(kv_gateway.url, payload)
        assert result.status == 200, result.error
        return result, metric_value(get(kv_gateway.epp_metrics_url), predicted) - before

    first, _ = ask("tenant-a")
    deadline = time.monotonic() + 10
    again, predicted_hit = ask("tenant-a")
    while (again.cached_tokens in (None, 0) or predicted_hit == 0) and time.monotonic() < deadline:
        time.sleep(0.2)  # KV events reach the picker asynchronously
        again, predicted_hit = ask("tenant-a")
    assert again.worker == first.worker
    assert again.cached_tokens is not None and again.cached_tokens > 400
    assert predicted_hit == again.cached_tokens  # full blocks, predicted as the engine served
    for salt in (None, "tenant-b"):
        other, predicted_other = ask(salt)
        assert predicted_other == 0
        assert other.cached_tokens == 0


def test_streaming_through_envoy_and_epp_sees_first_token_and_completion(
    kv_gateway: RunningGateway,
) -> None:
    def settled() -> str:
        # The client has a response's last chunk before the EPP has processed its end (Envoy
        # forwards the chunk, then tells the EPP): wait for every request to end, bounded.
        deadline = time.monotonic() + 5
        while True:
            metrics = get(kv_gateway.epp_metrics_url)
            done = metric_value(metrics, "inference_objective_running_requests") == 0
            if done or time.monotonic() > deadline:
                return metrics
            time.sleep(0.05)

    before = settled()  # an earlier test's stream may still be reported
    result = send(kv_gateway.url, body("Stream me a short answer.", stream=True))
    assert result.status == 200, result.error
    assert result.chunks >= 3  # one SSE event per token, plus usage
    assert result.completion_tokens == 6
    after = settled()
    ttft = "inference_objective_request_ttft_seconds_count"
    assert metric_value(after, ttft) == metric_value(before, ttft) + 1
    assert metric_value(after, "inference_objective_running_requests") == 0


def test_models_and_completions_pass_through(kv_gateway: RunningGateway) -> None:
    with urllib.request.urlopen(f"{kv_gateway.url}/v1/models", timeout=10) as resp:
        assert resp.status == 200
        assert MODEL in resp.read().decode()
    request = urllib.request.Request(
        f"{kv_gateway.url}/v1/completions",
        data=b'{"model": "%s", "prompt": "Once upon a time", "max_tokens": 3}' % MODEL.encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200
        assert b'"text_completion"' in resp.read()


@pytest.mark.parametrize(
    "header",
    [
        "x-gateway-destination-endpoint",
        "x-worker-instance-id",
        "x-prefiller-host-port",
        "x-dynamo-routing-mode",
    ],
)
def test_client_routing_headers_cannot_steer(kv_gateway: RunningGateway, header: str) -> None:
    result = send(kv_gateway.url, body("steer me", system=None), {header: "127.0.0.1:1"})
    assert result.status == 200, result.error
    assert result.worker in kv_gateway.workers


def test_bad_requests_get_json_errors_through_envoy(kv_gateway: RunningGateway) -> None:
    request = urllib.request.Request(
        f"{kv_gateway.url}/v1/chat/completions",
        data=b"{not json",
        headers={"content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400
    assert b"not valid JSON" in err.value.read()


def test_standard_mode_spreads_evenly(qwen3_dir: Path, tmp_path: Path) -> None:
    config = LocalGatewayConfig(
        workers=3, port=free_port(), mode="standard", tokenizer=str(qwen3_dir),
        speedup=20.0, run_dir=tmp_path,
    )  # fmt: skip
    with LocalGateway(config) as running:
        served = Counter(send(running.url, body(f"q{i}")).worker for i in range(9))
    assert sorted(served.values()) == [3, 3, 3]
    assert set(served) == set(running.workers)


def _sim_process(tokenizer: str, port: int, events: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
        [sys.executable, "-X", "faulthandler", "-m", "kvgate", "sim", "--workers", "1",
         "--base-port", str(port),
         "--events-base-port", str(events), "--replay-base-port", str(events + 1),
         "--tokenizer", tokenizer, "--model", MODEL, "--speedup", "20"],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def _sim_ports(count: int) -> list[tuple[int, int]]:
    """(http, events) per simulator, all distinct: each simulator also binds events + 1 for
    replay, which two independent free_port() calls could hand to another simulator."""
    reserved: set[int] = set()
    return [(free_port_block(1, reserved), free_port_block(2, reserved)) for _ in range(count)]


def _wait_log(
    log: Path, needle: str, process: subprocess.Popen[bytes], timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while needle not in log.read_text():
        if process.poll() is not None:
            raise AssertionError(
                f"simulator exited ({process.returncode}) before {needle!r}; "
                f"log:\n{log.read_text()}"
            )
        if time.monotonic() > deadline:
            # Once seen in CI: a simulator silent for 60 s. SIGABRT makes faulthandler write
            # every thread's stack to its log, so the failure says where it hung.
            if process.poll() is None:
                process.send_signal(signal.SIGABRT)
                process.wait(timeout=10)
            raise AssertionError(
                f"no {needle!r} after {timeout:.0f} s (exit code {process.returncode}); "
                f"log:\n{log.read_text()}"
            )
        time.sleep(0.1)


def test_killed_worker_is_no_longer_picked_and_its_state_goes(
    qwen3_dir: Path, tmp_path: Path
) -> None:
    ports = _sim_ports(2)
    sims = [
        _sim_process(str(qwen3_dir), http, ev, tmp_path / f"sim{i}.log")
        for i, (http, ev) in enumerate(ports)
    ]
    try:
        for i in range(2):
            _wait_log(tmp_path / f"sim{i}.log", "ready workers=", sims[i])
        entries: list[dict[str, object]] = [
            {"address": f"127.0.0.1:{http}", "events": f"tcp://127.0.0.1:{ev}"}
            for http, ev in ports
        ]
        config = LocalGatewayConfig(
            endpoint_entries=entries, port=free_port(), tokenizer=str(qwen3_dir),
            run_dir=tmp_path / "gw",
        )  # fmt: skip
        with LocalGateway(config) as running:
            first = send(running.url, body("Which worker holds me?"))
            assert first.status == 200
            victim = sims[running.workers.index(str(first.worker))]
            victim.kill()
            victim.wait(timeout=10)
            time.sleep(3.0)  # metrics go stale after 2 s without an answer
            for i in range(4):
                result = send(running.url, body(f"Which worker holds me? {i}"))
                assert result.status == 200, result.error
                assert result.worker != first.worker
            text = get(running.epp_metrics_url)
            assert metric_value(text, "inference_pool_ready_pods") == 1
    finally:
        for sim in sims:
            if sim.poll() is None:
                sim.kill()
            sim.wait(timeout=10)


def test_workers_from_an_endpoints_file_each_with_its_own_event_port(
    qwen3_dir: Path, tmp_path: Path
) -> None:
    """Engines on one host publish KV events on different ports, which only an endpoints file
    can say (``--endpoint-events-port`` is one port for every worker)."""
    ports = _sim_ports(2)
    sims = [
        _sim_process(str(qwen3_dir), http, ev, tmp_path / f"sim{i}.log")
        for i, (http, ev) in enumerate(ports)
    ]
    try:
        for i in range(2):
            _wait_log(tmp_path / f"sim{i}.log", "ready workers=", sims[i])
        endpoints = tmp_path / "endpoints.yaml"
        endpoints.write_text(
            "".join(
                f"- address: 127.0.0.1:{http}\n  events: tcp://127.0.0.1:{ev}\n"
                for http, ev in ports
            )
        )
        config = LocalGatewayConfig(
            endpoints_file=endpoints, port=free_port(), tokenizer=str(qwen3_dir),
            run_dir=tmp_path / "gw",
        )  # fmt: skip
        with LocalGateway(config) as running:
            assert running.workers == [f"127.0.0.1:{http}" for http, _ in ports]
            assert not (tmp_path / "gw" / "endpoints.json").exists()  # the EPP reads the file
            first = send(running.url, body("Which worker holds me?"))
            assert first.status == 200, first.error
            deadline = time.monotonic() + 10
            second = send(running.url, body("And now?"))
            while second.cached_tokens in (None, 0) and time.monotonic() < deadline:
                time.sleep(0.2)
                second = send(running.url, body("And now?"))
            assert second.worker == first.worker
            assert second.cached_tokens is not None and second.cached_tokens > 1000
    finally:
        for sim in sims:
            if sim.poll() is None:
                sim.kill()
            sim.wait(timeout=10)


def test_an_invalid_endpoints_file_stops_start_up(qwen3_dir: Path, tmp_path: Path) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("- address: worker-0:8000\n")
    config = LocalGatewayConfig(
        endpoints_file=endpoints, port=free_port(), tokenizer=str(qwen3_dir), run_dir=tmp_path
    )
    with pytest.raises(StartupError, match=r"endpoints file: .*entry 0.*worker-0"):
        LocalGateway(config).start()


@pytest.mark.parametrize(("mode", "status_when_down"), [("FailClose", 500), ("FailOpen", 200)])
def test_epp_failure_mode_and_recovery(
    qwen3_dir: Path, tmp_path: Path, mode: str, status_when_down: int
) -> None:
    config = LocalGatewayConfig(
        workers=2, port=free_port(), tokenizer=str(qwen3_dir), speedup=20.0,
        failure_mode=mode, run_dir=tmp_path,  # type: ignore[arg-type]
    )  # fmt: skip
    gateway = LocalGateway(config)
    with gateway as running:
        assert send(running.url, body("before")).status == 200
        epp = running.children["epp"]
        gateway.supervisor.kill(epp)
        down = send(running.url, body("while the picker is down"))
        if status_when_down == 200:
            assert down.status == 200 and down.worker in running.workers
        else:
            assert down.status >= 500
        gateway.restart_epp()
        deadline = time.monotonic() + 15
        again = send(running.url, body("after restart"))
        while again.status != 200 and time.monotonic() < deadline:
            time.sleep(0.3)
            again = send(running.url, body("after restart"))
        assert again.status == 200, again.error
        streamed = send(running.url, body("stream after restart", stream=True))
        assert streamed.status == 200 and streamed.chunks >= 3


CLIENT_NVEXT = {"backend_instance_id": 1, "prefill_worker_id": 2, "ignore_eos": True}


@pytest.mark.parametrize("transformer", ["ext-proc", "inline"])
def test_aggregated_nvext_names_the_serving_worker(
    qwen3_dir: Path, tmp_path: Path, transformer: str
) -> None:
    config = LocalGatewayConfig(
        workers=2, port=free_port(), tokenizer=str(qwen3_dir), speedup=20.0,
        body_transformer=transformer, run_dir=tmp_path,  # type: ignore[arg-type]
    )  # fmt: skip
    with LocalGateway(config) as running:
        result = send(running.url, {**body("nvext please"), "nvext": dict(CLIENT_NVEXT)})
    assert result.status == 200, result.error
    assert result.received_nvext == {"backend_instance_id": result.instance_id, "ignore_eos": True}


@pytest.mark.parametrize("transformer", ["ext-proc", "inline"])
def test_disaggregated_headers_and_nvext_carry_prefill_and_decode(
    qwen3_dir: Path, tmp_path: Path, transformer: str
) -> None:
    # The reference policy disaggregates every request (threshold 0), so every request shows the
    # headers; kvgate's policy prefills remotely only when that is predicted to be faster.
    config = LocalGatewayConfig(
        workers=3, prefill_workers=1, port=free_port(), tokenizer=str(qwen3_dir),
        speedup=20.0, body_transformer=transformer, run_dir=tmp_path,  # type: ignore[arg-type]
        routing="dynamo",
    )  # fmt: skip
    with LocalGateway(config) as running:
        prefill_id = int(running.workers[0].rsplit(":", 1)[1])  # instance id = HTTP port
        served = set()
        for i in range(3):
            result = send(running.url, {**body(f"disagg {i}"), "nvext": dict(CLIENT_NVEXT)})
            assert result.status == 200, result.error
            assert result.worker != running.workers[0]  # the prefill worker never decodes
            assert result.received_nvext == {
                "ignore_eos": True,
                "prefill_worker_id": prefill_id,
                "decode_worker_id": result.instance_id,
            }
            served.add(result.worker)
    assert served <= set(running.workers[1:])


def test_lua_body_transformer_mode(qwen3_dir: Path, tmp_path: Path) -> None:
    config = LocalGatewayConfig(
        workers=2, port=free_port(), tokenizer=str(qwen3_dir), speedup=20.0,
        body_transformer="lua", run_dir=tmp_path,
    )  # fmt: skip
    with LocalGateway(config) as running:
        result = send(running.url, {**body("lua nvext"), "nvext": dict(CLIENT_NVEXT)})
    assert result.status == 200, result.error
    assert result.received_nvext == {"backend_instance_id": result.instance_id, "ignore_eos": True}


def test_engines_start_again_on_other_ports_when_one_was_taken(
    qwen3_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ports are checked free, not reserved: another process can take one before the engines
    # bind it. The launcher must pick other ports instead of failing the whole start.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        picks = iter([local.free_port_block(2), taken_port - 2])  # replay ports start at events + n
        real_free_block = local.free_port_block
        monkeypatch.setattr(
            local, "free_port_block", lambda count: next(picks, None) or real_free_block(count)
        )
        config = LocalGatewayConfig(
            workers=2, port=free_port(), tokenizer=str(qwen3_dir), speedup=20.0, run_dir=tmp_path
        )
        with LocalGateway(config) as running:
            assert send(running.url, body("after a retry")).status == 200
    log = (tmp_path / "engines.log").read_text()
    assert "Address already in use" in log
    assert log.count("ready workers=2") == 1
