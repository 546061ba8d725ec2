"""Child processes of `kvgate up`: started in their own session, logged to the run directory,
stopped in reverse order (SIGTERM, then SIGKILL after a grace period), never left behind."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvgate.errors import StartupError


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Supervisor:
    run_dir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None) -> Child:
        log = self.run_dir / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        child = Child(name, process, log, list(argv), dict(env or {}))
        self.children.append(child)
        return child

    def kill(self, child: Child, sig: signal.Signals = signal.SIGKILL) -> None:
        """Stop one child abruptly (failure tests); it stays listed until `restart`."""
        _signal(child, sig)
        child.process.wait(timeout=10)

    def restart(self, child: Child) -> Child:
        """Start a stopped child again with the same command, in the same position."""
        with child.log.open("ab") as out:
            child.process = subprocess.Popen(
                child.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **child.env},
                start_new_session=True,
            )
        return child

    def wait_ready(
        self, child: Child, ready: Callable[[], bool], *, timeout_s: float = 60.0
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if not child.alive():
                raise StartupError(
                    f"{child.name} exited with code {child.process.returncode}; "
                    f"its log ({child.log}) ends with:\n{child.tail()}"
                )
            with contextlib.suppress(OSError):
                if ready():
                    return
            if time.monotonic() > deadline:
                raise StartupError(
                    f"{child.name} not ready after {timeout_s:.0f} s; see {child.log}:\n"
                    f"{child.tail()}"
                )
            time.sleep(0.1)

    def dead(self) -> list[Child]:
        return [c for c in self.children if not c.alive()]

    def stop_all(self, grace_s: float = 10.0) -> None:
        """Stop children newest first: the gateway before the picker before the engines."""
        for child in reversed(self.children):
            _signal(child, signal.SIGTERM)
            try:
                child.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal(child, signal.SIGKILL)
                child.process.wait(timeout=grace_s)
        self.children.clear()


def _signal(child: Child, sig: signal.Signals) -> None:
    if child.alive():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.process.pid, sig)


# Below Linux's ephemeral range (32768-60999), which port-0 binds and outgoing connections draw
# from, so a port checked free here is not taken a moment later by some unrelated connect().
PORT_RANGE = (10_000, 32_000)


def free_port_block(count: int, reserved: set[int] | None = None) -> int:
    """A base port with ``count`` consecutive ports free now (checked, not held: the process they
    are for binds them later). With ``reserved``, none of them is in it and they are added."""
    low, high = PORT_RANGE
    for _ in range(500):
        base = random.randrange(low, high - count)
        block = range(base, base + count)
        if reserved is not None and reserved.intersection(block):
            continue
        if all(port_free(port) for port in block):
            if reserved is not None:
                reserved.update(block)
            return base
    raise StartupError(f"no block of {count} free ports in {low}..{high}")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
