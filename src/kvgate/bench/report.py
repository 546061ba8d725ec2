"""Per-request measurements → per-policy metrics → table, JSON and an optional PNG.

`RunRecord` is what one replay (simulated or live) measured; `summarize` turns it into the
`PolicyMetrics` that both commands print and write, so the two share one schema:

``{"trace": ..., "ideal_hit_rate": x, "floor_ttft_ms": {"p50", "p90", "p99"},
"pooled_hit_rate": x, "pooled_floor_ttft_ms": {"p50", "p90", "p99"},
"policies": {NAME: {"ttft_ms": {"p50", "p90", "p99", "mean"}, "itl_ms": {"p50", "p90"},
"e2e_ms": {"p50", "p90"}, "hit_rate": x, "throughput_tok_s": x, "load_max_over_mean": x,
"requests": n, "prediction_error": {"p50", "p90"} | null, ...}}}``

The bounds (`kvgate.bench.bounds`) are written only when known (simulation); a policy's
``prediction_error`` is null when none of its requests carried a predicted TTFT.

Percentiles are numpy's linear interpolation; an empty sample gives NaN, written as null.
matplotlib is imported only by `plot`, which explains how to install it when missing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np


class Progress:
    """``done/total [#####.....]`` on stderr: redrawn in place on a terminal (at most every 1%),
    one line at the end otherwise."""

    def __init__(self, label: str, total: int, out: TextIO) -> None:
        self.label = label
        self.total = max(total, 1)
        self.out = out
        self._live = out.isatty()
        self._step = max(1, self.total // 100)
        self._next = 0
        self._started = time.perf_counter()

    def update(self, done: int) -> None:
        if done >= self.total:
            self._draw(self.total, "\n")
        elif self._live and done >= self._next:
            self._next = done + self._step
            self._draw(done, "")

    def _draw(self, done: int, end: str) -> None:
        width = 30
        filled = width * done // self.total
        bar = "#" * filled + "." * (width - filled)
        elapsed = time.perf_counter() - self._started
        prefix = "\r" if self._live else ""
        self.out.write(
            f"{prefix}{self.label:<20} [{bar}] {done}/{self.total} {elapsed:5.1f} s{end}"
        )
        self.out.flush()


@dataclass(slots=True)
class RunRecord:
    """What one policy's replay measured, in seconds and tokens; one entry per served request."""

    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    """Every gap between consecutive tokens of a request, all requests together."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    first_arrival_s: float = math.inf
    last_finish_s: float = -math.inf
    per_worker: dict[str, int] = field(default_factory=dict)
    """Requests routed to each worker (every worker listed, zeros included)."""
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    """How long the replay itself took."""
    ttft_prediction_error: list[float] = field(default_factory=list)
    """|predicted - measured| / measured TTFT, for the requests the policy predicted."""
    itl_prediction_error: list[float] = field(default_factory=list)
    """The same for the mean gap between a request's tokens (requests of 2+ tokens)."""

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


@dataclass(frozen=True, slots=True)
class PolicyMetrics:
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    hit_rate: float
    throughput_tok_s: float
    load_max_over_mean: float
    worker_share: dict[str, float]
    requests: int
    errors: int
    error_kinds: dict[str, int]
    wall_s: float
    prediction_error: dict[str, float] | None = None
    """Relative TTFT prediction error (p50, p90) over the requests that had a prediction."""
    itl_prediction_error: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "ttft_ms": _clean(self.ttft_ms),
            "itl_ms": _clean(self.itl_ms),
            "e2e_ms": _clean(self.e2e_ms),
            "hit_rate": _finite(self.hit_rate),
            "throughput_tok_s": _finite(self.throughput_tok_s),
            "load_max_over_mean": _finite(self.load_max_over_mean),
            "worker_share": self.worker_share,
            "requests": self.requests,
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "wall_s": round(self.wall_s, 3),
            "prediction_error": _maybe_clean(self.prediction_error),
            "itl_prediction_error": _maybe_clean(self.itl_prediction_error),
        }


@dataclass(frozen=True, slots=True)
class Bounds:
    """Yardsticks of a simulated replay (`kvgate.bench.bounds`), in the report's units."""

    floor_ttft_ms: dict[str, float]
    """p50, p90, p99 of each request's TTFT on an idle worker holding an infinite cache."""
    pooled_hit_rate: float
    """Hit rate of one LRU cache with the whole fleet's capacity."""
    pooled_floor_ttft_ms: dict[str, float]
    """p50, p90, p99 of each request's TTFT on an idle worker holding that pooled cache."""

    def to_json(self) -> dict[str, Any]:
        return {
            "floor_ttft_ms": _clean(self.floor_ttft_ms),
            "pooled_hit_rate": _finite(self.pooled_hit_rate),
            "pooled_floor_ttft_ms": _clean(self.pooled_floor_ttft_ms),
        }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _clean(values: Mapping[str, float]) -> dict[str, float | None]:
    return {k: _finite(v) for k, v in values.items()}


def _maybe_clean(values: Mapping[str, float] | None) -> dict[str, float | None] | None:
    return None if values is None else _clean(values)


def _relative_error(samples: Sequence[float]) -> dict[str, float] | None:
    if not samples:
        return None
    values = np.percentile(np.asarray(samples, dtype=np.float64), (50, 90))
    return {"p50": float(values[0]), "p90": float(values[1])}


def _percentiles_ms(samples: Sequence[float], points: Sequence[int]) -> dict[str, float]:
    if not samples:
        return {f"p{p}": math.nan for p in points}
    values = np.percentile(np.asarray(samples, dtype=np.float64) * 1000.0, points)
    return {f"p{p}": float(v) for p, v in zip(points, values, strict=True)}


def summarize(record: RunRecord) -> PolicyMetrics:
    ttft = _percentiles_ms(record.ttft_s, (50, 90, 99))
    ttft["mean"] = float(np.mean(record.ttft_s) * 1000.0) if record.ttft_s else math.nan
    counts = record.per_worker
    total = sum(counts.values())
    mean = total / len(counts) if counts else 0.0
    span = record.last_finish_s - record.first_arrival_s
    return PolicyMetrics(
        ttft_ms=ttft,
        itl_ms=_percentiles_ms(record.itl_s, (50, 90)),
        e2e_ms=_percentiles_ms(record.e2e_s, (50, 90)),
        hit_rate=record.cached_tokens / record.prompt_tokens if record.prompt_tokens else math.nan,
        throughput_tok_s=record.output_tokens / span if span > 0 else math.nan,
        load_max_over_mean=max(counts.values()) / mean if mean else math.nan,
        worker_share={w: n / total if total else 0.0 for w, n in counts.items()},
        requests=len(record.e2e_s),
        errors=record.errors,
        error_kinds=dict(record.error_kinds),
        wall_s=record.wall_s,
        prediction_error=_relative_error(record.ttft_prediction_error),
        itl_prediction_error=_relative_error(record.itl_prediction_error),
    )


def report_json(
    trace: str,
    ideal_hit_rate: float | None,
    results: Mapping[str, PolicyMetrics],
    bounds: Bounds | None = None,
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "trace": trace,
        "ideal_hit_rate": None if ideal_hit_rate is None else _finite(ideal_hit_rate),
    }
    if bounds is not None:
        report.update(bounds.to_json())
    report["policies"] = {name: m.to_json() for name, m in results.items()}
    return report


def write_json(path: str | Path, report: Mapping[str, Any]) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


_COLUMNS = (
    ("policy", 18),
    ("TTFT p50", 9),
    ("p90", 9),
    ("p99", 9),
    ("mean", 9),
    ("ITL p50", 8),
    ("p90", 8),
    ("E2E p50", 9),
    ("p90", 9),
    ("hit", 6),
    ("tok/s", 8),
    ("max/mean", 8),
    ("reqs", 6),
    ("errs", 5),
)


def table(
    results: Mapping[str, PolicyMetrics],
    ideal_hit_rate: float | None = None,
    bounds: Bounds | None = None,
) -> str:
    """A fixed-width text table, times in ms; below it the bounds and the ideal hit rate when
    known, and the prediction error of the policies that predicted TTFT."""
    header = "  ".join(
        f"{name:>{w}}" if i else f"{name:<{w}}" for i, (name, w) in enumerate(_COLUMNS)
    )
    lines = [header, "-" * len(header)]
    for name, m in results.items():
        cells = (
            m.ttft_ms["p50"],
            m.ttft_ms["p90"],
            m.ttft_ms["p99"],
            m.ttft_ms["mean"],
            m.itl_ms["p50"],
            m.itl_ms["p90"],
            m.e2e_ms["p50"],
            m.e2e_ms["p90"],
        )
        row = [f"{name:<{_COLUMNS[0][1]}}"]
        row += [f"{v:>{w}.1f}" for v, (_, w) in zip(cells, _COLUMNS[1:9], strict=True)]
        row.append(f"{m.hit_rate:>6.3f}")
        row.append(f"{m.throughput_tok_s:>8.1f}")
        row.append(f"{m.load_max_over_mean:>8.2f}")
        row.append(f"{m.requests:>6d}")
        row.append(f"{m.errors:>5d}")
        lines.append("  ".join(row))
    if bounds is not None:
        f = bounds.floor_ttft_ms
        lines.append(
            f"floor TTFT (idle worker, infinite cache): p50 {f['p50']:.1f}  p90 {f['p90']:.1f}  "
            f"p99 {f['p99']:.1f}"
        )
        pooled = bounds.pooled_hit_rate
        lines.append(f"pooled hit rate (one LRU cache of the fleet's size): {pooled:.3f}")
        f = bounds.pooled_floor_ttft_ms
        lines.append(
            f"pooled floor TTFT (idle worker, that pooled cache): p50 {f['p50']:.1f}  "
            f"p90 {f['p90']:.1f}  p99 {f['p99']:.1f}"
        )
    if ideal_hit_rate is not None:
        lines.append(f"ideal hit rate (one infinite cache): {ideal_hit_rate:.3f}")
    for name, m in results.items():
        if m.prediction_error is not None:
            e = m.prediction_error
            line = f"{name}: TTFT prediction error p50 {e['p50']:.3f}  p90 {e['p90']:.3f}"
            if m.itl_prediction_error is not None:
                i = m.itl_prediction_error
                line += f"; ITL p50 {i['p50']:.3f}  p90 {i['p90']:.3f}"
            lines.append(line)
    return "\n".join(lines)


def plot(
    path: str | Path,
    records: Mapping[str, RunRecord],
    results: Mapping[str, PolicyMetrics],
    ideal_hit_rate: float | None,
    title: str,
) -> None:
    """TTFT CDFs, hit rate and load balance per policy in one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    fig, (cdf, hits, load) = plt.subplots(1, 3, figsize=(17, 5))
    names = list(results)
    for name in names:
        ttft = np.sort(np.asarray(records[name].ttft_s) * 1000.0)
        if len(ttft):
            cdf.plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft), label=name)
    cdf.set_xscale("log")
    cdf.set_xlabel("TTFT (ms, log)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title("TTFT CDF")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend(fontsize=8)
    hits.bar(names, [results[n].hit_rate for n in names], color="tab:green")
    if ideal_hit_rate is not None:
        hits.axhline(ideal_hit_rate, color="black", linestyle="--", label="ideal (infinite cache)")
        hits.legend(fontsize=8)
    hits.set_ylim(0, 1)
    hits.set_title("prefix hit rate (cached / prompt tokens)")
    hits.tick_params(axis="x", rotation=45)
    load.bar(names, [results[n].load_max_over_mean for n in names], color="tab:orange")
    load.axhline(1.0, color="black", linestyle="--")
    load.set_title("load balance (max / mean requests per worker)")
    load.tick_params(axis="x", rotation=45)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
