"""Parsing endpoint lists: the --endpoints flag, file entries, the events-port convention."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvgate.fleet.endpoint import Endpoint
from kvgate.fleet.sources import (
    EndpointDefaults,
    EndpointSpecError,
    events_endpoint_for,
    load_endpoints_file,
    parse_endpoint_entries,
    parse_endpoints_flag,
)


def spec(endpoint: Endpoint) -> tuple[object, ...]:
    return (
        endpoint.address,
        endpoint.instance_id,
        endpoint.engine,
        endpoint.role,
        dict(endpoint.labels),
        endpoint.events_endpoint,
        endpoint.replay_endpoint,
    )


# -- the flag ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("   ", []),
        ("10.0.0.1:8000", [("10.0.0.1:8000", None)]),
        ("10.0.0.1:8000=42", [("10.0.0.1:8000", 42)]),
        (" 10.0.0.1:8000 = 42 , 10.0.0.2:8001 ", [("10.0.0.1:8000", 42), ("10.0.0.2:8001", None)]),
        ("[::1]:8000", [("[::1]:8000", None)]),
        ("[2001:DB8:0:0::7]:8000=0", [("[2001:db8::7]:8000", 0)]),
        ("10.0.0.1:65535", [("10.0.0.1:65535", None)]),
        (f"10.0.0.1:1={2**63 - 1}", [("10.0.0.1:1", 2**63 - 1)]),
    ],
    ids=[
        "empty means no endpoints",
        "blank means no endpoints",
        "ipv4",
        "with instance id",
        "spaces around items and ids",
        "ipv6 in brackets",
        "ipv6 canonicalised",
        "highest port",
        "largest instance id",
    ],
)
def test_flag_parses(text: str, expected: list[tuple[str, int | None]]) -> None:
    endpoints = parse_endpoints_flag(text)
    assert [(e.address, e.instance_id) for e in endpoints] == expected
    assert all(e.engine == "vllm" and e.events_endpoint is None for e in endpoints)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.1", r"item 1 \('10.0.0.1'\): expected ip:port"),
        (":8000", r"item 1 .*expected ip:port"),
        ("gpu-0:8000", r"item 1 .*'gpu-0' is not an IP address \(hostnames are not accepted"),
        ("localhost:8000", r"hostnames are not accepted"),
        ("010.0.0.1:8000", r"'010.0.0.1' is not an IPv4 address"),
        ("10.0.0.256:8000", r"'10.0.0.256' is not an IPv4 address"),
        ("::1:8000", r"an IPv6 address needs brackets"),
        ("[::1]", r"expected \[ipv6\]:port"),
        ("[::1]8000", r"expected \[ipv6\]:port"),
        ("[10.0.0.1]:80", r"'10.0.0.1' is not an IPv6 address"),
        ("10.0.0.1:", r"port '' is not a number"),
        ("10.0.0.1:http", r"port 'http' is not a number"),
        ("10.0.0.1:+80", r"port '\+80' is not a number"),
        ("10.0.0.1:8_0", r"port '8_0' is not a number"),
        ("10.0.0.1:\uff18\uff10", r"is not a number"),
        ("10.0.0.1:0", r"port 0 is out of range 1..65535"),
        ("10.0.0.1:65536", r"port 65536 is out of range"),
        ("10.0.0.1:80=", r"instance id '' is not a non-negative integer"),
        ("10.0.0.1:80=-1", r"instance id '-1' is not a non-negative integer"),
        ("10.0.0.1:80=0x10", r"instance id '0x10'"),
        (f"10.0.0.1:80={2**63}", r"not an integer in \[0, 2\*\*63\)"),
        ("10.0.0.1:80,", r"item 2 is empty \(a stray comma\?\)"),
        ("10.0.0.1:80,,10.0.0.2:80", r"item 2 is empty"),
        ("10.0.0.1:80,10.0.0.2:80,10.0.0.1:80", r"item 3 \('10.0.0.1:80'\) repeats .* of .*item 1"),
        ("[::1]:80,[0:0::1]:80", r"item 2 .* repeats the address \[::1\]:80"),
        ("10.0.0.1:80,10.0.0.1:80=5", r"item 2 .* repeats"),
    ],
    ids=[
        "no port",
        "no host",
        "hostname",
        "localhost is a hostname too",
        "leading zero octet",
        "octet out of range",
        "ipv6 without brackets",
        "ipv6 without port",
        "ipv6 without colon before port",
        "ipv4 in brackets",
        "empty port",
        "named port",
        "signed port",
        "underscore in port",
        "non-ascii digits",
        "port zero",
        "port too high",
        "empty instance id",
        "negative instance id",
        "hex instance id",
        "instance id too large",
        "trailing comma",
        "double comma",
        "duplicate",
        "duplicate written differently",
        "duplicate with another id",
    ],
)
def test_flag_errors_name_the_bad_item(text: str, message: str) -> None:
    with pytest.raises(EndpointSpecError, match=message):
        parse_endpoints_flag(text)


def test_flag_uses_the_defaults() -> None:
    [endpoint] = parse_endpoints_flag(
        "[fd00::5]:8000", EndpointDefaults(engine="sglang", events_port=5557)
    )
    assert endpoint.engine == "sglang"
    assert endpoint.events_endpoint == "tcp://[fd00::5]:5557"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"engine": "tgi"}, "engine must be one of vllm, sglang, trtllm"),
        ({"events_port": 0}, "events port must be in 1..65535"),
        ({"events_port": 70000}, "events port must be in 1..65535"),
    ],
    ids=["unknown engine", "port zero", "port too high"],
)
def test_defaults_are_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(EndpointSpecError, match=message):
        EndpointDefaults(**kwargs)


def test_events_endpoint_convention() -> None:
    assert events_endpoint_for("10.0.0.7:8000", 5557) == "tcp://10.0.0.7:5557"
    assert events_endpoint_for("[fd00::7]:8000", 5557) == "tcp://[fd00::7]:5557"


# -- file entries --------------------------------------------------------------------------------

DEFAULTS = EndpointDefaults(events_port=5557)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("10.0.0.1:8000=3", ("10.0.0.1:8000", 3, "vllm", "both", {}, "tcp://10.0.0.1:5557", None)),
        (
            {"address": "10.0.0.1:8000"},
            ("10.0.0.1:8000", None, "vllm", "both", {}, "tcp://10.0.0.1:5557", None),
        ),
        (
            {
                "address": "10.0.0.1:8000",
                "instance_id": 7,
                "engine": "trtllm",
                "role": "prefill",
                "labels": {"llm-d.ai/role": "prefill", "zone": "a"},
                "events": "tcp://10.0.0.1:6000",
                "replay": "tcp://10.0.0.1:6001",
            },
            (
                "10.0.0.1:8000",
                7,
                "trtllm",
                "prefill",
                {"llm-d.ai/role": "prefill", "zone": "a"},
                "tcp://10.0.0.1:6000",
                "tcp://10.0.0.1:6001",
            ),
        ),
        (
            {"address": "10.0.0.1:8000", "events": None},
            ("10.0.0.1:8000", None, "vllm", "both", {}, None, None),
        ),
        (
            {"address": "10.0.0.1:8000", "instance_id": "12", "events": "ipc:///tmp/kv"},
            ("10.0.0.1:8000", 12, "vllm", "both", {}, "ipc:///tmp/kv", None),
        ),
    ],
    ids=[
        "string entry",
        "mapping with defaults",
        "every key",
        "events null opts out of the convention",
        "instance id as a string, ipc events",
    ],
)
def test_entries_parse(entry: object, expected: tuple[object, ...]) -> None:
    [endpoint] = parse_endpoint_entries([entry], DEFAULTS)
    assert spec(endpoint) == expected


@pytest.mark.parametrize(
    ("entry", "replay"),
    [
        ("10.0.0.1:8000", "tcp://10.0.0.1:5558"),
        ({"address": "10.0.0.1:8000"}, "tcp://10.0.0.1:5558"),
        ({"address": "10.0.0.1:8000", "events": "tcp://10.0.0.1:6000"}, None),
        ({"address": "10.0.0.1:8000", "replay": None}, None),
        ({"address": "10.0.0.1:8000", "replay": "tcp://10.0.0.1:7"}, "tcp://10.0.0.1:7"),
    ],
    ids=["flag-item", "mapping", "own-events-own-replay", "replay-null", "own-replay"],
)
def test_replay_port_convention(entry: object, replay: str | None) -> None:
    """--replay-port gives entries whose events come by convention a replay socket by
    convention too; an entry naming its own events names its own replay socket (or none)."""
    defaults = EndpointDefaults(events_port=5557, replay_port=5558)
    [endpoint] = parse_endpoint_entries([entry], defaults)
    assert endpoint.replay_endpoint == replay
    if isinstance(entry, str):
        assert parse_endpoints_flag(entry, defaults)[0].replay_endpoint == replay


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"address": "10.0.0.1:80"}, "f.yaml: expected a list of endpoints, got dict"),
        ("10.0.0.1:80", "expected a list of endpoints, got str"),
        (["10.0.0.1:80", 8000], r"f.yaml entry 1: expected a string or a mapping, got int 8000"),
        ([None], r"entry 0: expected a string or a mapping, got NoneType"),
        ([{"adress": "10.0.0.1:80"}], r"entry 0: unknown key 'adress'; did you mean 'address'\?"),
        (
            ["10.0.0.2:80", {"address": "10.0.0.1:80", "weight": 2}],
            r"entry 1: unknown key 'weight' \(allowed: address, engine, events",
        ),
        ([{}], r"entry 0: address must be a string"),
        ([{"address": 8000}], r"entry 0: address must be a string like 10.0.0.7:8000, got 8000"),
        ([{"address": "host:80"}], r"entry 0: 'host' is not an IP address"),
        ([{"address": "10.0.0.1:80", "engine": "tgi"}], r"engine must be one of vllm, sglang"),
        ([{"address": "10.0.0.1:80", "role": "decoder"}], r"role must be one of decode, prefill"),
        ([{"address": "10.0.0.1:80", "instance_id": True}], r"instance id True is not an integer"),
        ([{"address": "10.0.0.1:80", "instance_id": -2}], r"instance id -2 is not an integer"),
        ([{"address": "10.0.0.1:80", "instance_id": 1.5}], r"instance id 1.5"),
        ([{"address": "10.0.0.1:80", "labels": ["a"]}], r"labels must map strings to strings"),
        ([{"address": "10.0.0.1:80", "labels": {"gpu": 1}}], r"\(quote numbers\)"),
        ([{"address": "10.0.0.1:80", "events": "10.0.0.1:5557"}], r"events must be a ZMQ endpoint"),
        ([{"address": "10.0.0.1:80", "events": 5557}], r"events must be a ZMQ endpoint"),
        ([{"address": "10.0.0.1:80", "events": "tcp://10.0.0.1"}], r"events .* has no port"),
        ([{"address": "10.0.0.1:80", "replay": "tcp://10.0.0.1:x"}], r"port 'x' is not a number"),
        (
            ["10.0.0.1:80", {"address": "10.0.0.1:80"}],
            r"f.yaml entry 1 repeats the address 10.0.0.1:80 of f.yaml entry 0",
        ),
    ],
    ids=[
        "mapping instead of list",
        "string instead of list",
        "number entry",
        "null entry",
        "misspelt key",
        "unknown key lists the allowed ones",
        "no address",
        "numeric address",
        "hostname",
        "unknown engine",
        "unknown role",
        "boolean instance id",
        "negative instance id",
        "float instance id",
        "labels not a mapping",
        "label value not a string",
        "events without scheme",
        "events not a string",
        "events without port",
        "replay with a bad port",
        "duplicate address",
    ],
)
def test_entry_errors_name_the_entry(entries: object, message: str) -> None:
    with pytest.raises(EndpointSpecError, match=message):
        parse_endpoint_entries(entries, DEFAULTS, source="f.yaml")


# -- files ---------------------------------------------------------------------------------------

YAML = """\
# the fleet
- 10.0.0.1:8000=1
- address: 10.0.0.2:8000
  engine: sglang
  labels: {zone: b}
"""
JSON = (
    '["10.0.0.1:8000=1", {"address": "10.0.0.2:8000", "engine": "sglang", "labels": {"zone": "b"}}]'
)


@pytest.mark.parametrize(("name", "text"), [("f.yaml", YAML), ("f.json", JSON), ("f", JSON)])
def test_files_in_yaml_or_json(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    endpoints = load_endpoints_file(path, DEFAULTS)
    assert [spec(e) for e in endpoints] == [
        ("10.0.0.1:8000", 1, "vllm", "both", {}, "tcp://10.0.0.1:5557", None),
        ("10.0.0.2:8000", None, "sglang", "both", {"zone": "b"}, "tcp://10.0.0.2:5557", None),
    ]


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("f.yaml", b"", "the file is empty; write \\[\\] for no endpoints"),
        ("f.yaml", b"# nothing\n", "the file is empty"),
        ("f.yaml", b"[]\n", None),
        ("f.yaml", b"- 10.0.0.1:80\n- [oops\n", "f.yaml: while parsing"),
        ("f.json", b'["10.0.0.1:80",]', "f.json: Expecting value: line 1"),
        ("f.json", b"- 10.0.0.1:80", "f.json: Expecting value"),
        ("f.yaml", b"\xff\xfe", "f.yaml: not UTF-8"),
        ("f.yaml", b"- address: 10.0.0.1:80\n  port: 80\n", r"f.yaml entry 0: unknown key 'port'"),
        ("f.yaml", b"- [fd00::1]:8000\n", r'quote IPv6 addresses, "\[fd00::1\]:8000"'),
        ("f.yaml", b"- address: [::1]:8000\n", r"YAML reads \[...\] as a list"),
        ("f.yaml", b"- '[::1]:8000'\n- \"[::2]:8000\"\n", None),
    ],
    ids=[
        "empty",
        "only a comment",
        "explicit empty list is fine",
        "yaml syntax",
        "json syntax",
        "yaml in a json file",
        "not utf-8",
        "unknown key",
        "unquoted ipv6 item",
        "unquoted ipv6 address",
        "quoted ipv6 is fine",
    ],
)
def test_file_errors(tmp_path: Path, name: str, data: bytes, message: str | None) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    if message is None:
        load_endpoints_file(path)
        return
    with pytest.raises(EndpointSpecError, match=message):
        load_endpoints_file(path)


def test_an_absent_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_endpoints_file(tmp_path / "nope.yaml")
