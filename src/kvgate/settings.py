"""Declarative checks for typed settings: bounds written on the field, checked in one place.

A settings dataclass annotates its numeric fields with their bounds and calls `check_ranges` from
``__post_init__``::

    @dataclass(frozen=True, slots=True)
    class ScraperConfig:
        interval_s: Annotated[float, Range(gt=0)] = 0.05

        def __post_init__(self) -> None:
            check_ranges(self)

A value out of bounds (or NaN / infinite) raises `ConfigError` naming the field, the value and the
bounds; nothing is clamped. The same `Range` marks plugin parameters in EndpointPickerConfig.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Annotated, Any, get_args, get_origin, get_type_hints

from kvgate.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Range:
    """Bounds of a numeric setting: ``Annotated[int, Range(ge=1)]``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value: float) -> bool:
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self) -> str:
        parts = [f">= {self.ge:g}"] if self.ge is not None else []
        parts += [f"> {self.gt:g}"] if self.gt is not None else []
        parts += [f"<= {self.le:g}"] if self.le is not None else []
        parts += [f"< {self.lt:g}"] if self.lt is not None else []
        return " and ".join(parts)


_RANGED: dict[type[Any], tuple[tuple[str, Range], ...]] = {}


def _ranged_fields(cls: type[Any]) -> tuple[tuple[str, Range], ...]:
    found = _RANGED.get(cls)
    if found is None:
        hints = get_type_hints(cls, include_extras=True)
        found = _RANGED[cls] = tuple(
            (f.name, extra)
            for f in dataclasses.fields(cls)
            if get_origin(hints[f.name]) is Annotated
            for extra in get_args(hints[f.name])[1:]
            if isinstance(extra, Range)
        )
    return found


def check_ranges(settings: Any) -> None:
    """Raise `ConfigError` for the first field of ``settings`` outside its `Range`; a field that
    is None (optional, unset) passes."""
    for name, bounds in _ranged_fields(type(settings)):
        value = getattr(settings, name)
        if value is None or isinstance(value, bool):
            continue
        if not (math.isfinite(value) and bounds.contains(value)):
            raise ConfigError(name, f"got {value}; must be {bounds.describe()}")
