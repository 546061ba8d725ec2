from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Self

import pytest

from kvgate.errors import ConfigError
from kvgate.scheduling.framework import SECONDS, NoParams, Plugin, PluginContext, Range
from kvgate.scheduling.plugins.max_score_picker import MaxScorePicker
from kvgate.scheduling.registry import (
    BUILTIN_PLUGINS,
    EppConfigError,
    PluginConfigError,
    Registry,
    builtin_registry,
    camel_case,
    parse_duration,
    parse_params,
)
from tests.scheduling.utils import context


@dataclass(frozen=True, slots=True)
class Spec:
    block_size: Annotated[int, Range(ge=1, le=64)] = 16
    ratio: Annotated[float, Range(gt=0)] = 0.5
    enabled: bool = True
    mode: Literal["fast", "exact"] = "fast"
    label: str | None = None
    timeout: Annotated[float | None, SECONDS] = None


@dataclass(frozen=True, slots=True)
class Required:
    target: str


def parse(raw: object, spec: type = Spec) -> object:
    return parse_params(spec, raw, plugin_name="p", plugin_type="t", path="plugins[0].parameters")


def test_defaults_then_configured_values_with_camel_case_keys() -> None:
    assert parse(None) == Spec()
    got = parse(
        {
            "blockSize": 32,
            "ratio": 2,
            "enabled": False,
            "mode": "exact",
            "label": "x",
            "timeout": "1m30s",
        }
    )
    assert got == Spec(32, 2.0, False, "exact", "x", 90.0)


@pytest.mark.parametrize(
    ("raw", "field", "allowed"),
    [
        pytest.param({"blocksize": 1}, "blocksize", "blockSize, ratio", id="unknown-key"),
        pytest.param({"blockSize": "32"}, "blockSize", "an integer >= 1 and <= 64", id="string"),
        pytest.param({"blockSize": True}, "blockSize", "an integer", id="bool-is-not-int"),
        pytest.param({"blockSize": 1.0}, "blockSize", "an integer", id="float-is-not-int"),
        pytest.param({"blockSize": 0}, "blockSize", ">= 1", id="below-range"),
        pytest.param({"blockSize": 65}, "blockSize", "<= 64", id="above-range"),
        pytest.param({"ratio": 0}, "ratio", "a number > 0", id="exclusive-bound"),
        pytest.param({"ratio": float("nan")}, "ratio", "a number", id="nan"),
        pytest.param({"enabled": "yes"}, "enabled", "true or false", id="bool-strictly"),
        pytest.param({"mode": "slow"}, "mode", "one of 'fast', 'exact'", id="not-a-choice"),
        pytest.param({"label": 3}, "label", "a string, or null", id="optional-string"),
        pytest.param({"enabled": None}, "enabled", "true or false", id="null-not-allowed"),
        pytest.param({"timeout": "soon"}, "timeout", "a duration", id="bad-duration"),
    ],
)
def test_bad_parameters_are_refused(raw: object, field: str, allowed: str) -> None:
    with pytest.raises(PluginConfigError) as err:
        parse(raw)
    assert err.value.path == f"plugins[0].parameters.{field}"
    assert err.value.parameter == field
    assert err.value.plugin_name == "p" and err.value.plugin_type == "t"
    assert err.value.allowed is not None and allowed in err.value.allowed
    assert str(err.value).startswith(f"plugins[0].parameters.{field}: plugin 'p' (type 't')")


def test_parameters_must_be_a_mapping() -> None:
    with pytest.raises(PluginConfigError, match="must be a mapping, got list"):
        parse([1])


def test_required_parameter() -> None:
    with pytest.raises(PluginConfigError, match=r"target: .* is required"):
        parse({}, Required)
    assert parse({"target": "x"}, Required) == Required("x")


def test_a_plugin_without_parameters_refuses_any() -> None:
    with pytest.raises(PluginConfigError, match="takes no parameters"):
        parse({"x": 1}, NoParams)


def test_unsupported_spec_types_are_programming_errors() -> None:
    @dataclass(frozen=True)
    class Bad:
        values: list[int]

    with pytest.raises(TypeError, match="unsupported type"):
        parse({}, Bad)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("200ms", 0.2), ("2s", 2.0), ("1m30s", 90.0), ("1h", 3600.0), ("1.5s", 1.5), ("10us", 1e-5)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "s", "1x", "1s2", " 1s"])
def test_not_durations(text: str) -> None:
    assert parse_duration(text) is None


def test_camel_case() -> None:
    assert camel_case("max_num_of_endpoints") == "maxNumOfEndpoints"
    assert camel_case("threshold") == "threshold"


def test_error_hierarchy() -> None:
    assert issubclass(PluginConfigError, EppConfigError)
    assert issubclass(EppConfigError, ConfigError)
    assert issubclass(EppConfigError, ValueError)


@pytest.mark.parametrize(
    ("type_name", "target"), BUILTIN_PLUGINS, ids=[t for t, _ in BUILTIN_PLUGINS]
)
def test_every_builtin_class_declares_its_type_and_default_parameters(
    type_name: str, target: str
) -> None:
    cls = builtin_registry().plugin_class(type_name)
    assert cls.type_name == type_name
    parse_params(cls.params_type, None, plugin_name="x", plugin_type=type_name, path="p")


# The types that need no service from the context (no env, tokenizer or router).
SELF_CONTAINED = [
    "single-profile-handler",
    "pd-profile-handler",
    "decode-filter",
    "prefill-filter",
    "queue-scorer",
    "kv-cache-utilization-scorer",
    "running-requests-size-scorer",
    "lora-affinity-scorer",
    "prefix-cache-scorer",
    "max-score-picker",
    "random-picker",
    "weighted-random-picker",
    "round-robin-picker",
    "utilization-detector",
]


@pytest.mark.parametrize("type_name", SELF_CONTAINED)
def test_self_contained_types_build_with_defaults(type_name: str) -> None:
    plugin = builtin_registry().build(type_name, "x", None, context())
    assert isinstance(plugin, Plugin)
    assert plugin.type_name == type_name and plugin.name == "x"


def test_duplicate_registration_is_an_error() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        Registry([("a", MaxScorePicker), ("a", MaxScorePicker)])
    with pytest.raises(ValueError, match="'max-score-picker' registered twice"):
        builtin_registry().extended([("max-score-picker", MaxScorePicker)])


def test_builtin_table_has_no_duplicates() -> None:
    assert len({t for t, _ in BUILTIN_PLUGINS}) == len(BUILTIN_PLUGINS)


def test_extended_leaves_the_original_alone() -> None:
    extra = builtin_registry().extended([("picker-two", Renamed)])
    assert "picker-two" in extra and "picker-two" not in builtin_registry()


class Renamed(MaxScorePicker):
    type_name = "picker-two"


def test_imports_are_lazy() -> None:
    registry = Registry([("later", "no_such_module.anywhere:Plugin")])
    assert registry.types == ["later"]
    with pytest.raises(ModuleNotFoundError):
        registry.plugin_class("later")


def test_class_must_declare_its_registered_type() -> None:
    registry = Registry([("other-name", MaxScorePicker)])
    with pytest.raises(TypeError, match="declares 'max-score-picker'"):
        registry.plugin_class("other-name")


def test_unknown_type_lists_the_known_and_suggests() -> None:
    with pytest.raises(EppConfigError) as err:
        builtin_registry().build("max-scor-picker", "p", None, context(), path="plugins[2]")
    message = str(err.value)
    assert message.startswith("plugins[2].type: unknown type 'max-scor-picker' (known types: ")
    assert "queue-scorer" in message and "did you mean 'max-score-picker'?" in message


class Picky(Plugin):
    type_name = "picky"
    params_type = NoParams

    @classmethod
    def from_config(cls, name: str, params: NoParams, context: PluginContext) -> Self:
        raise ValueError("needs a tokenizer in the context")


def test_from_config_value_errors_are_located() -> None:
    registry = Registry([("picky", Picky)])
    with pytest.raises(PluginConfigError) as err:
        registry.build("picky", "pk", None, context(), path="plugins[4]")
    assert str(err.value) == (
        "plugins[4].parameters: plugin 'pk' (type 'picky'): needs a tokenizer in the context"
    )


@dataclass(frozen=True, slots=True)
class LimitParams:
    limit: int = 1


class Limited(Plugin):
    """Refuses its configuration from ``from_config`` with a path of its own choosing."""

    type_name = "limited"
    params_type = LimitParams

    @classmethod
    def from_config(cls, name: str, params: LimitParams, context: PluginContext) -> Self:
        parameter = "limit" if params.limit > 1 else "ENV_LIMIT"
        raise PluginConfigError(
            "somewhere", "too high", plugin_name=name, plugin_type="?", parameter=parameter
        )


@pytest.mark.parametrize(
    ("params", "path", "message"),
    [
        pytest.param(
            {"limit": 2},
            "plugins[1].parameters.limit",
            "plugins[1].parameters.limit: plugin 'lim' (type 'limited'): too high",
            id="names-a-parameter",
        ),
        pytest.param(
            None,
            "plugins[1].parameters",
            "plugins[1].parameters: plugin 'lim' (type 'limited'): ENV_LIMIT: too high",
            id="names-something-else",
        ),
    ],
)
def test_plugin_raised_config_errors_are_relocated(params: object, path: str, message: str) -> None:
    registry = Registry([("limited", Limited)])
    with pytest.raises(PluginConfigError) as err:
        registry.build("limited", "lim", params, context(), path="plugins[1]")
    assert err.value.path == path and str(err.value) == message


def test_context_random_streams_are_per_plugin_and_reproducible() -> None:
    ctx = PluginContext(rng_seed=5)
    a1, a2, b = ctx.rng("a").random(), PluginContext(rng_seed=5).rng("a").random(), ctx.rng("b")
    assert a1 == a2 and b.random() != a1
    assert PluginContext().rng("a").random() != PluginContext().rng("a").random()
