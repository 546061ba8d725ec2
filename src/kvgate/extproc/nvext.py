"""Routing headers → the ``nvext`` field of an OpenAI request body (what Dynamo workers read).

The endpoint picker names its choice in headers; a Dynamo backend only looks at the body:

- aggregated (``x-dynamo-routing-mode: aggregated``, or no mode header but an instance id):
  ``"nvext": {"backend_instance_id": <x-worker-instance-id>}``;
- disaggregated: ``"nvext": {"prefill_worker_id": <x-prefiller-host-port>,
  "decode_worker_id": <x-worker-instance-id>}``.

Ids must be decimal integers in the u64 range and are written as JSON integers (leading zeros are
dropped). The mode is compared case-insensitively; an empty header counts as absent.

The body is *merged into*, never rebuilt: a client's own ``nvext`` object keeps its other fields
(``ignore_eos``, ``annotations``...) and only the routing fields (``backend_instance_id``,
``prefill_worker_id``, ``decode_worker_id``) are dropped before ours are appended, so a stale id
of the other mode cannot survive either. A client ``nvext`` that is not an object (``null``, a
string...) is replaced by ours — the backend would refuse it anyway and the request must still be
routed — and the result says so (``replaced_non_object``) so callers can count it. With duplicate
top-level ``nvext`` keys the last one is the base (as every JSON parser reads it) and the merged
object is written once, where the first one was.

Every other member is copied byte for byte from the input (numbers such as ``1e400`` or
``1.0`` and escapes survive unchanged); only whitespace between top-level members, and inside
``nvext``, is dropped. The Lua filter in ``deploy/lua-filter/`` implements the same splice, so the
two produce identical bytes (tests check it).

Without routing headers (a picker that names no Dynamo worker, e.g. round-robin) the client's
routing fields are still removed: :func:`strip_routing_fields`, which the endpoint picker applies to
every body, so that no client picks its worker through ``nvext`` whatever rewrites the body later.

Nothing is changed — and :class:`Unchanged` says why — when the headers are missing or invalid
(checked first, so no JSON work is spent on requests that were not routed), the body is not UTF-8
JSON (``NaN``/``Infinity`` refused; integers longer than Python's 4,300-digit conversion limit
are refused too), or it is valid JSON but not an object.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

WORKER_ID_HEADER = "x-worker-instance-id"
PREFILL_HEADER = "x-prefiller-host-port"
MODE_HEADER = "x-dynamo-routing-mode"
AGGREGATED = "aggregated"
DISAGGREGATED = "disaggregated"
NVEXT = "nvext"
BACKEND_INSTANCE_ID = "backend_instance_id"
PREFILL_WORKER_ID = "prefill_worker_id"
DECODE_WORKER_ID = "decode_worker_id"
ROUTING_FIELDS = frozenset({BACKEND_INSTANCE_ID, PREFILL_WORKER_ID, DECODE_WORKER_ID})
U64_MAX = 2**64 - 1


class Reason(StrEnum):
    """Why a body was passed through unchanged (a metric label: keep the set small)."""

    MISSING_HEADER = "missing_header"
    BAD_ID = "bad_id"
    UNKNOWN_MODE = "unknown_mode"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"


@dataclass(frozen=True, slots=True)
class Unchanged:
    reason: Reason
    detail: str


@dataclass(frozen=True, slots=True)
class RoutingFields:
    """The nvext routing members to write, in order, e.g. ``(("backend_instance_id", 42),)``."""

    mode: str
    fields: tuple[tuple[str, int], ...]

    def json_members(self) -> str:
        return ",".join(f'"{name}":{value}' for name, value in self.fields)


@dataclass(frozen=True, slots=True)
class Injected:
    body: bytes
    routing: RoutingFields
    replaced_non_object: bool
    """The client's ``nvext`` was not an object and was replaced."""


NvextResult = Injected | Unchanged

_DIGITS = re.compile(r"[0-9]+")
_WS = re.compile(r"[ \t\n\r]*")


def _header(headers: Mapping[str, str], name: str) -> str:
    return headers.get(name, "").strip(" \t")


def _parse_id(header: str, value: str) -> int | Unchanged:
    if _DIGITS.fullmatch(value) is None:
        return Unchanged(Reason.BAD_ID, f"{header}: {value[:64]!r} is not a decimal integer")
    number = int(value)
    if number > U64_MAX:
        return Unchanged(Reason.BAD_ID, f"{header}: {value[:64]!r} is outside the u64 range")
    return number


def routing_fields(headers: Mapping[str, str]) -> RoutingFields | Unchanged:
    """The nvext members the routing headers ask for (header names lower-case)."""
    mode = _header(headers, MODE_HEADER).lower()
    decode = _header(headers, WORKER_ID_HEADER)
    if not mode:
        if not decode:
            return Unchanged(Reason.MISSING_HEADER, f"no {WORKER_ID_HEADER} header")
        mode = AGGREGATED
    if mode == AGGREGATED:
        if not decode:
            return Unchanged(Reason.MISSING_HEADER, f"aggregated mode without {WORKER_ID_HEADER}")
        backend = _parse_id(WORKER_ID_HEADER, decode)
        if isinstance(backend, Unchanged):
            return backend
        return RoutingFields(mode, ((BACKEND_INSTANCE_ID, backend),))
    if mode == DISAGGREGATED:
        prefill_text = _header(headers, PREFILL_HEADER)
        if not decode or not prefill_text:
            return Unchanged(
                Reason.MISSING_HEADER,
                f"disaggregated mode needs both {WORKER_ID_HEADER} and {PREFILL_HEADER}",
            )
        prefill = _parse_id(PREFILL_HEADER, prefill_text)
        if isinstance(prefill, Unchanged):
            return prefill
        decode_id = _parse_id(WORKER_ID_HEADER, decode)
        if isinstance(decode_id, Unchanged):
            return decode_id
        return RoutingFields(mode, ((PREFILL_WORKER_ID, prefill), (DECODE_WORKER_ID, decode_id)))
    return Unchanged(Reason.UNKNOWN_MODE, f"{MODE_HEADER}: {mode[:64]!r} is not a known mode")


class _NonStandardConstant(ValueError):
    pass


def _refuse_constant(name: str) -> object:
    # NaN / Infinity are Python extensions, not JSON; a backend would reject them.
    raise _NonStandardConstant(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


class _Invalid(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Member:
    key: str
    start: int
    value_start: int
    end: int


def _skip_ws(text: str, pos: int) -> int:
    match = _WS.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _members(text: str, pos: int) -> tuple[list[_Member], int]:
    """The members of the object at ``text[pos] == "{"`` and the index after its ``}``.

    Values are parsed by the C decoder (validating them), but only their spans are kept.
    """
    members: list[_Member] = []
    pos = _skip_ws(text, pos + 1)
    if text.startswith("}", pos):
        return members, pos + 1
    while True:
        if not text.startswith('"', pos):
            raise _Invalid(f"expected a member name at {pos}")
        key, key_end = _DECODER.raw_decode(text, pos)
        colon = _skip_ws(text, key_end)
        if not text.startswith(":", colon):
            raise _Invalid(f"expected ':' at {colon}")
        value_start = _skip_ws(text, colon + 1)
        _, value_end = _DECODER.raw_decode(text, value_start)
        members.append(_Member(key, pos, value_start, value_end))
        after = _skip_ws(text, value_end)
        if text.startswith(",", after):
            pos = _skip_ws(text, after + 1)
        elif text.startswith("}", after):
            return members, after + 1
        else:
            raise _Invalid(f"expected ',' or '}}' at {after}")


def _classify_non_object(text: str, start: int) -> Unchanged:
    try:
        _, end = _DECODER.raw_decode(text, start)
    except (ValueError, RecursionError) as err:
        return Unchanged(Reason.NOT_JSON, f"body is not JSON: {err}")
    if _skip_ws(text, end) != len(text):
        return Unchanged(Reason.NOT_JSON, f"body is not JSON: extra data at {end}")
    return Unchanged(Reason.NOT_OBJECT, "body is JSON but not an object")


@dataclass(frozen=True, slots=True)
class _Spliced:
    """A JSON object body cut into its members, with what its ``nvext`` keeps."""

    text: str
    members: list[_Member]
    nvext_members: list[_Member]
    kept: list[str]
    """The base ``nvext`` object's members other than routing fields, as written."""
    had_routing: bool
    """The base ``nvext`` object had routing fields (now dropped from ``kept``)."""
    non_object: bool
    """The base ``nvext`` is not an object."""

    def write(self, nvext_value: str) -> bytes:
        """The body with one ``nvext`` member of value ``nvext_value``, where the first was (or
        last when there was none); every other member as written."""
        nvext = f'"{NVEXT}":{nvext_value}'
        parts: list[str] = []
        for member in self.members:
            if member.key != NVEXT:
                parts.append(self.text[member.start : member.end])
            elif member is self.nvext_members[0]:
                parts.append(nvext)
        if not self.nvext_members:
            parts.append(nvext)
        return f"{{{','.join(parts)}}}".encode()


def _splice(body: bytes) -> _Spliced | Unchanged:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        return Unchanged(Reason.NOT_JSON, f"body is not UTF-8: {err}")
    start = _skip_ws(text, 0)
    if not text.startswith("{", start):
        return _classify_non_object(text, start)
    try:
        members, end = _members(text, start)
        if _skip_ws(text, end) != len(text):
            raise _Invalid(f"extra data at {end}")
        nvext_members = [m for m in members if m.key == NVEXT]
        kept: list[str] = []
        had_routing = non_object = False
        if nvext_members:
            base = nvext_members[-1]
            if text.startswith("{", base.value_start):
                inner, _ = _members(text, base.value_start)
                kept = [text[m.start : m.end] for m in inner if m.key not in ROUTING_FIELDS]
                had_routing = len(kept) != len(inner)
            else:
                non_object = True
    except (_Invalid, ValueError, RecursionError) as err:
        return Unchanged(Reason.NOT_JSON, f"body is not JSON: {err}")
    return _Spliced(text, members, nvext_members, kept, had_routing, non_object)


def merge_nvext(body: bytes, routing: RoutingFields) -> NvextResult:
    """``body`` with ``routing`` merged into its top-level ``nvext`` object."""
    spliced = _splice(body)
    if isinstance(spliced, Unchanged):
        return spliced
    members = [*spliced.kept, routing.json_members()]
    return Injected(spliced.write(f"{{{','.join(members)}}}"), routing, spliced.non_object)


def strip_routing_fields(body: bytes) -> bytes | None:
    """``body`` without the routing fields a client put in its ``nvext`` object, or None when it
    has none to remove (or is not a JSON object).

    What a client may not choose is which worker serves it: every other ``nvext`` member stays.
    Several top-level ``nvext`` keys are written as one (the last, as JSON parsers read it), so
    a backend reading the first cannot see a routing field either.
    """
    spliced = _splice(body)
    if isinstance(spliced, Unchanged) or not spliced.nvext_members:
        return None
    if len(spliced.nvext_members) == 1 and not spliced.had_routing:
        return None
    if spliced.non_object:
        base = spliced.nvext_members[-1]
        return spliced.write(spliced.text[base.value_start : base.end])
    return spliced.write(f"{{{','.join(spliced.kept)}}}")


def inject_nvext(body: bytes, headers: Mapping[str, str]) -> NvextResult:
    """The body with the routing headers' nvext fields merged in, or why it stays unchanged."""
    routing = routing_fields(headers)
    if isinstance(routing, Unchanged):
        return routing
    return merge_nvext(body, routing)
