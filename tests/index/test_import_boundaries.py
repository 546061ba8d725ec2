"""The routing core loads no transport: each import runs in a fresh interpreter, since this
test process has long since imported ZMQ and gRPC."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TRANSPORTS = ("zmq", "grpc")


def modules_loaded_by(module: str) -> list[str]:
    """Names in ``sys.modules`` after importing ``module`` alone, minus those before it."""
    script = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        f"import {module}\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    loaded: list[str] = json.loads(out.stdout)
    return loaded


@pytest.mark.parametrize("module", ["kvgate.index", "kvgate.scheduling", "kvgate.sim.engine"])
def test_the_core_loads_no_transport(module: str) -> None:
    loaded = modules_loaded_by(module)
    assert module in loaded
    assert [m for m in loaded if m.split(".")[0] in TRANSPORTS] == []


def test_the_event_types_import_the_standard_library_only() -> None:
    loaded = modules_loaded_by("kvgate.events.types")
    foreign = [
        m
        for m in loaded
        if m.split(".")[0] not in sys.stdlib_module_names
        and m not in ("kvgate", "kvgate.events", "kvgate.events.types")
    ]
    assert "kvgate.events.types" in loaded
    assert foreign == []
