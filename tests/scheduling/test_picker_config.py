from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Self

import pytest
import yaml

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import NoParams, Plugin, PluginContext, Scorer
from kvgate.scheduling.picker_config import (
    API_VERSION,
    DEFAULT_CONFIG_TEXT,
    KIND,
    EppConfigError,
    PluginConfigError,
    build_epp_config,
    epp_config_from_dict,
    load_epp_config,
    parse_epp_config,
)
from kvgate.scheduling.plugins.max_score_picker import MaxScorePicker
from kvgate.scheduling.plugins.saturation import UtilizationDetector
from kvgate.scheduling.plugins.single_profile_handler import SingleProfileHandler
from kvgate.scheduling.registry import BUILTIN_PLUGINS, Registry
from kvgate.scheduling.request import LLMRequest, ResponseInfo, SchedulingResult
from tests.scheduling.utils import chat, context, endpoints

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "config"
HEADER = {"apiVersion": API_VERSION, "kind": KIND}


def config(**sections: Any) -> dict[str, Any]:
    return {**HEADER, **sections}


def build(raw: dict[str, Any], registry: Registry | None = None) -> Any:
    return build_epp_config(epp_config_from_dict(raw), registry=registry, context=context())


def weights(loaded: Any, profile: str = "default") -> dict[str, float]:
    return {ws.scorer.name: ws.weight for ws in loaded.profiles[profile].scorers}


# -- defaults --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [None, "", "  \n"], ids=["none", "empty", "blank"])
def test_no_config_is_the_reference_default(text: str | None) -> None:
    loaded = load_epp_config(text, context=context())
    assert list(loaded.profiles) == ["default"]
    assert weights(loaded) == {
        "queue-scorer": 2.0,
        "kv-cache-utilization-scorer": 2.0,
        "prefix-cache-scorer": 3.0,
    }
    assert isinstance(loaded.profiles["default"].picker, MaxScorePicker)
    assert loaded.profile_handler.type_name == "single-profile-handler"
    assert isinstance(loaded.saturation_detector, UtilizationDetector)
    assert loaded.saturation_detector.queue_depth_threshold == 5


def test_shipped_default_config_is_the_built_in_one() -> None:
    shipped = (DEPLOY / "epp-config-default.yaml").read_text()
    assert parse_epp_config(shipped) == parse_epp_config(DEFAULT_CONFIG_TEXT)


def test_the_default_config_schedules() -> None:
    scheduler = load_epp_config(None, context=context()).scheduler()
    req = chat("hello " * 50)
    result = scheduler.schedule(req, endpoints(3))
    scheduler.pre_request(req, result)
    assert result.endpoint.address in {ep.address for ep in endpoints(3)}


# -- completion rules ------------------------------------------------------------------------


def test_names_default_to_types_and_weights_to_one() -> None:
    loaded = build(
        config(
            plugins=[{"type": "queue-scorer"}, {"type": "random-picker", "name": "pick"}],
            schedulingProfiles=[
                {"name": "p", "plugins": [{"pluginRef": "queue-scorer"}, {"pluginRef": "pick"}]}
            ],
        )
    )
    assert list(loaded.plugins) == ["queue-scorer", "pick", "single-profile-handler"]
    assert weights(loaded, "p") == {"queue-scorer": 1.0}
    assert loaded.profiles["p"].picker.name == "pick"


def test_a_profile_without_picker_gets_max_score_picker() -> None:
    loaded = build(
        config(
            plugins=[{"type": "queue-scorer"}],
            schedulingProfiles=[{"name": "p", "plugins": [{"pluginRef": "queue-scorer"}]}],
        )
    )
    assert isinstance(loaded.profiles["p"].picker, MaxScorePicker)
    assert "max-score-picker" in loaded.plugins


def test_a_configured_max_score_picker_is_reused_as_the_default() -> None:
    loaded = build(
        config(
            plugins=[{"type": "max-score-picker", "parameters": {"maxNumOfEndpoints": 3}}],
            schedulingProfiles=[{"name": "p", "plugins": []}],
        )
    )
    picker = loaded.profiles["p"].picker
    assert isinstance(picker, MaxScorePicker) and picker.max_num_of_endpoints == 3


def test_no_profile_list_means_one_profile_with_everything() -> None:
    loaded = build(
        config(
            plugins=[
                {"type": "decode-filter"},
                {"type": "queue-scorer"},
                {"type": "lora-affinity-scorer", "name": "lora"},
                {"type": "weighted-random-picker"},
                {"type": "utilization-detector", "name": "sd"},
            ]
        )
    )
    profile = loaded.profiles["default"]
    assert [f.name for f in profile.filters] == ["decode-filter"]
    assert weights(loaded) == {"queue-scorer": 1.0, "lora": 1.0}
    assert profile.picker.type_name == "weighted-random-picker"
    assert isinstance(loaded.profile_handler, SingleProfileHandler)


def test_json_text_is_accepted() -> None:
    text = json.dumps(config(plugins=[{"type": "queue-scorer"}]))
    assert weights(load_epp_config(text, context=context())) == {"queue-scorer": 1.0}


def test_feature_gates_and_detector_section_are_read() -> None:
    loaded = build(
        config(
            plugins=[],
            featureGates=["dataLayer"],
            saturationDetector={"queueDepthThreshold": 9, "metricsStalenessThreshold": "250ms"},
        )
    )
    assert loaded.config.feature_gates == ("dataLayer",)
    detector = loaded.saturation_detector
    assert isinstance(detector, UtilizationDetector)
    assert detector.queue_depth_threshold == 9
    assert detector.metrics_staleness_threshold == pytest.approx(0.25)


def test_detector_by_plugin_ref() -> None:
    loaded = build(
        config(
            plugins=[
                {
                    "type": "utilization-detector",
                    "name": "sd",
                    "parameters": {"kvCacheUtilThreshold": 0.5},
                }
            ],
            saturationDetector={"pluginRef": "sd"},
        )
    )
    assert loaded.saturation_detector is loaded.plugins["sd"]


def test_pd_config() -> None:
    loaded = build(
        config(
            plugins=[
                {"type": "pd-profile-handler", "parameters": {"threshold": 64}},
                {"type": "decode-filter"},
                {"type": "prefill-filter"},
                {"type": "prefix-cache-scorer"},
            ],
            schedulingProfiles=[
                {
                    "name": "decode",
                    "plugins": [
                        {"pluginRef": "decode-filter"},
                        {"pluginRef": "prefix-cache-scorer"},
                    ],
                },
                {
                    "name": "prefill",
                    "plugins": [
                        {"pluginRef": "prefill-filter"},
                        {"pluginRef": "prefix-cache-scorer"},
                    ],
                },
            ],
        )
    )
    assert loaded.profile_handler.type_name == "pd-profile-handler"
    assert loaded.profiles["prefill"].scorers[0].scorer is loaded.plugins["prefix-cache-scorer"]


# -- the seed's Dynamo config, with stand-ins for the KV plugins -----------------------------


class StandInKvScorer(Scorer):
    type_name = "kv-aware-scorer"
    params_type = NoParams

    @classmethod
    def from_config(cls, name: str, params: NoParams, context: PluginContext) -> Self:
        return cls(name)

    def score(self, request: LLMRequest, endpoints: list[Endpoint]) -> dict[str, float]:
        return {endpoints[-1].address: 1.0}


class StandInCleanup(Plugin):
    type_name = "dynamo-response-complete"
    params_type = NoParams
    completed: list[str]

    @classmethod
    def from_config(cls, name: str, params: NoParams, context: PluginContext) -> Self:
        plugin = cls(name)
        plugin.completed = []
        return plugin

    def response_complete(
        self, request: LLMRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        self.completed.append(request.request_id)


KV_TYPES = {"kv-aware-scorer", "dynamo-response-complete"}


def dynamo_registry() -> Registry:
    """The built-in table with the lead's two plugins replaced by stand-ins (whether or not the
    table already lists them)."""
    kept = [(t, target) for t, target in BUILTIN_PLUGINS if t not in KV_TYPES]
    return Registry(
        [*kept, ("kv-aware-scorer", StandInKvScorer), ("dynamo-response-complete", StandInCleanup)]
    )


def test_seed_dynamo_config_loads_and_schedules() -> None:
    text = (DEPLOY / "epp-config-dynamo.yaml").read_text()
    loaded = load_epp_config(text, registry=dynamo_registry(), context=context())
    assert list(loaded.plugins) == ["single-profile-handler", "picker", "dyn-kv", "dynamo-cleanup"]
    profile = loaded.profiles["default"]
    assert weights(loaded) == {"dyn-kv": 1.0}
    assert profile.picker is loaded.plugins["picker"]
    scheduler = loaded.scheduler()
    req = chat("hi")
    eps = endpoints(3)
    result = scheduler.schedule(req, eps)
    assert result.endpoint is eps[-1]
    scheduler.response_complete(req, result, ResponseInfo(status=200))
    cleanup = loaded.plugins["dynamo-cleanup"]
    assert isinstance(cleanup, StandInCleanup) and cleanup.completed == [req.request_id]


# -- errors ----------------------------------------------------------------------------------

P = {"type": "queue-scorer"}
PICK = {"type": "max-score-picker"}


def profiles(*refs: Any) -> list[dict[str, Any]]:
    return [{"name": "p", "plugins": list(refs)}]


# fmt: off
ERRORS = [
    ("top-level-not-mapping", ["a"], "<config>", "expected a mapping"),
    ("unknown-top-key", config(plugins=[], data={}), "data", "unknown key 'data'"),
    ("api-version-missing", {"kind": KIND, "plugins": []}, "apiVersion", "missing"),
    ("api-version-wrong", config(apiVersion="v1", plugins=[]), "apiVersion", "got str 'v1'"),
    ("kind-wrong", config(kind="Pod", plugins=[]), "kind", "must be 'EndpointPickerConfig'"),
    ("plugins-missing", config(), "plugins", "is required"),
    ("plugins-not-list", config(plugins={"a": 1}), "plugins", "expected a list"),
    ("plugin-not-mapping", config(plugins=["queue-scorer"]), "plugins[0]", "expected a mapping"),
    ("plugin-type-missing", config(plugins=[{"name": "x"}]), "plugins[0].type", "is required"),
    ("plugin-type-not-string", config(plugins=[{"type": 3}]), "plugins[0].type", "int 3"),
    ("plugin-name-empty", config(plugins=[{"type": "queue-scorer", "name": ""}]),
     "plugins[0].name", "non-empty string"),
    ("plugin-unknown-key", config(plugins=[{"type": "queue-scorer", "weight": 2}]),
     "plugins[0].weight", "unknown key 'weight'"),
    ("unknown-type", config(plugins=[P, PICK, {"type": "bar"}]), "plugins[2].type",
     "unknown type 'bar' (known types: "),
    ("duplicate-name", config(plugins=[P, {"type": "random-picker", "name": "queue-scorer"}]),
     "plugins[1].name", "duplicate plugin name 'queue-scorer' (first at plugins[0])"),
    ("duplicate-implicit-name", config(plugins=[P, P]), "plugins[1].name", "duplicate"),
    ("parameters-not-mapping", config(plugins=[{"type": "max-score-picker", "parameters": 3}]),
     "plugins[0].parameters", "expected a mapping"),
    ("parameter-unknown", config(plugins=[{"type": "max-score-picker",
                                            "parameters": {"maxEndpoints": 2}}]),
     "plugins[0].parameters.maxEndpoints", "allowed: maxNumOfEndpoints"),
    ("parameter-out-of-range", config(plugins=[{"type": "max-score-picker",
                                                 "parameters": {"maxNumOfEndpoints": 0}}]),
     "plugins[0].parameters.maxNumOfEndpoints", "an integer >= 1"),
    ("parameter-wrong-type", config(plugins=[{"type": "prefix-cache-scorer",
                                               "parameters": {"autoTune": "false"}}]),
     "plugins[0].parameters.autoTune", "true or false"),
    ("profiles-not-list", config(plugins=[P], schedulingProfiles={"p": 1}),
     "schedulingProfiles", "expected a list"),
    ("profile-name-missing", config(plugins=[P], schedulingProfiles=[{"plugins": []}]),
     "schedulingProfiles[0].name", "is required"),
    ("profile-unknown-key", config(plugins=[P], schedulingProfiles=[{"name": "p", "x": 1}]),
     "schedulingProfiles[0].x", "unknown key"),
    ("profile-duplicate", config(plugins=[P], schedulingProfiles=[{"name": "p"}, {"name": "p"}]),
     "schedulingProfiles[1].name", "duplicate profile name 'p'"),
    ("profile-plugins-not-list", config(plugins=[P], schedulingProfiles=[{"name": "p",
                                                                         "plugins": "x"}]),
     "schedulingProfiles[0].plugins", "expected a list"),
    ("ref-missing", config(plugins=[P], schedulingProfiles=profiles({"weight": 1})),
     "schedulingProfiles[0].plugins[0].pluginRef", "is required"),
    ("ref-unknown", config(plugins=[P, PICK], schedulingProfiles=profiles(
        {"pluginRef": "queue-scorer"}, {"pluginRef": "foo"})),
     "schedulingProfiles[0].plugins[1].pluginRef",
     "unknown plugin 'foo' (known: queue-scorer, max-score-picker)"),
    ("ref-twice", config(plugins=[P], schedulingProfiles=profiles(
        {"pluginRef": "queue-scorer"}, {"pluginRef": "queue-scorer"})),
     "schedulingProfiles[0].plugins[1].pluginRef", "already in this profile"),
    ("ref-unknown-key", config(plugins=[P], schedulingProfiles=profiles(
        {"pluginRef": "queue-scorer", "weigth": 1})),
     "schedulingProfiles[0].plugins[0].weigth", "unknown key"),
    ("weight-not-number", config(plugins=[P], schedulingProfiles=profiles(
        {"pluginRef": "queue-scorer", "weight": "high"})),
     "schedulingProfiles[0].plugins[0].weight", "expected a number >= 0; got str 'high'"),
    ("weight-bool", config(plugins=[P], schedulingProfiles=profiles(
        {"pluginRef": "queue-scorer", "weight": True})),
     "schedulingProfiles[0].plugins[0].weight", "expected a number"),
    ("weight-negative", config(plugins=[P], schedulingProfiles=profiles(
        {"pluginRef": "queue-scorer", "weight": -1})),
     "schedulingProfiles[0].plugins[0].weight", ">= 0"),
    ("weight-on-picker", config(plugins=[PICK], schedulingProfiles=profiles(
        {"pluginRef": "max-score-picker", "weight": 2})),
     "schedulingProfiles[0].plugins[0].weight", "only scorers take a weight"),
    ("two-pickers", config(plugins=[PICK, {"type": "random-picker"}], schedulingProfiles=profiles(
        {"pluginRef": "max-score-picker"}, {"pluginRef": "random-picker"})),
     "schedulingProfiles[0].plugins[1].pluginRef", "already has the picker 'max-score-picker'"),
    ("two-pickers-implicit-profile", config(plugins=[PICK, {"type": "random-picker"}]),
     "plugins[1]", "the implicit profile 'default' (no schedulingProfiles given) already "
     "has the picker 'max-score-picker'"),
    ("handler-in-profile", config(plugins=[{"type": "single-profile-handler"}],
                                  schedulingProfiles=profiles(
                                      {"pluginRef": "single-profile-handler"})),
     "schedulingProfiles[0].plugins[0].pluginRef", "is a profile handler plugin"),
    ("detector-in-profile", config(plugins=[{"type": "utilization-detector"}],
                                   schedulingProfiles=profiles(
                                       {"pluginRef": "utilization-detector"})),
     "schedulingProfiles[0].plugins[0].pluginRef", "request-control plugin"),
    ("two-handlers", config(plugins=[{"type": "single-profile-handler"},
                                     {"type": "pd-profile-handler"}]),
     "plugins[1]", "only one is allowed"),
    ("single-handler-two-profiles", config(plugins=[P], schedulingProfiles=[
        {"name": "a"}, {"name": "b"}]),
     "schedulingProfiles", "'single-profile-handler' (type 'single-profile-handler') runs "
     "exactly one"),
    ("pd-without-decode", config(plugins=[{"type": "pd-profile-handler"}],
                                 schedulingProfiles=[{"name": "prefill"}]),
     "schedulingProfiles", "named 'decode'"),
    ("default-picker-name-taken", config(plugins=[{"type": "queue-scorer",
                                                    "name": "max-score-picker"}],
                                         schedulingProfiles=[{"name": "p"}]),
     "plugins[0].name", "rename the plugin"),
    ("gates-not-list", config(plugins=[], featureGates="x"), "featureGates", "expected a list"),
    ("gates-empty-string", config(plugins=[], featureGates=""), "featureGates", "got str ''"),
    ("gate-not-string", config(plugins=[], featureGates=[1]), "featureGates[0]", "int 1"),
    ("detector-not-mapping", config(plugins=[], saturationDetector=[]), "saturationDetector",
     "expected a mapping"),
    ("detector-unknown-field", config(plugins=[], saturationDetector={"queueDepth": 3}),
     "saturationDetector.queueDepth", "allowed: queueDepthThreshold"),
    ("detector-bad-threshold", config(plugins=[], saturationDetector={
        "kvCacheUtilThreshold": 1.5}),
     "saturationDetector.kvCacheUtilThreshold", "a number > 0 and <= 1"),
    ("detector-bad-duration", config(plugins=[], saturationDetector={
        "metricsStalenessThreshold": "soon"}),
     "saturationDetector.metricsStalenessThreshold", "a duration"),
    ("detector-ref-unknown", config(plugins=[], saturationDetector={"pluginRef": "sd"}),
     "saturationDetector.pluginRef", "unknown plugin 'sd' (known: none)"),
    ("detector-ref-wrong-kind", config(plugins=[P], saturationDetector={
        "pluginRef": "queue-scorer"}),
     "saturationDetector.pluginRef", "not a saturation detector"),
    ("detector-ref-and-fields", config(plugins=[{"type": "utilization-detector"}],
                                       saturationDetector={"pluginRef": "utilization-detector",
                                                           "queueDepthThreshold": 2}),
     "saturationDetector.queueDepthThreshold", "cannot be combined with pluginRef"),
]
# fmt: on


@pytest.mark.parametrize(
    ("raw", "path", "message"), [pytest.param(*case[1:], id=case[0]) for case in ERRORS]
)
def test_config_errors_name_the_offending_path(raw: Any, path: str, message: str) -> None:
    with pytest.raises(EppConfigError) as err:
        build(raw)
    assert err.value.path == path
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_parameter_errors_name_plugin_and_type() -> None:
    raw = config(
        plugins=[
            P,
            {
                "type": "max-score-picker",
                "name": "picker",
                "parameters": {"maxNumOfEndpoints": "two"},
            },
        ]
    )
    with pytest.raises(PluginConfigError) as err:
        build(raw)
    assert (err.value.plugin_name, err.value.plugin_type) == ("picker", "max-score-picker")
    assert err.value.parameter == "maxNumOfEndpoints"
    assert err.value.allowed == "an integer >= 1"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("plugins: [", id="unclosed-flow-list"),
        pytest.param("a: b: c", id="mapping-in-scalar"),
        pytest.param("--- {}\n--- {}", id="two-documents"),
        pytest.param("plugins:\n- type: a\n  type: b\n", id="duplicate-key"),
    ],
)
def test_unparsable_text(text: str) -> None:
    with pytest.raises(EppConfigError, match="not valid YAML or JSON"):
        parse_epp_config(text)


def test_unknown_kv_plugins_without_their_registration() -> None:
    text = (DEPLOY / "epp-config-dynamo.yaml").read_text()
    registry = Registry([(t, c) for t, c in BUILTIN_PLUGINS if t not in KV_TYPES])
    with pytest.raises(EppConfigError, match=r"plugins\[2\]\.type: unknown type 'kv-aware-scorer'"):
        load_epp_config(text, registry=registry)


def test_shipped_configs_are_valid_yaml_documents() -> None:
    for path in DEPLOY.glob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        assert doc["apiVersion"] == API_VERSION and doc["kind"] == KIND, path


def test_yaml_merge_keys_may_override() -> None:
    text = f"""\
apiVersion: {API_VERSION}
kind: {KIND}
plugins:
- &picker {{type: max-score-picker, parameters: {{maxNumOfEndpoints: 2}}}}
- <<: *picker
  name: other
"""
    plugins = parse_epp_config(text).plugins
    assert [(p.name, p.type) for p in plugins] == [
        ("max-score-picker", "max-score-picker"),
        ("other", "max-score-picker"),
    ]
    assert plugins[1].parameters == {"maxNumOfEndpoints": 2}


@pytest.mark.parametrize("tokenizer", ["/nonexistent/tokenizer", "/", "no-such-org/no-such-model"])
def test_a_tokenizer_parameter_that_does_not_load_is_a_config_error(tokenizer: str) -> None:
    # Found by the config fuzzer (tests/reliability): the loader's own error escaped.
    raw = config(
        plugins=[{"name": "kv", "type": "kv-aware-scorer", "parameters": {"tokenizer": tokenizer}}]
    )
    with pytest.raises(PluginConfigError, match=r"plugins\[0\]\.parameters\.tokenizer: .*'kv'"):
        build_epp_config(
            epp_config_from_dict(raw), context=context(env={"DYNAMO_KV_BLOCK_SIZE": "16"})
        )
