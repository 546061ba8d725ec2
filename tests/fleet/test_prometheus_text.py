"""The minimal Prometheus text parser, checked against prometheus_client's own parser (an
independent implementation)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from kvgate.fleet.endpoint import EngineType
from kvgate.fleet.engine_metrics import ENGINE_METRICS
from kvgate.fleet.prometheus_text import MetricsParseError, parse_labels, scan_samples
from tests.fleet.utils import EngineState, render


def reference_samples(text: str, names: set[str]) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples of `names` as prometheus_client's parser reads them."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                out.setdefault(sample.name, []).append((sample.labels, float(sample.value)))
    return out


def ours(text: str, names: set[str]) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {
        name: [(parse_labels(labels), value) for labels, value in samples]
        for name, samples in scan_samples(text, sorted(names)).items()
    }


def same(
    a: dict[str, list[tuple[dict[str, str], float]]],
    b: dict[str, list[tuple[dict[str, str], float]]],
) -> bool:
    def key(d: dict[str, list[tuple[dict[str, str], float]]]) -> object:
        # NaN != NaN: compare its repr instead.
        return {n: [(lb, repr(v) if math.isnan(v) else v) for lb, v in s] for n, s in d.items()}

    return key(a) == key(b)


# -- generated expositions ---------------------------------------------------------------------

WANTED = ["vllm:num_requests_waiting", "sglang:token_usage", "trtllm_kv_cache_utilization", "up"]
# Names a sloppy matcher would confuse with the wanted ones.
DECOYS = [
    "vllm:num_requests_waiting_by_reason",
    "vllm:num_requests",
    "xvllm:num_requests_waiting",
    "sglang:token_usage_total",
    "upper",
]
LABEL_NAMES = ["model_name", "engine", "le", "a", "_x", "B9"]
LABEL_CHARS = st.characters(codec="utf-8") | st.sampled_from(list('"\\\n{},= \t#'))


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass
class GenSample:
    labels: dict[str, str]
    value: str
    timestamp: int | None
    gap: str


VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(["NaN", "+Inf", "-Inf", "1e+06", "1.5E-3", "0", "-0.0"]),
)


@st.composite
def samples(draw: st.DrawFn) -> GenSample:
    names = draw(st.lists(st.sampled_from(LABEL_NAMES), unique=True, max_size=4))
    labels = {n: draw(st.text(LABEL_CHARS, max_size=12)) for n in names}
    timestamp = draw(st.none() | st.integers(0, 2**41))
    return GenSample(labels, draw(VALUES), timestamp, draw(st.sampled_from([" ", "\t"])))


@st.composite
def expositions(draw: st.DrawFn) -> str:
    lines: list[str] = []
    for _ in range(draw(st.integers(0, 8))):
        name = draw(st.sampled_from(WANTED + DECOYS))
        kind = draw(st.sampled_from(["gauge", "untyped", "histogram", None]))
        if draw(st.booleans()):
            lines.append(f"# HELP {name} help text with {{braces}} and \\\\ backslash")
        if kind is not None:
            lines.append(f"# TYPE {name} {kind}")
        for sample in draw(st.lists(samples(), max_size=4)):
            sample_name = f"{name}_bucket" if kind == "histogram" else name
            if kind == "histogram":
                sample.labels.setdefault("le", "+Inf")
            labels = ",".join(f'{k}="{escape(v)}"' for k, v in sample.labels.items())
            line = sample_name + (f"{{{labels}}}" if sample.labels else "")
            line += sample.gap + sample.value
            if sample.timestamp is not None:
                line += f" {sample.timestamp}"
            lines.append(line)
        if draw(st.booleans()):
            lines.append("")
    return "\n".join(lines) + draw(st.sampled_from(["\n", ""]))


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(expositions())
def test_generated_expositions_read_like_prometheus_client(text: str) -> None:
    wanted = set(WANTED)
    assert same(ours(text, wanted), reference_samples(text, wanted)), text


@pytest.mark.parametrize("engine", ["vllm", "sglang", "trtllm"])
@pytest.mark.parametrize("filtered", [False, True], ids=["full", "filtered"])
def test_engine_expositions_read_like_prometheus_client(engine: EngineType, filtered: bool) -> None:
    names = ENGINE_METRICS[engine].names
    state = EngineState(
        engine=engine,
        waiting=[3, 1],
        running=[2, 5],
        usage=[0.25, 0.5],
        lora_samples=[(4, "a,b", "", 1.7e9), (4, "c", "d", 1.8e9)],
    )
    text = render(state, names if filtered else None)
    assert same(ours(text, set(names)), reference_samples(text, set(names)))


# -- scan_samples edge cases -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("m 1\n", [("", 1.0)]),
        ("m 1", [("", 1.0)]),
        ('m{a="x"} 2 1700000000000\n', [('a="x"', 2.0)]),
        ('m{a="x"}\t2\r\n', [('a="x"', 2.0)]),
        ('m {a="x"} 2\n', [('a="x"', 2.0)]),
        (
            '# HELP m m\n# TYPE m gauge\nm 1\nm_sum 5\nmm 4\nm{b="}"} 3\n',
            [("", 1.0), ('b="}"', 3.0)],
        ),
        ("x 1\n#m 3\n m 4\n", []),
    ],
    ids=[
        "trailing newline",
        "no trailing newline",
        "timestamp ignored",
        "tab and CRLF",
        "space before labels",
        "only exact names, brace inside a label value",
        "comments and indented lines are not samples",
    ],
)
def test_scan_finds_exactly_the_named_samples(text: str, expected: list[tuple[str, float]]) -> None:
    assert scan_samples(text, ["m"]).get("m", []) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("m abc\n", "bad sample value"),
        ("m 1_000\n", "cannot read the sample"),
        ("m 1 2 3\n", "cannot read the sample"),
        ("m\t\n", "cannot read the sample"),
        ('m{a="x" 1\n', "unclosed labels"),
    ],
    ids=["not a number", "underscore in value", "too many fields", "no value", "unclosed labels"],
)
def test_scan_refuses_unreadable_wanted_lines(text: str, message: str) -> None:
    with pytest.raises(MetricsParseError, match=message):
        scan_samples(text, ["m"])


def test_unreadable_lines_of_other_metrics_are_ignored() -> None:
    assert scan_samples("other{{{ garbage\nm 1\n", ["m"]) == {"m": [("", 1.0)]}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ('a="1"', {"a": "1"}),
        ('a="1",b="2",', {"a": "1", "b": "2"}),
        (' a = "1" , b="x,y}"', {"a": "1", "b": "x,y}"}),
        (r'a="q\"uote",b="back\\slash",c="new\nline",d="other\t"', {
            "a": 'q"uote', "b": "back\\slash", "c": "new\nline", "d": "other\\t"
        }),
    ],
    ids=["empty", "one", "trailing comma", "spaces and separators in values", "escapes"],
)  # fmt: skip
def test_parse_labels(text: str, expected: dict[str, str]) -> None:
    assert parse_labels(text) == expected


@pytest.mark.parametrize(
    "text",
    ['a="1" b="2"', "a=1", 'a="1', '9a="1"', 'a="1",,b="2"'],
    ids=["missing comma", "unquoted", "unterminated", "bad name", "double comma"],
)
def test_parse_labels_refuses_malformed_labels(text: str) -> None:
    with pytest.raises(MetricsParseError, match="bad labels"):
        parse_labels(text)
