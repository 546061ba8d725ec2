"""Running a property as a long fuzz campaign: hypothesis in rounds, bounded in cases and time.

One hypothesis run keeps a tree of every choice sequence it tried (to avoid repeats); over 100,000
examples that tree costs memory and time, so a campaign is many short runs of ``round_cases``
examples, each with its own seed. A failure is shrunk by hypothesis, reported with the minimal
example, and ends the campaign.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

T = TypeVar("T")


@dataclass
class FuzzReport:
    target: str
    cases: int = 0
    seconds: float = 0.0
    failure: str | None = None
    """The shrunk failing example and its error, or None."""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.cases / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        verdict = "FAILED" if self.failure else "ok"
        extra = "".join(f", {k} {v}" for k, v in self.details.items())
        return (
            f"{self.target}: {self.cases:,} cases in {self.seconds:.0f} s "
            f"({self.rate:,.0f} cases/s){extra}: {verdict}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "cases": self.cases,
            "seconds": round(self.seconds, 1),
            "cases_per_s": round(self.rate, 1),
            "failure": self.failure,
            **self.details,
        }


def campaign(
    target: str,
    strategy: st.SearchStrategy[T],
    check: Callable[[T], None],
    *,
    cases: int,
    max_seconds: float,
    round_cases: int = 2_000,
    first_seed: int = 0,
    progress: Callable[[FuzzReport], None] | None = None,
) -> FuzzReport:
    """Run ``check`` on examples of ``strategy`` until ``cases`` ran or ``max_seconds`` passed."""
    report = FuzzReport(target)
    started = time.monotonic()
    deadline = started + max_seconds
    round_no = 0
    while report.cases < cases and time.monotonic() < deadline:
        wanted = min(round_cases, cases - report.cases)

        @settings(
            max_examples=wanted,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            phases=(Phase.generate, Phase.shrink),
            print_blob=True,
        )
        @seed(first_seed + round_no)
        @given(strategy)
        def one(example: T) -> None:
            report.cases += 1
            check(example)

        try:
            one()
        except Exception as err:  # the shrunk failure: the campaign's result
            notes = "\n".join(getattr(err, "__notes__", []))
            report.failure = f"{type(err).__name__}: {err}\n{notes}".strip()
            break
        finally:
            report.seconds = time.monotonic() - started
        round_no += 1
        if progress is not None:
            progress(report)
    return report
