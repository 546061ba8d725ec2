"""KvRouterConfig.from_env: the seed's DYNAMO_* variables, validated strictly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.errors import ConfigError
from kvgate.scheduling.router_config import KvRouterConfig

BASE = {"DYNAMO_KV_BLOCK_SIZE": "16"}
TRUE_SPELLINGS = ["true", "1", "yes", "on", "TRUE", "Yes", "oN", " true ", "True\n"]
FALSE_SPELLINGS = ["false", "0", "no", "off", "FALSE", "No", "OFF", " off\t"]
BOOL_VARS = {
    "DYNAMO_USE_KV_ROUTING": "use_kv_routing",
    "DYNAMO_USE_KV_EVENTS": "use_kv_events",
    "DYNAMO_ROUTER_REPLICA_SYNC": "replica_sync",
}


def test_defaults() -> None:
    config = KvRouterConfig.from_env(BASE)
    assert config == KvRouterConfig(
        block_size=16,
        use_kv_routing=True,
        use_kv_events=True,
        overlap_score_weight=1.0,
        temperature=0.0,
        busy_threshold=None,
        replica_sync=False,
        namespace=None,
        request_expiry_s=300.0,
    )


def test_every_variable_is_read() -> None:
    config = KvRouterConfig.from_env(
        {
            "DYN_NAMESPACE": "prod",
            "DYNAMO_KV_BLOCK_SIZE": "64",
            "DYNAMO_USE_KV_ROUTING": "true",
            "DYNAMO_USE_KV_EVENTS": "false",
            "DYNAMO_OVERLAP_SCORE_WEIGHT": "2.5",
            "DYNAMO_ROUTER_TEMPERATURE": "0.7",
            "DYNAMO_BUSY_THRESHOLD": "0.9",
            "DYNAMO_ROUTER_REPLICA_SYNC": "true",
        }
    )
    assert config == KvRouterConfig(
        block_size=64,
        use_kv_routing=True,
        use_kv_events=False,
        overlap_score_weight=2.5,
        temperature=0.7,
        busy_threshold=0.9,
        replica_sync=True,
        namespace="prod",
    )


def test_unrelated_variables_are_ignored() -> None:
    assert KvRouterConfig.from_env({**BASE, "PATH": "/bin", "DYNAMO_FOO": "x"}) == (
        KvRouterConfig.from_env(BASE)
    )


@pytest.mark.parametrize("value", [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192])
def test_block_size_accepts_powers_of_two_in_range(value: int) -> None:
    assert KvRouterConfig.from_env({"DYNAMO_KV_BLOCK_SIZE": str(value)}).block_size == value


def test_block_size_tolerates_surrounding_whitespace() -> None:
    assert KvRouterConfig.from_env({"DYNAMO_KV_BLOCK_SIZE": " 32\n"}).block_size == 32


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        pytest.param(None, "required", id="missing"),
        pytest.param("", "required", id="empty"),
        pytest.param("   ", "required", id="blank"),
        pytest.param("sixteen", "integer", id="word"),
        pytest.param("16.0", "integer", id="float-spelling"),
        pytest.param("0x10", "integer", id="hex"),
        pytest.param("48", "power of two", id="not-power-of-two"),
        pytest.param("8", "[16, 8192]", id="power-of-two-below-16"),
        pytest.param("16384", "[16, 8192]", id="power-of-two-above-8192"),
        pytest.param("0", "power of two", id="zero"),
        pytest.param("-16", "power of two", id="negative"),
        pytest.param("1" * 5000, "integer", id="absurdly-long"),
    ],
)
def test_block_size_refused_with_field_and_what_is_allowed(raw: str | None, says: str) -> None:
    env = {} if raw is None else {"DYNAMO_KV_BLOCK_SIZE": raw}
    with pytest.raises(ConfigError) as caught:
        KvRouterConfig.from_env(env)
    err = caught.value
    assert err.field == "DYNAMO_KV_BLOCK_SIZE"
    assert says in err.reason
    assert str(err).startswith("DYNAMO_KV_BLOCK_SIZE: ")
    if raw is not None and raw.strip() and "integer" not in says:
        assert "power of two in [16, 8192]" in err.reason  # what to set it to
    assert isinstance(err, ValueError)


@pytest.mark.parametrize("routing", ["false", "0", "no", "off"])
def test_block_size_not_required_without_kv_routing(routing: str) -> None:
    config = KvRouterConfig.from_env({"DYNAMO_USE_KV_ROUTING": routing})
    assert config.use_kv_routing is False


def test_invalid_block_size_refused_even_without_kv_routing() -> None:
    with pytest.raises(ConfigError) as caught:
        KvRouterConfig.from_env({"DYNAMO_USE_KV_ROUTING": "false", "DYNAMO_KV_BLOCK_SIZE": "17"})
    assert caught.value.field == "DYNAMO_KV_BLOCK_SIZE"


@pytest.mark.parametrize("var", BOOL_VARS)
@pytest.mark.parametrize("raw", TRUE_SPELLINGS + FALSE_SPELLINGS)
def test_boolean_spellings(var: str, raw: str) -> None:
    config = KvRouterConfig.from_env({**BASE, var: raw})
    assert getattr(config, BOOL_VARS[var]) is (raw in TRUE_SPELLINGS)


@pytest.mark.parametrize("var", BOOL_VARS)
@pytest.mark.parametrize("raw", ["", "  "])
def test_blank_boolean_means_default(var: str, raw: str) -> None:
    assert getattr(KvRouterConfig.from_env({**BASE, var: raw}), BOOL_VARS[var]) is getattr(
        KvRouterConfig.from_env(BASE), BOOL_VARS[var]
    )


@pytest.mark.parametrize("var", BOOL_VARS)
@pytest.mark.parametrize("raw", ["y", "n", "2", "enabled", "truee", "t", "nope"])
def test_unknown_boolean_spelling_refused(var: str, raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        KvRouterConfig.from_env({**BASE, var: raw})
    assert caught.value.field == var
    assert "true/1/yes/on" in caught.value.reason
    assert "false/0/no/off" in caught.value.reason
    assert repr(raw) in caught.value.reason


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("-1", None, id="minus-one-off"),
        pytest.param("-0.5", None, id="negative-fraction-off"),
        pytest.param("-1e9", None, id="very-negative-off"),
        pytest.param("0.5", 0.5, id="half"),
        pytest.param("1", 1.0, id="one"),
        pytest.param("1.0", 1.0, id="one-float"),
        pytest.param("0.01", 0.01, id="small"),
    ],
)
def test_busy_threshold(raw: str, expected: float | None) -> None:
    assert KvRouterConfig.from_env({**BASE, "DYNAMO_BUSY_THRESHOLD": raw}).busy_threshold == (
        expected
    )


@pytest.mark.parametrize(
    ("var", "raw", "says"),
    [
        ("DYNAMO_BUSY_THRESHOLD", "1.5", "(0, 1]"),
        ("DYNAMO_BUSY_THRESHOLD", "0", "(0, 1]"),
        ("DYNAMO_BUSY_THRESHOLD", "abc", "number"),
        ("DYNAMO_BUSY_THRESHOLD", "nan", "finite"),
        ("DYNAMO_OVERLAP_SCORE_WEIGHT", "-1", ">= 0"),
        ("DYNAMO_OVERLAP_SCORE_WEIGHT", "heavy", "number"),
        ("DYNAMO_OVERLAP_SCORE_WEIGHT", "inf", "finite"),
        ("DYNAMO_ROUTER_TEMPERATURE", "-0.1", ">= 0"),
        ("DYNAMO_ROUTER_TEMPERATURE", "hot", "number"),
        ("DYNAMO_ROUTER_TEMPERATURE", "1e999", "finite"),
    ],
    ids=lambda v: str(v).replace("DYNAMO_", ""),
)
def test_numbers_refused_with_field(var: str, raw: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        KvRouterConfig.from_env({**BASE, var: raw})
    assert caught.value.field == var
    assert says in caught.value.reason


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({"DYN_NAMESPACE": "a"}, "a", id="dyn"),
        pytest.param({"DYNAMO_NAMESPACE": "b"}, "b", id="old-dynamo-spelling"),
        pytest.param({"DYN_NAMESPACE": "a", "DYNAMO_NAMESPACE": "b"}, "a", id="dyn-wins"),
        pytest.param({"DYN_NAMESPACE": "", "DYNAMO_NAMESPACE": "b"}, "b", id="empty-dyn"),
        pytest.param({}, None, id="unset"),
    ],
)
def test_namespace(env: dict[str, str], expected: str | None) -> None:
    assert KvRouterConfig.from_env({**BASE, **env}).namespace == expected


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"block_size": 24}, "block_size"),
        ({"block_size": 16, "overlap_score_weight": float("nan")}, "overlap_score_weight"),
        ({"block_size": 16, "temperature": -1.0}, "temperature"),
        ({"block_size": 16, "busy_threshold": 0.0}, "busy_threshold"),
        ({"block_size": 16, "busy_threshold": 2.0}, "busy_threshold"),
        ({"block_size": 16, "request_expiry_s": 0.0}, "request_expiry_s"),
    ],
    ids=["block-size", "weight-nan", "temperature-negative", "busy-zero", "busy-two", "expiry"],
)
def test_direct_construction_is_validated(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        KvRouterConfig(**kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field


# ---------------------------------------------------------------------------------------------
# Properties

VALID_VALUES: dict[str, st.SearchStrategy[str]] = {
    "DYNAMO_KV_BLOCK_SIZE": st.sampled_from([str(1 << i) for i in range(4, 14)]),
    "DYNAMO_USE_KV_ROUTING": st.sampled_from(TRUE_SPELLINGS + FALSE_SPELLINGS),
    "DYNAMO_USE_KV_EVENTS": st.sampled_from(TRUE_SPELLINGS + FALSE_SPELLINGS),
    "DYNAMO_ROUTER_REPLICA_SYNC": st.sampled_from(TRUE_SPELLINGS + FALSE_SPELLINGS),
    "DYNAMO_OVERLAP_SCORE_WEIGHT": st.floats(0, 1e6).map(repr),
    "DYNAMO_ROUTER_TEMPERATURE": st.floats(0, 1e6).map(repr),
    "DYNAMO_BUSY_THRESHOLD": (
        st.floats(0, 1, exclude_min=True) | st.floats(-1e6, 0, exclude_max=True)
    ).map(repr),
    "DYN_NAMESPACE": st.text(min_size=1, max_size=10),
}


@settings(max_examples=200, deadline=None)
@given(
    env=st.fixed_dictionaries(
        {"DYNAMO_KV_BLOCK_SIZE": VALID_VALUES["DYNAMO_KV_BLOCK_SIZE"]},
        optional={k: v for k, v in VALID_VALUES.items() if k != "DYNAMO_KV_BLOCK_SIZE"},
    )
)
def test_any_valid_combination_parses(env: dict[str, str]) -> None:
    config = KvRouterConfig.from_env(env)
    assert config.block_size == int(env["DYNAMO_KV_BLOCK_SIZE"])
    for var, field in BOOL_VARS.items():
        if var in env:
            assert getattr(config, field) is (
                env[var].strip().lower() in {"true", "1", "yes", "on"}
            )
    if "DYNAMO_BUSY_THRESHOLD" in env:
        busy = float(env["DYNAMO_BUSY_THRESHOLD"])
        assert config.busy_threshold == (busy if busy > 0 else None)
    if "DYNAMO_OVERLAP_SCORE_WEIGHT" in env:
        assert config.overlap_score_weight == float(env["DYNAMO_OVERLAP_SCORE_WEIGHT"])
    if "DYNAMO_ROUTER_TEMPERATURE" in env:
        assert config.temperature == float(env["DYNAMO_ROUTER_TEMPERATURE"])
    assert config.namespace == (env.get("DYN_NAMESPACE") or None)


INVALID_VALUES: dict[str, st.SearchStrategy[str]] = {
    "DYNAMO_KV_BLOCK_SIZE": st.one_of(
        st.integers(-(10**6), 10**6)
        .filter(lambda n: not (16 <= n <= 8192 and n & (n - 1) == 0))
        .map(str),
        st.sampled_from(["16.0", "1e3", "abc", "0x10", "nan", "inf", "1" * 5000]),
    ),
    "DYNAMO_USE_KV_ROUTING": st.text(min_size=1).filter(
        lambda s: (
            s.strip()
            and s.strip().lower() not in {"true", "1", "yes", "on", "false", "0", "no", "off"}
        )
    ),
    "DYNAMO_OVERLAP_SCORE_WEIGHT": st.one_of(
        st.floats(max_value=0, exclude_max=True, allow_nan=False).map(repr),
        st.sampled_from(["nan", "inf", "-inf", "x", "1,5"]),
    ),
    "DYNAMO_ROUTER_TEMPERATURE": st.one_of(
        st.floats(max_value=0, exclude_max=True, allow_nan=False).map(repr),
        st.sampled_from(["nan", "inf", "NaN", "warm"]),
    ),
    "DYNAMO_BUSY_THRESHOLD": st.one_of(
        st.floats(min_value=1, exclude_min=True, allow_infinity=False).map(repr),
        st.sampled_from(["0", "0.0", "nan", "inf", "busy"]),
    ),
}


@settings(max_examples=200, deadline=None)
@given(
    bad=st.sampled_from(sorted(INVALID_VALUES)).flatmap(
        lambda var: st.tuples(st.just(var), INVALID_VALUES[var])
    ),
    others=st.fixed_dictionaries({}, optional=dict(VALID_VALUES)),
)
def test_any_invalid_value_raises_config_error_naming_it(
    bad: tuple[str, str], others: dict[str, str]
) -> None:
    var, raw = bad
    env = {"DYNAMO_KV_BLOCK_SIZE": "16", **others, var: raw}
    with pytest.raises(ConfigError) as caught:
        KvRouterConfig.from_env(env)
    assert caught.value.field == var


@settings(max_examples=300, deadline=None)
@given(
    env=st.dictionaries(
        st.sampled_from([*VALID_VALUES, "DYNAMO_NAMESPACE"]),
        st.text(max_size=12) | st.sampled_from(["1e999", "-0", "nan", "16", "-1", "0.5"]),
    )
)
def test_arbitrary_text_parses_or_raises_config_error(env: dict[str, str]) -> None:
    try:
        KvRouterConfig.from_env(env)
    except ConfigError as err:
        assert err.field in {*VALID_VALUES, "DYNAMO_NAMESPACE"}
