"""Fuzz target: EndpointPickerConfig loading, from mutated valid configs.

The seeds are every config kvgate ships plus the reference default. A case applies one to four
structure-aware mutations to one seed (delete, replace, duplicate or insert a value anywhere; give
a plugin another registered type; point a name or a reference at another plugin; add parameters
of any plugin type), then loads it either as the document dumped to YAML or as that YAML text
damaged (cut, a line repeated or re-indented, YAML syntax or junk inserted, anchors and merges).

The property: `load_epp_config` returns a built config (whose scheduler then builds and closes)
or raises `EppConfigError`; never another exception.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import yaml

from kvgate import epp_configs
from kvgate.scheduling.framework import PluginContext
from kvgate.scheduling.picker_config import DEFAULT_CONFIG_TEXT, EppConfigError, load_epp_config
from kvgate.scheduling.registry import builtin_registry, camel_case
from tests.reliability.choices import Choices

_SHIPPED = sorted(p.name for p in epp_configs.config_dir().iterdir() if p.name.endswith(".yaml"))
SEEDS: list[Any] = [
    yaml.safe_load(text)
    for text in [DEFAULT_CONFIG_TEXT, *(epp_configs.shipped_config(name) for name in _SHIPPED)]
]
REGISTRY = builtin_registry()
PLUGIN_TYPES = REGISTRY.types


def _parameter_keys() -> list[str]:
    keys: set[str] = set()
    for type_name in PLUGIN_TYPES:
        params = REGISTRY.plugin_class(type_name).params_type
        if dataclasses.is_dataclass(params):
            keys.update(camel_case(f.name) for f in dataclasses.fields(params))
    return sorted(keys)


PARAMETER_KEYS = _parameter_keys()
KNOWN_KEYS = [
    "apiVersion", "kind", "plugins", "schedulingProfiles", "featureGates", "saturationDetector",
    "name", "type", "parameters", "pluginRef", "weight", *PARAMETER_KEYS,
]  # fmt: skip
# The kv-aware scorer loads the tokenizer its parameter names: only values that fail fast and
# offline (a missing directory, a file, a directory without tokenizer.json, a hub id offline).
TOKENIZER_VALUES = ["/nonexistent/tokenizer", "/etc/hostname", "/", "no-such-org/no-such-model"]
WORDS = [
    *PLUGIN_TYPES, *KNOWN_KEYS, *TOKENIZER_VALUES, "default", "decode", "prefill", "250ms", "2s",
    "1m30s", "-1s", "1h", "0.5", "", " ", "true", "null", "ɑ", "\x00",
    "inference.networking.x-k8s.io/v1alpha1", "EndpointPickerConfig",
]  # fmt: skip
SYNTAX = ["{", "}", "[", "]", ": ", "- ", "&x ", "*x", "!!python/object:os.system ''",
          "!!binary x", "%YAML 1.1\n", "---\n", "...\n", "? ", "\x00", "\ufeff", "'", '"', "#",
          "\t", "|\n", ">-\n", "!!float", "!!int", "<<: {}\n", "~"]  # fmt: skip


def value(c: Choices, depth: int = 0) -> Any:
    """Any YAML-representable value, biased to what a config holds."""
    kind = c.integer(0, 9 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return c.boolean()
    if kind == 2:
        return c.any_int()
    if kind == 3:
        return c.any_float()
    if kind in (4, 5):
        return c.pick(WORDS)
    if kind in (6, 7):
        return c.text(12)
    if kind == 8:
        return [value(c, depth + 1) for _ in range(c.integer(0, 3))]
    return {key(c): value(c, depth + 1) for _ in range(c.integer(0, 3))}


def key(c: Choices) -> Any:
    return c.pick(KNOWN_KEYS) if c.percent(80) else value(c, 3)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every location in a document (the root included)."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(_paths(v, (*prefix, i)))
    return out


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _plugin_names(doc: Any) -> list[Any]:
    plugins = doc.get("plugins") if isinstance(doc, dict) else None
    if not isinstance(plugins, list):
        return []
    return [p.get("name", p.get("type")) for p in plugins if isinstance(p, dict)]


def mutate(c: Choices, doc: Any) -> Any:
    path = c.pick(_paths(doc))
    op = c.integer(0, 6)
    if not path:
        return value(c) if op == 1 else doc
    parent = _at(doc, path[:-1])
    k = path[-1]
    here = parent[k]
    if op == 0:
        del parent[k]
    elif op == 1:
        parent[k] = value(c)
    elif op == 2 and isinstance(parent, list):
        parent.insert(k, copy.deepcopy(here))
    elif op == 2:
        parent[k] = copy.deepcopy(c.pick(list(parent.values())))
    elif op == 3 and isinstance(here, dict):
        here[key(c)] = value(c)
    elif op == 3 and isinstance(here, list):
        here.insert(c.integer(0, len(here)), value(c))
    elif op == 4 and isinstance(here, dict):
        here["type"] = c.pick(PLUGIN_TYPES)
    elif op == 5 and isinstance(here, dict):
        field = c.pick(["name", "pluginRef"])
        here[field] = c.pick([*_plugin_names(doc), "ghost"])
    elif op == 6 and isinstance(here, dict):
        params = here.setdefault("parameters", {})
        if isinstance(params, dict):
            name = c.pick(PARAMETER_KEYS)
            params[name] = c.pick(TOKENIZER_VALUES) if name == "tokenizer" else value(c)
    return doc


def _dump(doc: Any) -> str:
    try:
        return yaml.dump(doc, Dumper=yaml.CSafeDumper, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:
        return repr(doc)


def damage(c: Choices, text: str) -> str:
    lines = text.splitlines(keepends=True) or [""]
    op = c.integer(0, 4)
    if op == 0:
        return text[: c.integer(0, len(text))]
    if op == 1:
        i = c.integer(0, len(lines) - 1)
        lines.insert(i, lines[i])
        return "".join(lines)
    if op == 2:
        i = c.integer(0, len(lines) - 1)
        lines[i] = c.pick(["  ", "\t", " ", "- "]) + lines[i]
        return "".join(lines)
    if op == 3:
        anchored = "base: &a\n  name: x\n" + text
        return anchored + c.pick(["\nextra: *a\n", "<<: *a\n", "\nplugins: *a\n"])
    at = c.integer(0, len(text))
    return text[:at] + (c.pick(SYNTAX) if c.boolean() else c.text(8)) + text[at:]


def config_text(c: Choices) -> str:
    doc = copy.deepcopy(c.pick(SEEDS))
    for _ in range(c.integer(1, 4)):
        doc = mutate(c, doc)
    text = _dump(doc)
    return damage(c, text) if c.percent(30) else text


class ConfigTarget:
    """One case: build the text from the bytes, load it as the EPP would, check the outcome.

    Plugins are built as for trace replay (requests carry their tokens), so no tokenizer is
    loaded unless a kv-aware-scorer's parameter names one."""

    name = "epp-config"

    def __init__(self) -> None:
        self.outcomes = {"built": 0, "EppConfigError": 0}

    def __call__(self, data: bytes) -> None:
        text = config_text(Choices(data))
        context = PluginContext(env={"DYNAMO_KV_BLOCK_SIZE": "16"}, requests_carry_tokens=True)
        try:
            plugins = load_epp_config(text, context=context)
        except EppConfigError:
            self.outcomes["EppConfigError"] += 1
            return
        except Exception as err:
            raise AssertionError(f"{type(err).__name__} loading config:\n{text}") from err
        self.outcomes["built"] += 1
        plugins.scheduler().close()
