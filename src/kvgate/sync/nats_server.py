"""A local ``nats-server`` for `kvgate up` and the tests (Debian's package: ``apt-get install
nats-server``, which puts it in /usr/sbin). Found as ``$KVGATE_NATS_SERVER``, then on ``PATH``,
then in /usr/sbin and /usr/bin. Always bound to loopback."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

_FALLBACK_DIRS = (Path("/usr/sbin"), Path("/usr/bin"), Path("/usr/local/bin"))


class NatsServerNotFound(FileNotFoundError):
    pass


def find_nats_server() -> Path:
    explicit = os.environ.get("KVGATE_NATS_SERVER")
    if explicit:
        path = Path(explicit)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise NatsServerNotFound(f"KVGATE_NATS_SERVER={explicit} is not an executable file")
    on_path = shutil.which("nats-server")
    candidates = ([Path(on_path)] if on_path else []) + [d / "nats-server" for d in _FALLBACK_DIRS]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise NatsServerNotFound(
        "no nats-server binary found (replica sync needs one): `apt-get install nats-server`, "
        "or set KVGATE_NATS_SERVER to the binary"
    )


def nats_server_argv(port: int, *, binary: Path | None = None) -> list[str]:
    """Plain core NATS on 127.0.0.1:port; replica sync needs no JetStream."""
    return [str(binary or find_nats_server()), "-a", "127.0.0.1", "-p", str(port)]
