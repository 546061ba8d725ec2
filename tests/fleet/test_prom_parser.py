"""The minimal Prometheus text parser and the per-engine reading, checked against
prometheus_client's own parser (an independent implementation)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from kvgate.fleet.endpoint import EngineType
from kvgate.fleet.metrics_scraper import (
    ENGINE_METRICS,
    MetricsParseError,
    NoEngineMetricsError,
    parse_labels,
    read_metrics,
    scan_samples,
)
from tests.fleet.helpers import EngineState, render


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


# -- read_metrics --------------------------------------------------------------------------------


def test_vllm_data_parallel_series_are_summed_and_usage_averaged() -> None:
    state = EngineState(waiting=[3, 4], running=[1, 2], usage=[0.5, 0.7])
    metrics, missing = read_metrics(render(state), ENGINE_METRICS["vllm"])
    assert (metrics.waiting, metrics.running) == (7, 3)
    assert metrics.kv_usage == pytest.approx(0.6)
    assert (metrics.block_size, metrics.num_gpu_blocks) == (16, 4096)
    assert missing == []


def test_vllm_reads_the_older_usage_name() -> None:
    state = EngineState(usage=[0.3], usage_name="vllm:gpu_cache_usage_perc")
    metrics, missing = read_metrics(render(state), ENGINE_METRICS["vllm"])
    assert metrics.kv_usage == pytest.approx(0.3)
    assert missing == []


def test_vllm_prefers_the_newer_usage_name() -> None:
    text = (
        "vllm:gpu_cache_usage_perc 0.9\nvllm:kv_cache_usage_perc 0.2\nvllm:num_requests_waiting 0\n"
    )
    metrics, _ = read_metrics(text, ENGINE_METRICS["vllm"])
    assert metrics.kv_usage == pytest.approx(0.2)


def test_vllm_lora_info_takes_the_latest_sample() -> None:
    state = EngineState(
        lora_samples=[(4, "old", "", 1.9e9), (4, "a,b", "c", 2.0e9), (4, "older", "", 1.0e9)]
    )
    metrics, _ = read_metrics(render(state), ENGINE_METRICS["vllm"])
    assert metrics.max_loras == 4
    assert metrics.active_loras == frozenset({"a", "b"})
    assert metrics.waiting_loras == frozenset({"c"})


def test_vllm_without_lora_reports_none() -> None:
    metrics, _ = read_metrics(render(EngineState()), ENGINE_METRICS["vllm"])
    assert (metrics.max_loras, metrics.active_loras, metrics.waiting_loras) == (
        None,
        frozenset(),
        frozenset(),
    )


def test_unset_cache_config_fields_read_as_none() -> None:
    text = (
        "vllm:num_requests_waiting 1\n"
        'vllm:cache_config_info{block_size="32",num_gpu_blocks="None"} 1.0\n'
    )
    metrics, _ = read_metrics(text, ENGINE_METRICS["vllm"])
    assert (metrics.block_size, metrics.num_gpu_blocks) == (32, None)


def test_sglang_maps_pages_to_blocks() -> None:
    state = EngineState(engine="sglang", waiting=[2, 2], running=[1, 0], usage=[0.1, 0.3])
    state.block_size, state.num_blocks = 64, 900
    metrics, missing = read_metrics(render(state), ENGINE_METRICS["sglang"])
    assert (metrics.waiting, metrics.running) == (4, 1)
    assert metrics.kv_usage == pytest.approx(0.2)
    assert (metrics.block_size, metrics.num_gpu_blocks) == (64, 900)
    assert missing == []


def test_trtllm_has_no_cache_config() -> None:
    state = EngineState(engine="trtllm", waiting=[5], running=[7], usage=[0.75])
    metrics, missing = read_metrics(render(state), ENGINE_METRICS["trtllm"])
    assert (metrics.waiting, metrics.running, metrics.kv_usage) == (5, 7, 0.75)
    assert (metrics.block_size, metrics.num_gpu_blocks) == (None, None)
    assert missing == []


def test_missing_core_metrics_are_listed_and_read_as_zero() -> None:
    metrics, missing = read_metrics("vllm:num_requests_running 3\n", ENGINE_METRICS["vllm"])
    assert (metrics.waiting, metrics.running, metrics.kv_usage) == (0, 3, 0.0)
    assert missing == [
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc or vllm:gpu_cache_usage_perc",
    ]


@pytest.mark.parametrize(
    ("engine", "text"),
    [
        ("vllm", ""),
        ("vllm", render(EngineState(engine="sglang"))),
        ("trtllm", render(EngineState())),
    ],
    ids=["empty body", "sglang text read as vllm", "vllm text read as trtllm"],
)
def test_no_core_metric_at_all_is_an_error(engine: EngineType, text: str) -> None:
    with pytest.raises(NoEngineMetricsError, match="none of"):
        read_metrics(text, ENGINE_METRICS[engine])


def test_a_dynamo_worker_before_its_first_request_reads_as_idle() -> None:
    """A Dynamo mocker registers its vllm:* gauges with its first request; until then its system
    server shows only Dynamo's own metrics. It answers, so it is alive and idle."""
    text = (
        "# TYPE dynamo_component_uptime_seconds gauge\n"
        'dynamo_component_uptime_seconds{worker_id="74c82a1312f4650e"} 3.5\n'
        'dynamo_component_requests_total{dynamo_endpoint="generate"} 0\n'
    )
    metrics, missing = read_metrics(text, ENGINE_METRICS["vllm"])
    assert (metrics.waiting, metrics.running, metrics.kv_usage, missing) == (0, 0, 0.0, [])


def test_a_non_finite_count_is_an_error() -> None:
    with pytest.raises(MetricsParseError, match="vllm:num_requests_waiting is nan"):
        read_metrics("vllm:num_requests_waiting NaN\n", ENGINE_METRICS["vllm"])
