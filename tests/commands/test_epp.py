"""`kvgate epp`: flags checked before anything starts, and the command as a process — starts with
zero endpoints, serves health, TLS, stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvgate.commands.epp import build_parser, settings_from_args
from kvgate.errors import ConfigError
from kvgate.extproc.tls import self_signed
from tests.extproc.utils import chat_body, headers_msg

# Every test starts `kvgate epp` as a subprocess (tokenizer, gRPC, TLS): 1.3–2.7 s each.
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} never opened")


@pytest.fixture
def epp_process(tmp_path: Path):  # type: ignore[no-untyped-def]
    procs: list[subprocess.Popen[bytes]] = []

    def start(*extra: str) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
        ports = {"grpc": free_port(), "health": free_port(), "metrics": free_port()}
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvgate", "epp", "--bind", "127.0.0.1",
             "--grpc-port", str(ports["grpc"]), "--grpc-health-port", str(ports["health"]),
             "--metrics-port", str(ports["metrics"]), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "DYNAMO_KV_BLOCK_SIZE": "16"},
        )  # fmt: skip
        procs.append(proc)
        wait_port(ports["health"], proc)
        wait_port(ports["grpc"], proc)
        return proc, ports

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_starts_without_endpoints_and_stops_cleanly_on_sigterm(epp_process) -> None:  # type: ignore[no-untyped-def]
    proc, ports = epp_process("--no-secure-serving")
    with grpc.insecure_channel(f"127.0.0.1:{ports['health']}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        live = stub.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
        assert live.status == health_pb2.HealthCheckResponse.SERVING
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def test_tls_with_given_certificate(epp_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    key, cert = self_signed("kvgate-epp")
    (tmp_path / "tls.key").write_bytes(key)
    (tmp_path / "tls.crt").write_bytes(cert)
    _, ports = epp_process("--cert-path", str(tmp_path), "--endpoints", "127.0.0.1:9")
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    credentials = grpc.ssl_channel_credentials(root_certificates=cert)
    options = [("grpc.ssl_target_name_override", "kvgate-epp")]
    with grpc.secure_channel(f"127.0.0.1:{ports['grpc']}", credentials, options) as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

        messages = [
            headers_msg({":method": "POST", ":path": "/v1/completions"}),
            pb.ProcessingRequest(
                request_body=pb.HttpBody(body=chat_body("tls"), end_of_stream=True)
            ),
        ]
        replies = list(stub.Process(iter(messages), timeout=10))
    keys = {
        h.header.key: h.header.raw_value.decode()
        for h in replies[0].request_headers.response.header_mutation.set_headers
    }
    assert keys["x-gateway-destination-endpoint"] == "127.0.0.1:9"


def test_bad_config_exits_2_naming_the_problem(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
        "plugins:\n- type: no-such-plugin\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "kvgate", "epp", "--bind", "127.0.0.1", "--no-secure-serving",
         "--grpc-port", "0", "--grpc-health-port", "0", "--metrics-port", "0",
         "--config-file", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "no-such-plugin" in done.stderr


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--objectives", "batch"], "--objectives"),
        (["--objectives", "batch=high"], "--objectives"),
        (["--grpc-port", "70000"], "--grpc-port"),
        (["--max-body-bytes", "0"], "--max-body-bytes"),
    ],
    ids=["objective-no-priority", "objective-not-int", "port-range", "body-limit"],
)
def test_bad_flags_name_the_flag(argv: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_args(build_parser().parse_args(argv))
    assert err.value.field == field


def test_pool_name_excludes_static_endpoints() -> None:
    args = build_parser().parse_args(["--pool-name=p", "--endpoints=10.0.0.1:8000"])
    with pytest.raises(ConfigError, match="not both"):
        settings_from_args(args)


def test_observer_replica_flag_reaches_the_options() -> None:
    default = settings_from_args(build_parser().parse_args([]))
    assert default.options.observer_replica is None
    named = settings_from_args(build_parser().parse_args(["--observer-replica", "epp-1"]))
    assert named.options.observer_replica == "epp-1"
