"""The nvext merge: the shared case table, then properties over random bodies."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.extproc.nvext import (
    ROUTING_FIELDS,
    Injected,
    Reason,
    RoutingFields,
    Unchanged,
    inject_nvext,
    merge_nvext,
    routing_fields,
    strip_routing_fields,
)
from tests.extproc.nvext_cases import CASE_IDS, CASES, NvextCase, agg, disagg


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_table(case: NvextCase) -> None:
    result = inject_nvext(case.body, case.headers)
    if case.unchanged:
        assert isinstance(result, Unchanged), result
        assert result.reason == case.reason, result.detail
        assert result.detail
        return
    assert isinstance(result, Injected), result
    assert json.loads(result.body) == case.expected
    assert _top_level_names(result.body).count("nvext") == 1
    assert result.replaced_non_object == case.replaced
    if case.exact is not None:
        assert result.body == case.exact


def test_routing_fields_are_typed_integers() -> None:
    fields = routing_fields(disagg(prefill="5", decode="18446744073709551615"))
    assert fields == RoutingFields(
        "disaggregated", (("prefill_worker_id", 5), ("decode_worker_id", 2**64 - 1))
    )
    assert isinstance(fields, RoutingFields)
    assert fields.json_members() == '"prefill_worker_id":5,"decode_worker_id":18446744073709551615'


def test_header_whitespace_is_trimmed() -> None:
    assert routing_fields(agg(" 42\t", mode=" aggregated ")) == RoutingFields(
        "aggregated", (("backend_instance_id", 42),)
    )


def test_unicode_digits_are_not_ids() -> None:
    # str.isdigit() and int() accept these; a header id must be ASCII decimal.
    for value in ("٤٢", "４２", "4_2"):
        result = routing_fields(agg(value))
        assert isinstance(result, Unchanged)
        assert result.reason == Reason.BAD_ID


def test_merge_without_headers_api() -> None:
    routing = RoutingFields("aggregated", (("backend_instance_id", 3),))
    result = merge_nvext(b'{"a":1}', routing)
    assert isinstance(result, Injected)
    assert result.body == b'{"a":1,"nvext":{"backend_instance_id":3}}'
    assert result.routing is routing


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"a":1}', None),
        (b'{"a":1,"nvext":{"ignore_eos":true}}', None),
        (b'{"a":1,"nvext":"x"}', None),
        (b'{"a":1, "nvext": {"backend_instance_id": 7, "ignore_eos": true}, "b": 2}',
         b'{"a":1,"nvext":{"ignore_eos": true},"b": 2}'),
        (b'{"nvext":{"prefill_worker_id":1,"decode_worker_id":2}}', b'{"nvext":{}}'),
        # An escaped key is the same key to the backend's parser.
        (b'{"nvext":{"backend\\u005finstance_id":7}}', b'{"nvext":{}}'),
        # Duplicates: one nvext, the last, without routing fields, where the first was.
        (b'{"nvext":{"backend_instance_id":7},"m":1,"nvext":{"annotations":["x"]}}',
         b'{"nvext":{"annotations":["x"]},"m":1}'),
        (b'{"nvext":{"ignore_eos":true},"nvext":null}', b'{"nvext":null}'),
        (b'[1]', None),
        (b'{"nvext":', None),
    ],
    ids=["no-nvext", "nothing-to-strip", "non-object", "routing-dropped", "all-routing",
         "escaped-key", "duplicates", "duplicate-non-object", "not-an-object", "not-json"],
)  # fmt: skip
def test_strip_routing_fields(body: bytes, expected: bytes | None) -> None:
    assert strip_routing_fields(body) == expected


# -- properties ---------------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=16,
)
_routing_names = st.sampled_from(sorted(ROUTING_FIELDS))
_client_nvext = _values | st.dictionaries(_routing_names | st.text(max_size=8), _values, max_size=5)
_ids = st.integers(0, 2**64 - 1).map(str)
_headers = st.builds(agg, _ids, st.sampled_from(["aggregated", "AGGREGATED", None])) | st.builds(
    disagg, _ids, _ids
)


def _top_level_pairs(body: bytes) -> list[tuple[str, Any]]:
    calls: list[list[tuple[str, Any]]] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        calls.append(pairs)
        return dict(pairs)

    json.loads(body, object_pairs_hook=hook)
    return calls[-1]  # the outermost object is completed last


def _top_level_names(body: bytes) -> list[str]:
    return [name for name, _ in _top_level_pairs(body)]


def _expected_nvext(client: Any, headers: dict[str, str]) -> dict[str, Any]:
    base = dict(client) if isinstance(client, dict) else {}
    merged = {k: v for k, v in base.items() if k not in ROUTING_FIELDS}
    if headers.get("x-dynamo-routing-mode") == "disaggregated":
        merged["prefill_worker_id"] = int(headers["x-prefiller-host-port"])
        merged["decode_worker_id"] = int(headers["x-worker-instance-id"])
    else:
        merged["backend_instance_id"] = int(headers["x-worker-instance-id"])
    return merged


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(
    others=st.dictionaries(st.text(max_size=8).filter(lambda k: k != "nvext"), _values, max_size=6),
    client_nvext=st.none() | _client_nvext.map(lambda v: (v,)),
    position=st.integers(0, 6),
    headers=_headers,
    style=st.fixed_dictionaries(
        {"ensure_ascii": st.booleans(), "indent": st.sampled_from([None, 0, 2])}
    ),
)
def test_random_objects_get_exactly_one_merged_nvext(
    others: dict[str, Any],
    client_nvext: tuple[Any] | None,
    position: int,
    headers: dict[str, str],
    style: dict[str, Any],
) -> None:
    items = list(others.items())
    if client_nvext is not None:
        items.insert(min(position, len(items)), ("nvext", client_nvext[0]))
    body = json.dumps(dict(items), **style).encode()

    result = inject_nvext(body, headers)

    assert isinstance(result, Injected), result
    pairs = _top_level_pairs(result.body)
    names = [name for name, _ in pairs]
    assert names.count("nvext") == 1
    assert [n for n in names if n != "nvext"] == list(others)  # order kept
    if client_nvext is not None:
        assert names.index("nvext") == min(position, len(items) - 1)
    parsed = dict(pairs)
    assert {k: v for k, v in parsed.items() if k != "nvext"} == others
    client = client_nvext[0] if client_nvext is not None else None
    assert parsed["nvext"] == _expected_nvext(client, headers)
    assert result.replaced_non_object == (client_nvext is not None and not isinstance(client, dict))


def _oracle_object(body: bytes) -> bool:
    """Whether a strict JSON parser sees an object (NaN/Infinity refused)."""

    def refuse(name: str) -> Any:
        raise ValueError(name)

    try:
        return isinstance(json.loads(body.decode("utf-8"), parse_constant=refuse), dict)
    except (ValueError, RecursionError):
        return False


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80) | st.text(max_size=40).map(str.encode))
def test_arbitrary_bytes_never_raise(body: bytes) -> None:
    result = inject_nvext(body, agg())
    assert isinstance(result, Injected) == _oracle_object(body)
    if isinstance(result, Injected):
        assert _top_level_names(result.body).count("nvext") == 1


@settings(max_examples=300, deadline=None)
@given(value=_values, cut=st.integers(0, 400), junk=st.sampled_from(["", "}", ",", "x", " "]))
def test_damaged_json_agrees_with_a_strict_parser(value: Any, cut: int, junk: str) -> None:
    text = json.dumps({"v": value, "w": [value]})
    body = (text[: min(cut, len(text))] + junk).encode()
    result = inject_nvext(body, agg())
    assert isinstance(result, Injected) == _oracle_object(body)
    if isinstance(result, Unchanged):
        assert result.reason in (Reason.NOT_JSON, Reason.NOT_OBJECT)


@settings(max_examples=200, deadline=None)
@given(_values)
def test_non_object_json_is_not_object(value: Any) -> None:
    body = json.dumps(value).encode()
    result = inject_nvext(body, agg())
    if isinstance(value, dict):
        assert isinstance(result, Injected)
    else:
        assert isinstance(result, Unchanged)
        assert result.reason == Reason.NOT_OBJECT


@settings(max_examples=300, deadline=None)
@given(
    others=st.dictionaries(st.text(max_size=8).filter(lambda k: k != "nvext"), _values, max_size=6),
    client_nvext=_client_nvext,
    position=st.integers(0, 6),
    style=st.fixed_dictionaries(
        {"ensure_ascii": st.booleans(), "indent": st.sampled_from([None, 0, 2])}
    ),
)
def test_stripping_removes_exactly_the_routing_fields(
    others: dict[str, Any], client_nvext: Any, position: int, style: dict[str, Any]
) -> None:
    items = list(others.items())
    items.insert(min(position, len(items)), ("nvext", client_nvext))
    body = json.dumps(dict(items), **style).encode()

    stripped = strip_routing_fields(body)

    routing = isinstance(client_nvext, dict) and not ROUTING_FIELDS.isdisjoint(client_nvext)
    assert (stripped is not None) == routing
    if stripped is None:
        return
    pairs = _top_level_pairs(stripped)
    assert [name for name, _ in pairs] == [name for name, _ in items]
    parsed = dict(pairs)
    assert {k: v for k, v in parsed.items() if k != "nvext"} == others
    assert parsed["nvext"] == {k: v for k, v in client_nvext.items() if k not in ROUTING_FIELDS}
