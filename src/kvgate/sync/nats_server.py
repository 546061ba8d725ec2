"""A local ``nats-server`` for `kvgate up` and the tests (Debian's package: ``apt-get install
nats-server``, which puts it in /usr/sbin). Found as ``$KVGATE_NATS_SERVER``, then on ``PATH``,
then in /usr/sbin and /usr/bin. Always bound to loopback."""

from __future__ import annotations

from pathlib import Path

from kvgate.executables import find_executable

_FALLBACK_DIRS = (Path("/usr/sbin"), Path("/usr/bin"), Path("/usr/local/bin"))


class NatsServerNotFound(FileNotFoundError):
    pass


def find_nats_server() -> Path:
    return find_executable(
        "KVGATE_NATS_SERVER",
        "nats-server",
        before_path=[],
        after_path=[d / "nats-server" for d in _FALLBACK_DIRS],
        missing=NatsServerNotFound,
        hint="no nats-server binary found (replica sync needs one): `apt-get install nats-server`, "
        "or set KVGATE_NATS_SERVER to the binary",
    )


def nats_server_argv(port: int, *, binary: Path | None = None) -> list[str]:
    """Plain core NATS on 127.0.0.1:port; replica sync needs no JetStream."""
    return [str(binary or find_nats_server()), "-a", "127.0.0.1", "-p", str(port)]
