"""One table of nvext injection cases, run against the Python merge (``kvgate.extproc.nvext``),
the body transformer over gRPC and through Envoy, and the Lua filter in Envoy.

Expectations are written out by hand here — never computed by the code under test. A case either
expects the body passed through unchanged for ``reason``, or the parsed result ``expected`` (and,
where the exact splice matters, the exact output bytes ``exact``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kvgate.extproc.nvext import Reason

MODEL = "Qwen/Qwen3-0.6B"
MESSAGES = [{"role": "user", "content": "hello"}]
U64_MAX = "18446744073709551615"


def agg(worker: str = "42", mode: str | None = "aggregated") -> dict[str, str]:
    headers = {"x-worker-instance-id": worker}
    if mode is not None:
        headers["x-dynamo-routing-mode"] = mode
    return headers


def disagg(prefill: str = "10", decode: str = "42") -> dict[str, str]:
    return {
        "x-dynamo-routing-mode": "disaggregated",
        "x-prefiller-host-port": prefill,
        "x-worker-instance-id": decode,
    }


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, **extra}


@dataclass(frozen=True)
class NvextCase:
    name: str
    body: bytes
    headers: dict[str, str]
    reason: Reason | None = None
    expected: Any = None
    exact: bytes | None = None
    replaced: bool = False
    tags: frozenset[str] = field(default_factory=frozenset)

    @property
    def unchanged(self) -> bool:
        return self.reason is not None


AGG_42 = {"backend_instance_id": 42}
DISAGG_10_42 = {"prefill_worker_id": 10, "decode_worker_id": 42}
BIG_TEXT = "lorem ipsum dolor sit amet " * 8_000  # ~216 KB: several 62,000-byte chunks

CASES: list[NvextCase] = [
    # -- headers -> fields ------------------------------------------------------------------------
    NvextCase(
        "aggregated",
        dumps(chat()),
        agg(),
        expected=chat(nvext=AGG_42),
        exact=b'{"model": "Qwen/Qwen3-0.6B","messages": [{"role": "user", "content": "hello"}],'
        b'"nvext":{"backend_instance_id":42}}',
    ),
    NvextCase("aggregated_mode_absent", dumps(chat()), agg(mode=None), expected=chat(nvext=AGG_42)),
    NvextCase("mode_empty_is_absent", dumps(chat()), agg(mode=""), expected=chat(nvext=AGG_42)),
    NvextCase(
        "mode_case_insensitive", dumps(chat()), agg(mode="Aggregated"), expected=chat(nvext=AGG_42)
    ),
    NvextCase("disaggregated", dumps(chat()), disagg(), expected=chat(nvext=DISAGG_10_42)),
    NvextCase(
        "unrelated_headers_ignored",
        dumps(chat()),
        {**disagg(prefill="7", decode="8"), "x-other": "1"},
        expected=chat(nvext={"prefill_worker_id": 7, "decode_worker_id": 8}),
    ),
    NvextCase(
        "aggregated_ignores_prefill_header",
        dumps(chat()),
        {**agg(), "x-prefiller-host-port": "10"},
        expected=chat(nvext=AGG_42),
    ),
    NvextCase(
        "u64_max_stays_an_exact_integer",
        b"{}",
        agg(U64_MAX),
        expected={"nvext": {"backend_instance_id": 2**64 - 1}},
        exact=b'{"nvext":{"backend_instance_id":18446744073709551615}}',
    ),
    NvextCase("zero_id", b"{}", agg("0"), expected={"nvext": {"backend_instance_id": 0}}),
    NvextCase(
        "leading_zeros_dropped",
        b"{}",
        disagg(prefill="007", decode="00"),
        exact=b'{"nvext":{"prefill_worker_id":7,"decode_worker_id":0}}',
        expected={"nvext": {"prefill_worker_id": 7, "decode_worker_id": 0}},
    ),
    NvextCase("u64_overflow", b"{}", agg("18446744073709551616"), reason=Reason.BAD_ID),
    NvextCase("id_too_many_digits", b"{}", agg("1" + "0" * 25), reason=Reason.BAD_ID),
    NvextCase("negative_id", b"{}", agg("-1"), reason=Reason.BAD_ID),
    NvextCase("plus_sign_id", b"{}", agg("+1"), reason=Reason.BAD_ID),
    NvextCase("float_id", b"{}", agg("1.5"), reason=Reason.BAD_ID),
    NvextCase("exponent_id", b"{}", agg("1e3"), reason=Reason.BAD_ID),
    NvextCase("hex_id", b"{}", agg("0x2a"), reason=Reason.BAD_ID),
    NvextCase("word_id", b"{}", agg("worker-a"), reason=Reason.BAD_ID),
    NvextCase("repeated_header_joined", b"{}", agg("1,2"), reason=Reason.BAD_ID),
    NvextCase(
        "llm_d_host_port_prefill", b"{}", disagg(prefill="10.0.0.1:8000"), reason=Reason.BAD_ID
    ),
    NvextCase("disaggregated_bad_decode", b"{}", disagg(decode="x"), reason=Reason.BAD_ID),
    NvextCase("no_headers", dumps(chat()), {}, reason=Reason.MISSING_HEADER),
    NvextCase(
        "aggregated_without_id",
        dumps(chat()),
        {"x-dynamo-routing-mode": "aggregated"},
        reason=Reason.MISSING_HEADER,
    ),
    NvextCase(
        "disaggregated_without_prefill",
        dumps(chat()),
        {"x-dynamo-routing-mode": "disaggregated", "x-worker-instance-id": "42"},
        reason=Reason.MISSING_HEADER,
    ),
    NvextCase(
        "disaggregated_without_decode",
        dumps(chat()),
        {"x-dynamo-routing-mode": "disaggregated", "x-prefiller-host-port": "10"},
        reason=Reason.MISSING_HEADER,
    ),
    NvextCase("unknown_mode", dumps(chat()), agg(mode="hybrid"), reason=Reason.UNKNOWN_MODE),
    NvextCase(
        "headers_checked_before_body",
        b"not json",
        {},
        reason=Reason.MISSING_HEADER,
    ),
    # -- merging into the client's nvext ---------------------------------------------------------
    NvextCase(
        "client_nvext_fields_survive",
        dumps(chat(nvext={"ignore_eos": True, "annotations": ["a", "b"]})),
        agg(),
        expected=chat(nvext={"ignore_eos": True, "annotations": ["a", "b"], **AGG_42}),
        exact=b'{"model": "Qwen/Qwen3-0.6B","messages": [{"role": "user", "content": "hello"}],'
        b'"nvext":{"ignore_eos": true,"annotations": ["a", "b"],"backend_instance_id":42}}',
    ),
    NvextCase(
        "client_backend_id_replaced",
        dumps(chat(nvext={"backend_instance_id": 7, "ignore_eos": False})),
        agg(),
        expected=chat(nvext={"ignore_eos": False, **AGG_42}),
    ),
    NvextCase(
        "aggregated_drops_stale_disaggregated_ids",
        dumps(chat(nvext={"prefill_worker_id": 1, "decode_worker_id": 2, "x": 3})),
        agg(),
        expected=chat(nvext={"x": 3, **AGG_42}),
    ),
    NvextCase(
        "disaggregated_drops_stale_backend_id",
        dumps(chat(nvext={"backend_instance_id": 1, "prefill_worker_id": 5})),
        disagg(),
        expected=chat(nvext=DISAGG_10_42),
    ),
    NvextCase(
        "nvext_keeps_its_position",
        b'{"nvext":{"a":1},"model":"m"}',
        agg(),
        expected={"nvext": {"a": 1, **AGG_42}, "model": "m"},
        exact=b'{"nvext":{"a":1,"backend_instance_id":42},"model":"m"}',
    ),
    NvextCase(
        "escaped_routing_name_is_still_routing",
        b'{"nvext":{"backend\\u005finstance_id":1,"k":2}}',
        agg(),
        expected={"nvext": {"k": 2, **AGG_42}},
    ),
    NvextCase(
        "escaped_nvext_name_is_still_nvext",
        b'{"\\u006evext":{"k":1},"m":2}',
        agg(),
        expected={"nvext": {"k": 1, **AGG_42}, "m": 2},
        exact=b'{"nvext":{"k":1,"backend_instance_id":42},"m":2}',
    ),
    NvextCase(
        "duplicate_nvext_merged_into_last_written_once",
        b'{"nvext":{"a":1},"m":2,"nvext":{"b":2,"backend_instance_id":9}}',
        agg(),
        expected={"nvext": {"b": 2, **AGG_42}, "m": 2},
        exact=b'{"nvext":{"b":2,"backend_instance_id":42},"m":2}',
    ),
    NvextCase(
        "duplicate_member_inside_nvext_kept_raw",
        b'{"nvext":{"ignore_eos":false,"ignore_eos":true}}',
        agg(),
        expected={"nvext": {"ignore_eos": True, **AGG_42}},
        exact=b'{"nvext":{"ignore_eos":false,"ignore_eos":true,"backend_instance_id":42}}',
    ),
    NvextCase("empty_nvext", b'{"nvext":{}}', agg(), expected={"nvext": AGG_42}),
    NvextCase(
        "null_nvext_replaced",
        dumps(chat(nvext=None)),
        agg(),
        expected=chat(nvext=AGG_42),
        replaced=True,
    ),
    NvextCase(
        "string_nvext_replaced",
        dumps(chat(nvext="x")),
        disagg(),
        expected=chat(nvext=DISAGG_10_42),
        replaced=True,
    ),
    NvextCase(
        "array_nvext_replaced",
        b'{"nvext":[{"backend_instance_id":1}]}',
        agg(),
        expected={"nvext": AGG_42},
        replaced=True,
    ),
    NvextCase(
        "last_duplicate_null_wins",
        b'{"nvext":{"a":1},"nvext":null}',
        agg(),
        expected={"nvext": AGG_42},
        replaced=True,
    ),
    NvextCase(
        "nested_nvext_untouched",
        b'{"metadata":{"nvext":{"backend_instance_id":1}}}',
        agg(),
        expected={"metadata": {"nvext": {"backend_instance_id": 1}}, "nvext": AGG_42},
    ),
    NvextCase(
        "nvext_text_inside_a_string",
        dumps(chat(prompt='say "nvext": {"backend_instance_id": 1}, }{')),
        agg(),
        expected=chat(prompt='say "nvext": {"backend_instance_id": 1}, }{', nvext=AGG_42),
    ),
    # -- the rest of the body is preserved -------------------------------------------------------
    NvextCase("empty_object", b"{}", agg(), expected={"nvext": AGG_42}),
    NvextCase(
        "whitespace_everywhere",
        b' \r\n\t{ "model" : "m" ,\n "n" : [ 1 , 2 ] } \n',
        agg(),
        expected={"model": "m", "n": [1, 2], "nvext": AGG_42},
        exact=b'{"model" : "m","n" : [ 1 , 2 ],"nvext":{"backend_instance_id":42}}',
    ),
    NvextCase(
        "numbers_copied_verbatim",
        b'{"a":1e400,"b":1.0,"c":-0,"d":123456789012345678901234567890,"e":1E-7}',
        agg(),
        exact=b'{"a":1e400,"b":1.0,"c":-0,"d":123456789012345678901234567890,"e":1E-7,'
        b'"nvext":{"backend_instance_id":42}}',
        expected={
            "a": float("inf"),
            "b": 1.0,
            "c": 0,
            "d": 123456789012345678901234567890,
            "e": 1e-7,
            "nvext": AGG_42,
        },
    ),
    NvextCase(
        "unicode_and_escapes_copied_verbatim",
        '{"c":"你好 😀 \\ud83d\\ude00 \\u00e9 \\"q\\" \\\\ \\/ \\b\\f\\n\\r\\t"}'.encode(),
        agg(),
        expected={"c": '你好 😀 😀 é "q" \\ / \b\f\n\r\t', "nvext": AGG_42},
    ),
    NvextCase(
        "lone_surrogate_escape_is_valid_json",
        b'{"c":"\\ud800"}',
        agg(),
        expected={"c": "\ud800", "nvext": AGG_42},
    ),
    NvextCase(
        "deep_nesting",
        b'{"a":' + b'[{"b":' * 60 + b"null" + b"}]" * 60 + b"}",
        agg(),
        expected={"a": json.loads(b'[{"b":' * 60 + b"null" + b"}]" * 60), "nvext": AGG_42},
    ),
    NvextCase(
        "duplicate_other_members_kept",
        b'{"model":"a","model":"b"}',
        agg(),
        expected={"model": "b", "nvext": AGG_42},
        exact=b'{"model":"a","model":"b","nvext":{"backend_instance_id":42}}',
    ),
    NvextCase(
        "large_body",
        dumps(chat(prompt=BIG_TEXT, nvext={"ignore_eos": True})),
        agg(),
        expected=chat(prompt=BIG_TEXT, nvext={"ignore_eos": True, **AGG_42}),
        tags=frozenset({"large"}),
    ),
    # -- bodies left alone ------------------------------------------------------------------------
    NvextCase("not_json_text", b"hello", agg(), reason=Reason.NOT_JSON),
    NvextCase("empty_body", b"", agg(), reason=Reason.NOT_JSON),
    NvextCase("whitespace_body", b" \n ", agg(), reason=Reason.NOT_JSON),
    NvextCase("truncated_json", b'{"model":', agg(), reason=Reason.NOT_JSON),
    NvextCase("truncated_string", b'{"model":"m', agg(), reason=Reason.NOT_JSON),
    NvextCase("trailing_garbage", b'{"a":1} x', agg(), reason=Reason.NOT_JSON),
    NvextCase("two_objects", b"{}{}", agg(), reason=Reason.NOT_JSON),
    NvextCase("trailing_comma", b'{"a":1,}', agg(), reason=Reason.NOT_JSON),
    NvextCase("single_quotes", b"{'a':1}", agg(), reason=Reason.NOT_JSON),
    NvextCase("unquoted_name", b"{a:1}", agg(), reason=Reason.NOT_JSON),
    NvextCase("nan_literal", b'{"a":NaN}', agg(), reason=Reason.NOT_JSON),
    NvextCase("infinity_literal", b'{"a":-Infinity}', agg(), reason=Reason.NOT_JSON),
    NvextCase("leading_zero_number", b'{"a":01}', agg(), reason=Reason.NOT_JSON),
    NvextCase("dangling_decimal_point", b'{"a":1.}', agg(), reason=Reason.NOT_JSON),
    NvextCase("bad_escape", b'{"a":"\\x41"}', agg(), reason=Reason.NOT_JSON),
    NvextCase("short_unicode_escape", b'{"a":"\\u12"}', agg(), reason=Reason.NOT_JSON),
    NvextCase("raw_control_character", b'{"a":"x\ny"}', agg(), reason=Reason.NOT_JSON),
    NvextCase("invalid_utf8", b'{"a":"\xff"}', agg(), reason=Reason.NOT_JSON),
    NvextCase("utf8_encoded_surrogate", b'{"a":"\xed\xa0\x80"}', agg(), reason=Reason.NOT_JSON),
    NvextCase("overlong_utf8", b'{"a":"\xc0\xaf"}', agg(), reason=Reason.NOT_JSON),
    NvextCase("utf8_bom", b'\xef\xbb\xbf{"a":1}', agg(), reason=Reason.NOT_JSON),
    NvextCase("invalid_json_inside_nvext", b'{"nvext":{"a":}}', agg(), reason=Reason.NOT_JSON),
    NvextCase("unclosed_nested_array", b'{"a":[1,{"b":2}}', agg(), reason=Reason.NOT_JSON),
    NvextCase(
        "nesting_too_deep",
        b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        agg(),
        reason=Reason.NOT_JSON,
    ),
    NvextCase("array_body", b'[{"model":"m"}]', agg(), reason=Reason.NOT_OBJECT),
    NvextCase("string_body", b'"hello"', agg(), reason=Reason.NOT_OBJECT),
    NvextCase("number_body", b" 42 ", agg(), reason=Reason.NOT_OBJECT),
    NvextCase("null_body", b"null", agg(), reason=Reason.NOT_OBJECT),
]

CASE_IDS = [case.name for case in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS), "case names must be unique"
