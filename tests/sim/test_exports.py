"""The public API of kvgate.sim is a deliberate list, and importing it stays light."""

from __future__ import annotations

import subprocess
import sys

import kvgate.sim

EXPECTED = {
    "BatchShape",
    "BlockTable",
    "Clock",
    "ContextLengthError",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "EventLayout",
    "FinishReason",
    "Histogram",
    "LinearTiming",
    "PolynomialTiming",
    "PrefixCache",
    "SimRequest",
    "StepObserver",
    "StepResult",
    "StepTiming",
    "VirtualClock",
    "VirtualDriver",
    "WallClock",
    "block_id",
    "encode_batch",
}


def test_exported_names_are_pinned() -> None:
    assert set(kvgate.sim.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(kvgate.sim, name) is not None


def test_virtual_time_needs_no_protocol_adapters() -> None:
    """`kvgate simulate` imports the model only: no HTTP stack, no publisher."""
    code = (
        "import sys, kvgate.sim; "
        "print(sorted({'aiohttp', 'kvgate.sim.http', 'kvgate.sim.publisher'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
