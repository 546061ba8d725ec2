"""CPU per scrape of reading an engine's load metrics: kvgate's line scanner
(`kvgate.fleet.engine_metrics.read_metrics`) against prometheus_client's text parser
(`text_string_to_metric_families`, then the same samples picked out).

    python benchmarks/bench_metrics_parser.py [--seconds 1]

Pages: the simulated engine's /metrics (`kvgate.sim.metrics`), and the vLLM-like page of the fleet
tests (with vLLM's histograms, ~34 KB), each in full and as a ``name[]=`` filtered answer.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvgate.fleet.engine_metrics import ENGINE_METRICS, read_metrics
from kvgate.sim.engine import Engine, EngineConfig
from kvgate.sim.metrics import engine_registry

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fleet.utils import EngineState, render  # noqa: E402

NAMES = ENGINE_METRICS["vllm"]
WANTED = set(NAMES.names)


def with_prometheus_client(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in WANTED:
                found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def with_scanner(text: str) -> object:
    return read_metrics(text, NAMES)


def only_wanted(text: str) -> str:
    """The page as a server honouring ``name[]=`` answers it (HELP, TYPE and samples)."""
    kept = []
    for line in text.splitlines(keepends=True):
        fields = line.split()
        name = fields[2] if line.startswith("#") and len(fields) > 2 else line.split("{")[0]
        if name.split(" ")[0] in WANTED:
            kept.append(line)
    return "".join(kept)


def us_per_call(fn: Callable[[str], object], text: str, seconds: float) -> float:
    """Best of 5 timed runs of about ``seconds / 5`` each, in microseconds."""
    fn(text)
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < 0.1:
        fn(text)
        calls += 1
    loops = max(1, int(calls * seconds / 5 / 0.1))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(loops):
            fn(text)
        best = min(best, (time.perf_counter() - start) / loops)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per parser and page")
    args = parser.parse_args()
    sim_page = generate_latest(engine_registry(Engine(EngineConfig()), "Qwen/Qwen3-0.6B")).decode()
    vllm_page = render(EngineState(lora_samples=[(4, "a,b", "", 1.7e9)]))
    pages = {
        "simulated engine, full": sim_page,
        "simulated engine, filtered": only_wanted(sim_page),
        "vLLM-like, full": vllm_page,
        "vLLM-like, filtered": only_wanted(vllm_page),
    }
    for label, text in pages.items():
        ours = us_per_call(with_scanner, text, args.seconds)
        theirs = us_per_call(with_prometheus_client, text, args.seconds)
        print(
            f"{label:28s} {len(text):6d} B  scanner {ours:8.1f} us  "
            f"prometheus_client {theirs:9.1f} us  ({theirs / ours:5.1f}x)"
        )


if __name__ == "__main__":
    main()
