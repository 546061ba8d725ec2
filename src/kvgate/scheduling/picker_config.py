"""EndpointPickerConfig: the reference EPP's plugin configuration, read once at start.

Text (YAML, or JSON — which is YAML) → `parse_epp_config` → typed `EndpointPickerConfig` (structure
checked: kinds of values, duplicate names, references) → `build_epp_config` → plugin instances,
`SchedulerProfile`s, the profile handler and the saturation detector (`EppPlugins`), from which
`EppPlugins.scheduler()` makes the `Scheduler`. `load_epp_config(text)` does all three; with no
text it loads the reference default, `DEFAULT_CONFIG_TEXT`.

Completion rules, as in the reference: a plugin's name defaults to its type; a scorer's weight
defaults to 1; a profile without a picker gets the ``max-score-picker``; no profile list means one
profile ``default`` with every filter, scorer and picker in plugin order; no profile handler means
the ``single-profile-handler``.

Every problem raises `EppConfigError` (or its subclass `PluginConfigError`) whose message starts
with the path of the offending value, e.g.
``schedulingProfiles[0].plugins[1].pluginRef: unknown plugin 'foo' (known: a, b)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import yaml

from kvgate.scheduling.framework import (
    Filter,
    Picker,
    Plugin,
    PluginContext,
    ProfileHandler,
    SchedulerProfile,
    Scorer,
    WeightedScorer,
)
from kvgate.scheduling.plugins.saturation import SaturationDetector
from kvgate.scheduling.registry import EppConfigError, PluginConfigError, Registry, builtin_registry
from kvgate.scheduling.scheduler import Observer, Scheduler, order_producers

__all__ = [
    "API_VERSION",
    "DEFAULT_CONFIG_TEXT",
    "KIND",
    "EndpointPickerConfig",
    "EppConfigError",
    "EppPlugins",
    "PluginConfigError",
    "PluginRef",
    "PluginSpec",
    "ProfileSpec",
    "SaturationDetectorSpec",
    "build_epp_config",
    "epp_config_from_dict",
    "load_epp_config",
    "parse_epp_config",
]

API_VERSION: Final = "inference.networking.x-k8s.io/v1alpha1"
KIND: Final = "EndpointPickerConfig"
DEFAULT_PROFILE: Final = "default"
DEFAULT_PICKER_TYPE: Final = "max-score-picker"
DEFAULT_PROFILE_HANDLER_TYPE: Final = "single-profile-handler"
SATURATION_DETECTOR_TYPE: Final = "utilization-detector"

DEFAULT_CONFIG_TEXT: Final = f"""\
apiVersion: {API_VERSION}
kind: {KIND}
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: max-score-picker
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: max-score-picker
"""
"""The reference EPP's configuration when none is given."""

_TOP_KEYS = (
    "apiVersion",
    "kind",
    "plugins",
    "schedulingProfiles",
    "featureGates",
    "saturationDetector",
)
_PLUGIN_KEYS = ("name", "type", "parameters")
_PROFILE_KEYS = ("name", "plugins")
_REF_KEYS = ("pluginRef", "weight")


@dataclass(frozen=True, slots=True)
class PluginSpec:
    name: str
    type: str
    parameters: Mapping[str, Any] | None = None
    """As written; parsed by the plugin type's parameter spec when built."""


@dataclass(frozen=True, slots=True)
class PluginRef:
    plugin_ref: str
    weight: float | None = None
    """None when not written: 1 for a scorer."""


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    name: str
    plugins: tuple[PluginRef, ...]


@dataclass(frozen=True, slots=True)
class SaturationDetectorSpec:
    plugin_ref: str | None = None
    """Name of a configured detector plugin; exclusive with ``parameters``."""
    parameters: Mapping[str, Any] | None = None
    """Thresholds for a `utilization-detector` (queueDepthThreshold, kvCacheUtilThreshold,
    metricsStalenessThreshold), as written."""


@dataclass(frozen=True, slots=True)
class EndpointPickerConfig:
    plugins: tuple[PluginSpec, ...]
    scheduling_profiles: tuple[ProfileSpec, ...] | None = None
    """None when the config lists no profiles (one ``default`` profile is made)."""
    feature_gates: tuple[str, ...] = ()
    saturation_detector: SaturationDetectorSpec | None = None


@dataclass(frozen=True, slots=True)
class EppPlugins:
    """A built configuration: live plugin instances ready for a `Scheduler`."""

    config: EndpointPickerConfig
    plugins: Mapping[str, Plugin]
    """Every instance by name, in configuration order, defaults added last."""
    profile_handler: ProfileHandler
    profiles: Mapping[str, SchedulerProfile]
    saturation_detector: SaturationDetector

    def scheduler(self, observer: Observer | None = None) -> Scheduler:
        return Scheduler(
            self.profile_handler, self.profiles, list(self.plugins.values()), observer=observer
        )


def load_epp_config(
    text: str | None,
    *,
    registry: Registry | None = None,
    context: PluginContext | None = None,
) -> EppPlugins:
    """Parse and build ``text``; None or blank text loads `DEFAULT_CONFIG_TEXT`."""
    if text is None or not text.strip():
        text = DEFAULT_CONFIG_TEXT
    return build_epp_config(parse_epp_config(text), registry=registry, context=context)


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (plain YAML keeps the
    last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *anchor` may override on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_epp_config(text: str) -> EndpointPickerConfig:
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: builds plain data only
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise EppConfigError("", f"not valid YAML or JSON{where}: {problem}") from None
    return epp_config_from_dict(raw)


def _fail(path: str, reason: str) -> NoReturn:
    raise EppConfigError(path, reason)


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _mapping(value: object, path: str, allowed: tuple[str, ...]) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        _fail(path, f"expected a mapping with keys {', '.join(allowed)}; got {_describe(value)}")
    for key in value:
        if key not in allowed:
            _fail(
                f"{path}.{key}" if path else str(key),
                f"unknown key {key!r} (allowed: {', '.join(allowed)})",
            )
    return value


def _list(value: object, path: str) -> list[Any]:
    if not isinstance(value, list):
        _fail(path, f"expected a list; got {_describe(value)}")
    return value


def _name(value: object, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail(path, f"expected a non-empty string; got {_describe(value)}")
    return value


def epp_config_from_dict(raw: object) -> EndpointPickerConfig:
    """Check the structure of a decoded config and type it. Plugin types and parameters are
    checked when it is built."""
    top = _mapping(raw, "", _TOP_KEYS)
    for key, expected in (("apiVersion", API_VERSION), ("kind", KIND)):
        if top.get(key) != expected:
            got = "missing" if key not in top else f"got {_describe(top[key])}"
            _fail(key, f"must be {expected!r}; {got}")
    if "plugins" not in top:
        _fail("plugins", "is required: list the plugins (type, optional name and parameters)")
    plugins: list[PluginSpec] = []
    first_at: dict[str, str] = {}
    for i, entry in enumerate(_list(top["plugins"], "plugins")):
        path = f"plugins[{i}]"
        fields = _mapping(entry, path, _PLUGIN_KEYS)
        if "type" not in fields:
            _fail(f"{path}.type", "is required")
        type_name = _name(fields["type"], f"{path}.type")
        name = _name(fields.get("name", type_name), f"{path}.name")
        if name in first_at:
            _fail(f"{path}.name", f"duplicate plugin name {name!r} (first at {first_at[name]})")
        first_at[name] = path
        params = fields.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            _fail(f"{path}.parameters", f"expected a mapping; got {_describe(params)}")
        plugins.append(PluginSpec(name, type_name, params))
    known = ", ".join(first_at) or "none"

    profiles: tuple[ProfileSpec, ...] | None = None
    if top.get("schedulingProfiles") is not None:
        profiles = _profiles(top["schedulingProfiles"], first_at, known)

    gates: list[str] = []
    raw_gates = top.get("featureGates")
    for i, gate in enumerate(_list([] if raw_gates is None else raw_gates, "featureGates")):
        gates.append(_name(gate, f"featureGates[{i}]"))

    detector: SaturationDetectorSpec | None = None
    if top.get("saturationDetector") is not None:
        section = top["saturationDetector"]
        path = "saturationDetector"
        if not isinstance(section, Mapping):
            _fail(path, f"expected a mapping; got {_describe(section)}")
        if "pluginRef" in section:
            ref = _name(section["pluginRef"], f"{path}.pluginRef")
            if ref not in first_at:
                _fail(f"{path}.pluginRef", f"unknown plugin {ref!r} (known: {known})")
            if len(section) > 1:
                other = next(k for k in section if k != "pluginRef")
                _fail(
                    f"{path}.{other}",
                    "cannot be combined with pluginRef: set the referenced plugin's parameters",
                )
            detector = SaturationDetectorSpec(plugin_ref=ref)
        else:
            detector = SaturationDetectorSpec(parameters=section)
    return EndpointPickerConfig(tuple(plugins), profiles, tuple(gates), detector)


def _profiles(raw: object, plugin_paths: Mapping[str, str], known: str) -> tuple[ProfileSpec, ...]:
    profiles: list[ProfileSpec] = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(_list(raw, "schedulingProfiles")):
        path = f"schedulingProfiles[{i}]"
        fields = _mapping(entry, path, _PROFILE_KEYS)
        if "name" not in fields:
            _fail(f"{path}.name", "is required")
        name = _name(fields["name"], f"{path}.name")
        if name in seen:
            _fail(f"{path}.name", f"duplicate profile name {name!r} (first at {seen[name]})")
        seen[name] = path
        refs: list[PluginRef] = []
        referenced: dict[str, str] = {}
        raw_refs = fields.get("plugins")
        for j, ref_entry in enumerate(
            _list([] if raw_refs is None else raw_refs, f"{path}.plugins")
        ):
            ref_path = f"{path}.plugins[{j}]"
            ref_fields = _mapping(ref_entry, ref_path, _REF_KEYS)
            if "pluginRef" not in ref_fields:
                _fail(f"{ref_path}.pluginRef", "is required")
            ref = _name(ref_fields["pluginRef"], f"{ref_path}.pluginRef")
            if ref not in plugin_paths:
                _fail(f"{ref_path}.pluginRef", f"unknown plugin {ref!r} (known: {known})")
            if ref in referenced:
                _fail(
                    f"{ref_path}.pluginRef",
                    f"plugin {ref!r} is already in this profile at {referenced[ref]}",
                )
            referenced[ref] = ref_path
            refs.append(PluginRef(ref, _weight(ref_fields, f"{ref_path}.weight")))
        profiles.append(ProfileSpec(name, tuple(refs)))
    return tuple(profiles)


def _weight(fields: Mapping[str, Any], path: str) -> float | None:
    if "weight" not in fields:
        return None
    weight = fields["weight"]
    if (
        not isinstance(weight, int | float)
        or isinstance(weight, bool)
        or not math.isfinite(weight)
        or weight < 0
    ):
        _fail(path, f"expected a number >= 0; got {_describe(weight)}")
    return float(weight)


def build_epp_config(
    config: EndpointPickerConfig,
    *,
    registry: Registry | None = None,
    context: PluginContext | None = None,
) -> EppPlugins:
    """Instantiate the plugins of ``config`` and assemble the profiles."""
    registry = registry if registry is not None else builtin_registry()
    context = context if context is not None else PluginContext()
    plugins: dict[str, Plugin] = {}
    handler: ProfileHandler | None = None
    for i, spec in enumerate(config.plugins):
        path = f"plugins[{i}]"
        plugin = registry.build(spec.type, spec.name, spec.parameters, context, path=path)
        if isinstance(plugin, ProfileHandler):
            if handler is not None:
                _fail(
                    path,
                    f"a second profile handler ({spec.name!r}); {handler.name!r} is already "
                    "configured and only one is allowed",
                )
            handler = plugin
        plugins[spec.name] = plugin

    def default(type_name: str, kind: type[Plugin]) -> Plugin:
        # The defaults are named after their type; a configured plugin of that name is reused
        # if it fits the role.
        found = plugins.get(type_name)
        if found is None:
            found = plugins[type_name] = registry.build(type_name, type_name, None, context)
        elif not isinstance(found, kind):
            index = next(i for i, spec in enumerate(config.plugins) if spec.name == type_name)
            _fail(
                f"plugins[{index}].name",
                f"plugin {type_name!r} has type {found.type_name!r}, but the default "
                f"{type_name} needs that name; rename the plugin",
            )
        return found

    # Where each profile's references sit in the text, for error messages: the implicit profile
    # points at the plugin entries themselves.
    located: list[tuple[ProfileSpec, str, Callable[[int, str], str]]]
    if config.scheduling_profiles is not None:
        located = [
            (spec, f"profile {spec.name!r}", _ref_locator(i))
            for i, spec in enumerate(config.scheduling_profiles)
        ]
    else:
        entries = {spec.name: f"plugins[{i}]" for i, spec in enumerate(config.plugins)}
        refs = tuple(
            PluginRef(name)
            for name, plugin in plugins.items()
            if isinstance(plugin, Filter | Scorer | Picker)
        )
        located = [
            (
                ProfileSpec(DEFAULT_PROFILE, refs),
                f"the implicit profile {DEFAULT_PROFILE!r} (no schedulingProfiles given)",
                lambda j, _key: entries[refs[j].plugin_ref],
            )
        ]
    profiles: dict[str, SchedulerProfile] = {}
    for profile_spec, label, where in located:
        profile = _assemble(profile_spec, plugins, label, where)
        if profile.picker is None:
            picker = default(DEFAULT_PICKER_TYPE, Picker)
            assert isinstance(picker, Picker)
            profile.picker = picker
        profiles[profile.name] = profile

    if handler is None:
        found = default(DEFAULT_PROFILE_HANDLER_TYPE, ProfileHandler)
        assert isinstance(found, ProfileHandler)
        handler = found
    try:
        handler.validate_profiles(list(profiles))
    except ValueError as err:
        _fail(
            "schedulingProfiles",
            f"profile handler {handler.name!r} (type {handler.type_name!r}) {err}",
        )

    detector = _saturation_detector(config, plugins, registry, context)
    try:
        order_producers(list(plugins.values()))
    except ValueError as err:
        _fail("plugins", str(err))
    return EppPlugins(config, plugins, handler, profiles, detector)


def _ref_locator(profile_index: int) -> Callable[[int, str], str]:
    def where(ref_index: int, key: str) -> str:
        return f"schedulingProfiles[{profile_index}].plugins[{ref_index}].{key}"

    return where


def _assemble(
    spec: ProfileSpec,
    plugins: Mapping[str, Plugin],
    label: str,
    where: Callable[[int, str], str],
) -> SchedulerProfile:
    profile = SchedulerProfile(spec.name)
    for j, ref in enumerate(spec.plugins):
        plugin = plugins[ref.plugin_ref]
        what = f"plugin {plugin.name!r} (type {plugin.type_name!r})"
        if not isinstance(plugin, Filter | Scorer | Picker):
            role = "profile handler" if isinstance(plugin, ProfileHandler) else "request-control"
            _fail(
                where(j, "pluginRef"),
                f"{what} is a {role} plugin, not a filter, scorer or picker; list it under "
                "plugins only",
            )
        if isinstance(plugin, Filter):
            profile.filters.append(plugin)
        if isinstance(plugin, Scorer):
            weight = 1.0 if ref.weight is None else ref.weight
            profile.scorers.append(WeightedScorer(plugin, weight))
        elif ref.weight is not None:
            _fail(where(j, "weight"), f"{what} is not a scorer; only scorers take a weight")
        if isinstance(plugin, Picker):
            if profile.picker is not None:
                _fail(
                    where(j, "pluginRef"),
                    f"{label} already has the picker {profile.picker.name!r}; a profile has "
                    "one picker",
                )
            profile.picker = plugin
    return profile


def _saturation_detector(
    config: EndpointPickerConfig,
    plugins: Mapping[str, Plugin],
    registry: Registry,
    context: PluginContext,
) -> SaturationDetector:
    section = config.saturation_detector
    path = "saturationDetector"
    if section is not None and section.plugin_ref is not None:
        found = plugins[section.plugin_ref]
        if not isinstance(found, SaturationDetector):
            _fail(
                f"{path}.pluginRef",
                f"plugin {found.name!r} (type {found.type_name!r}) is not a saturation "
                "detector (such as utilization-detector)",
            )
        return found
    params = None if section is None else section.parameters
    built = registry.build(
        SATURATION_DETECTOR_TYPE,
        SATURATION_DETECTOR_TYPE,
        params,
        context,
        path=path,
        params_path=path,
    )
    assert isinstance(built, SaturationDetector)
    return built
