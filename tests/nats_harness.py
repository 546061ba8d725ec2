"""A real nats-server on loopback for the replica-sync tests (Debian's package, apt-get).

Test modules use the fixture by importing it: ``from tests.nats_harness import nats_server``.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvgate.gateway.local import free_port
from kvgate.sync.nats_server import nats_server_argv


class NatsServer:
    """One nats-server process; `stop` and `start` again keep the port (restart tests)."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._log = log
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        with self._log.open("ab") as out:
            self._process = subprocess.Popen(
                nats_server_argv(self.port), stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                assert self._process.poll() is None, self._log.read_text()
                assert time.monotonic() < deadline, "nats-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats-server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()
