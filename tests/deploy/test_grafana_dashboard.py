"""The Grafana dashboard queries only metrics a running endpoint picker really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from kvgate.epp_configs import KVGATE, shipped_config
from kvgate.extproc.epp_runtime import EppRuntime
from tests.extproc.utils import loopback_epp_settings

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "kvgate-dashboard.json"
METRIC = re.compile(r"\b(?:kvgate|inference)_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def queried() -> dict[str, set[str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {
        panel["title"]: {name for t in panel["targets"] for name in METRIC.findall(t["expr"])}
        for panel in panels
    }


async def test_every_panel_queries_exported_metrics(qwen3_dir: Path, tmp_path: Path) -> None:
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text("[]")
    settings = loopback_epp_settings(qwen3_dir, endpoints)
    settings.config_text = shipped_config(KVGATE)
    async with EppRuntime(settings) as runtime:
        exported = {
            family.name + suffix
            for family in runtime.metrics.registry.collect()
            for suffix in SUFFIXES.get(family.type, ("",))
        }
    panels = queried()
    assert len(panels) >= 10
    for title, names in panels.items():
        assert names, f"panel {title!r} queries no metric"
        assert names <= exported, f"panel {title!r}: {sorted(names - exported)} not exported"


def test_every_panel_has_a_unique_place_and_a_data_source() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    places = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in panels]
    assert len(set(places)) == len(places)
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)
