"""The plugin registry: one explicit table from type name to plugin class, and strict parameters.

Every plugin type kvgate knows is a line of `BUILTIN_PLUGINS`, naming its class by module path so
that nothing is imported until a configuration asks for the type. What a plugin class declares
(``type_name``, ``params_type``, ``from_config``) is the contract in `kvgate.scheduling.framework`;
the registry checks ``type_name`` against the table when the class is first loaded.

Parameters are parsed strictly: defaults first, then the configured values (snake_case fields are
written camelCase: ``max_num_of_endpoints`` ↔ ``maxNumOfEndpoints``); an unknown key, a wrong type
or a value out of bounds is refused, never replaced by a default.

Errors::

    ConfigError (kvgate.errors; a ValueError)
     └── EppConfigError        anything wrong in an EndpointPickerConfig; ``path`` says where
          └── PluginConfigError  a plugin's type or parameters; names plugin, type, parameter and
                                 what is allowed
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import (
    Annotated,
    Any,
    Final,
    Literal,
    NoReturn,
    Union,
    get_args,
    get_origin,
)
from typing import get_type_hints as _get_type_hints

from kvgate.errors import ConfigError
from kvgate.scheduling.framework import Duration, Plugin, PluginContext, Range

PluginClass = type[Plugin]

# One line per plugin type. Adding a plugin = adding its line; a repeated type name is an error.
BUILTIN_PLUGINS: Final[tuple[tuple[str, str], ...]] = (
    (
        "single-profile-handler",
        "kvgate.scheduling.plugins.single_profile_handler:SingleProfileHandler",
    ),
    ("pd-profile-handler", "kvgate.scheduling.plugins.disagg_profile_handler:PdProfileHandler"),
    ("decode-filter", "kvgate.scheduling.plugins.role_filter:DecodeFilter"),
    ("prefill-filter", "kvgate.scheduling.plugins.role_filter:PrefillFilter"),
    ("queue-scorer", "kvgate.scheduling.plugins.queue_scorer:QueueScorer"),
    (
        "kv-cache-utilization-scorer",
        "kvgate.scheduling.plugins.kv_cache_utilization_scorer:KvCacheUtilizationScorer",
    ),
    (
        "running-requests-size-scorer",
        "kvgate.scheduling.plugins.running_requests_size_scorer:RunningRequestsSizeScorer",
    ),
    ("lora-affinity-scorer", "kvgate.scheduling.plugins.lora_affinity_scorer:LoraAffinityScorer"),
    ("prefix-cache-scorer", "kvgate.scheduling.plugins.prefix_cache_scorer:PrefixCacheScorer"),
    ("max-score-picker", "kvgate.scheduling.plugins.max_score_picker:MaxScorePicker"),
    ("random-picker", "kvgate.scheduling.plugins.random_picker:RandomPicker"),
    (
        "weighted-random-picker",
        "kvgate.scheduling.plugins.weighted_random_picker:WeightedRandomPicker",
    ),
    ("round-robin-picker", "kvgate.scheduling.plugins.round_robin_picker:RoundRobinPicker"),
    ("slo-aware-picker", "kvgate.scheduling.plugins.slo_aware_picker:SloAwarePicker"),
    ("utilization-detector", "kvgate.scheduling.plugins.saturation:UtilizationDetector"),
    ("kv-aware-scorer", "kvgate.scheduling.plugins.kv_aware_scorer:KvAwareScorer"),
    (
        "predicted-latency-scorer",
        "kvgate.scheduling.plugins.predicted_latency_scorer:PredictedLatencyScorer",
    ),
    (
        "dynamo-response-complete",
        "kvgate.scheduling.plugins.dynamo_response_complete:DynamoResponseComplete",
    ),
)


class EppConfigError(ConfigError):
    """An EndpointPickerConfig is invalid; ``path`` locates the value (``plugins[2].type``)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path or "<config>", reason)
        self.path = self.field


class PluginConfigError(EppConfigError):
    """A plugin's parameters are invalid. A plugin's ``from_config`` may raise it with any path:
    the registry relocates it under the plugin's entry in the configuration."""

    def __init__(
        self,
        path: str,
        reason: str,
        *,
        plugin_name: str,
        plugin_type: str,
        parameter: str | None = None,
        allowed: str | None = None,
    ) -> None:
        detail = f"plugin {plugin_name!r} (type {plugin_type!r}): {reason}"
        if allowed is not None:
            detail += f"; allowed: {allowed}"
        super().__init__(path, detail)
        self.problem = reason
        self.plugin_name = plugin_name
        self.plugin_type = plugin_type
        self.parameter = parameter
        self.allowed = allowed


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float | None:
    """Seconds in a Go duration string, or None if it is not one."""
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and pos > 0 else None


def camel_case(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


@dataclass(frozen=True, slots=True)
class _ParamField:
    attr: str
    key: str
    kind: type | tuple[Any, ...] | Duration
    """bool / int / float / str, the choices of a Literal, or SECONDS."""
    optional: bool
    bounds: Range | None
    required: bool

    def allowed(self) -> str:
        if isinstance(self.kind, tuple):
            text = "one of " + ", ".join(repr(c) for c in self.kind)
        elif isinstance(self.kind, Duration):
            text = 'a duration ("250ms", "2s", "1m30s") or a number of seconds'
        else:
            text = _KIND_NAMES[self.kind]
        if self.bounds is not None:
            text += " " + self.bounds.describe()
        return text + (", or null" if self.optional else "")


_KIND_NAMES: dict[type, str] = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
}


_analysed: dict[type[Any], tuple[_ParamField, ...]] = {}


def _param_fields(spec: type[Any]) -> tuple[_ParamField, ...]:
    """The parameters of a spec dataclass, analysed once per class."""
    found = _analysed.get(spec)
    if found is None:
        found = _analysed[spec] = _analyse(spec)
    return found


def _analyse(spec: type[Any]) -> tuple[_ParamField, ...]:
    if not dataclasses.is_dataclass(spec):
        raise TypeError(f"{spec.__qualname__}: a plugin's params_type must be a dataclass")
    hints = _get_type_hints(spec, include_extras=True)
    out = []
    for f in dataclasses.fields(spec):
        hint = hints[f.name]
        bounds: Range | None = None
        marker: Duration | None = None
        if get_origin(hint) is Annotated:
            hint, *extras = get_args(hint)
            for extra in extras:
                if isinstance(extra, Range):
                    bounds = extra
                elif isinstance(extra, Duration):
                    marker = extra
        optional = False
        if get_origin(hint) in (Union, types.UnionType):
            members = [a for a in get_args(hint) if a is not type(None)]
            optional = len(members) < len(get_args(hint))
            if len(members) != 1:
                raise TypeError(f"{spec.__qualname__}.{f.name}: unsupported type {hint!r}")
            hint = members[0]
        kind: type | tuple[Any, ...] | Duration
        if marker is not None:
            kind = marker
        elif get_origin(hint) is Literal:
            kind = get_args(hint)
        elif hint in _KIND_NAMES:
            kind = hint
        else:
            raise TypeError(f"{spec.__qualname__}.{f.name}: unsupported type {hint!r}")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out.append(_ParamField(f.name, camel_case(f.name), kind, optional, bounds, required))
    return tuple(out)


def _convert(pf: _ParamField, value: object) -> tuple[bool, object]:
    """(ok, converted value) for one configured value."""
    if value is None:
        return pf.optional, None
    kind = pf.kind
    converted: object
    if isinstance(kind, tuple):
        return value in kind and not isinstance(value, bool | float), value
    if isinstance(kind, Duration):
        if isinstance(value, str):
            seconds = parse_duration(value.strip())
            if seconds is None:
                return False, value
            converted = seconds
        elif isinstance(value, int | float) and not isinstance(value, bool):
            converted = float(value)
        else:
            return False, value
    elif kind is bool or kind is str:
        if not isinstance(value, kind):
            return False, value
        converted = value
    elif kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            return False, value
        converted = value
    else:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return False, value
        converted = float(value)
    if isinstance(converted, float) and not math.isfinite(converted):
        return False, value
    if pf.bounds is not None and isinstance(converted, int | float):
        return pf.bounds.contains(converted), converted
    return True, converted


def parse_params(
    spec: type[Any], raw: object, *, plugin_name: str, plugin_type: str, path: str
) -> Any:
    """Build ``spec`` from configured parameters (``raw``: a mapping or None), strictly.

    ``path`` is where the parameters sit in the configuration (``plugins[1].parameters``)."""
    fields = _param_fields(spec)

    def fail(where: str, reason: str, parameter: str | None, allowed: str | None) -> NoReturn:
        raise PluginConfigError(
            where,
            reason,
            plugin_name=plugin_name,
            plugin_type=plugin_type,
            parameter=parameter,
            allowed=allowed,
        )

    keys = ", ".join(pf.key for pf in fields) or "none (this plugin takes no parameters)"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        fail(path, f"parameters must be a mapping, got {_type_name(raw)}", None, keys)
    by_key = {pf.key: pf for pf in fields}
    for key in raw:
        if key not in by_key:
            fail(f"{path}.{key}", f"unknown parameter {key!r}", str(key), keys)
    values: dict[str, object] = {}
    for pf in fields:
        where = f"{path}.{pf.key}"
        if pf.key not in raw:
            if pf.required:
                fail(where, "is required", pf.key, pf.allowed())
            continue
        ok, converted = _convert(pf, raw[pf.key])
        if not ok:
            fail(where, f"got {raw[pf.key]!r}", pf.key, pf.allowed())
        values[pf.attr] = converted
    return spec(**values)


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


class Registry:
    """Plugin types by name. Immutable: a variant (for tests, or with extra plugins) is a new
    registry made by `extended`, so no code can re-register a type behind another's back."""

    def __init__(self, entries: Iterable[tuple[str, str | PluginClass]]) -> None:
        self._targets: dict[str, str | PluginClass] = {}
        for type_name, target in entries:
            if type_name in self._targets:
                raise ValueError(f"plugin type {type_name!r} registered twice")
            self._targets[type_name] = target
        self._loaded: dict[str, PluginClass] = {}

    def extended(self, entries: Iterable[tuple[str, str | PluginClass]]) -> Registry:
        """A new registry with these entries added (a type already present is an error)."""
        return Registry([*self._targets.items(), *entries])

    @property
    def types(self) -> list[str]:
        return sorted(self._targets)

    def __contains__(self, type_name: object) -> bool:
        return type_name in self._targets

    def plugin_class(self, type_name: str) -> PluginClass:
        """The class registered for ``type_name``, imported on first use. KeyError if unknown."""
        loaded = self._loaded.get(type_name)
        if loaded is not None:
            return loaded
        target = self._targets[type_name]
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module_name), attr)
        cls: PluginClass = target
        if cls.type_name != type_name:
            raise TypeError(
                f"{target!r} is registered as {type_name!r} but declares {cls.type_name!r}"
            )
        self._loaded[type_name] = cls
        return cls

    def build(
        self,
        type_name: str,
        name: str,
        params: object,
        context: PluginContext,
        *,
        path: str = "",
        params_path: str | None = None,
    ) -> Plugin:
        """Parse ``params`` and construct the plugin; errors say where and why.

        ``path`` locates the plugin's entry (``plugins[2]``), ``params_path`` its parameters
        (default ``<path>.parameters``). ``from_config`` may raise ValueError for a problem that
        spans parameters; it is reported as a `PluginConfigError` at ``params_path``."""
        if type_name not in self._targets:
            close = difflib.get_close_matches(type_name, self._targets, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise EppConfigError(
                f"{path}.type" if path else "type",
                f"unknown type {type_name!r} (known types: {', '.join(self.types)}){hint}",
            )
        cls = self.plugin_class(type_name)
        if params_path is None:
            params_path = f"{path}.parameters" if path else "parameters"
        spec = parse_params(
            cls.params_type, params, plugin_name=name, plugin_type=type_name, path=params_path
        )
        try:
            return cls.from_config(name, spec, context)
        except PluginConfigError as err:
            keys = {pf.key for pf in _param_fields(cls.params_type)}
            where, problem = params_path, err.problem
            if err.parameter in keys:
                where = f"{params_path}.{err.parameter}"
            elif err.parameter is not None:
                problem = f"{err.parameter}: {problem}"
            raise PluginConfigError(
                where,
                problem,
                plugin_name=name,
                plugin_type=type_name,
                parameter=err.parameter,
                allowed=err.allowed,
            ) from err
        except EppConfigError:
            raise
        except ValueError as err:
            raise PluginConfigError(
                params_path, str(err), plugin_name=name, plugin_type=type_name
            ) from err


@cache
def builtin_registry() -> Registry:
    """The registry of `BUILTIN_PLUGINS`."""
    return Registry(BUILTIN_PLUGINS)
