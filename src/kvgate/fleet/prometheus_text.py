"""The few samples a reader wants from a Prometheus text exposition, read at C speed.

Engines render every family they have (vLLM: tens of KB of histograms) and a scraper wants a
handful of gauges from it, scrape after scrape. So `scan_samples` looks only at the lines that
start with a wanted name (``str.find``) and leaves label text unparsed; `parse_labels` parses it
for the readers that need labels. prometheus_client's own parser reads every line of the page
into objects: 10-20x slower on a filtered vLLM page and about 100x on a full one
(``python benchmarks/bench_metrics_parser.py``), which at a 50 ms interval over many endpoints is
cores of CPU. The tests hold both parsers to the same answers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Final

__all__ = ["MetricsParseError", "RawSample", "parse_labels", "scan_samples"]


class MetricsParseError(ValueError):
    """A scrape that cannot be read: a malformed line of a wanted metric, a bad value."""


RawSample = tuple[str, float]
"""(the text between a sample's braces, unparsed; its value)."""

# Possessive quantifiers (Python 3.11+): the alternatives cannot overlap, so giving back
# characters never helps, and without them sre backtracks per character (8x slower).
_LABEL: Final = re.compile(
    r'[ \t]*+([a-zA-Z_][a-zA-Z0-9_]*+)[ \t]*+=[ \t]*+"((?:[^"\\\n]++|\\.)*+)"'
)
_LABEL_SEP: Final = re.compile(r"[ \t]*+(?:,|\Z)")
_ESCAPE: Final = re.compile(r'\\[\\n"]')
_UNESCAPED: Final = {"\\\\": "\\", "\\n": "\n", '\\"': '"'}


def _line_starts(text: str, name: str) -> Iterator[int]:
    if text.startswith(name):
        yield 0
    needle = "\n" + name
    at = text.find(needle)
    while at != -1:
        yield at + 1
        at = text.find(needle, at + 1)


def scan_samples(text: str, names: Iterable[str]) -> dict[str, list[RawSample]]:
    """The samples of each of `names` in a Prometheus text exposition, in order.

    Only lines starting with a wanted name are looked at, and only with ``str`` methods (C speed):
    the closing brace of a sample's labels is the last ``}`` of its line, since neither the value
    nor the timestamp can hold one. Label text is returned unparsed, and so unchecked, because most
    readers need only values (see `parse_labels`). Quoted metric names (``{"name", ...}``, the
    UTF-8 extension) and indented lines are not recognised. Raises `MetricsParseError` for a
    wanted line whose value cannot be read.
    """
    found: dict[str, list[RawSample]] = {}
    for name in names:
        samples: list[RawSample] = []
        for start in _line_starts(text, name):
            after = start + len(name)
            end = text.find("\n", after)
            line = text[after:] if end == -1 else text[after:end]
            # The name must end here: vllm:num_requests_waiting is not ..._waiting_by_reason.
            if line[:1] not in ("{", " ", "\t"):
                continue
            labels = ""
            rest = line
            if line.lstrip(" \t").startswith("{"):
                close = line.rfind("}")
                if close == -1:
                    raise MetricsParseError(f"{name}: unclosed labels in {line[:200]!r}")
                labels = line[line.index("{") + 1 : close]
                rest = line[close + 1 :]
            fields = rest.split()
            if not 1 <= len(fields) <= 2 or "_" in fields[0]:
                # ("_": float() takes "1_0", the exposition format does not.)
                raise MetricsParseError(f"{name}: cannot read the sample {line[:200]!r}")
            try:
                value = float(fields[0])
            except ValueError:
                raise MetricsParseError(f"{name}: bad sample value {fields[0]!r}") from None
            samples.append((labels, value))
        if samples:
            found[name] = samples
    return found


def parse_labels(text: str) -> dict[str, str]:
    """Labels of a sample from the text between its braces (escapes resolved)."""
    labels: dict[str, str] = {}
    at = 0
    end = len(text.rstrip(" \t"))
    while at < end:
        match = _LABEL.match(text, at)
        sep = None if match is None else _LABEL_SEP.match(text, match.end())
        if match is None or sep is None:
            raise MetricsParseError(f"bad labels {{{text[:200]}}}")
        value = match[2]
        labels[match[1]] = (
            _ESCAPE.sub(lambda m: _UNESCAPED[m[0]], value) if "\\" in value else value
        )
        at = sep.end()
    return labels
