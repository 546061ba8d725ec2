"""The EndpointPickerConfig files of deploy/config: one copy, found by name, all runnable."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvgate import epp_configs
from kvgate.scheduling.framework import PluginContext
from kvgate.scheduling.picker_config import load_epp_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY_CONFIG = REPO / "deploy" / "config"
SHIPPED = sorted(p.name for p in DEPLOY_CONFIG.glob("*.yaml"))


def test_the_package_and_the_chart_read_deploy_config_itself() -> None:
    """Links, not copies: the package's directory and the chart's files/config are deploy/config."""
    package_dir = Path(str(epp_configs.config_dir()))
    chart_dir = REPO / "deploy" / "helm" / "kvgate-gaie" / "files" / "config"
    assert package_dir.is_symlink() and chart_dir.is_symlink()
    assert package_dir.resolve() == chart_dir.resolve() == DEPLOY_CONFIG.resolve()


@pytest.mark.parametrize(
    "name",
    [
        epp_configs.KVGATE,
        epp_configs.DYNAMO,
        epp_configs.DISAGGREGATED,
        epp_configs.DISAGGREGATED_KVGATE,
        epp_configs.DISAGGREGATED_KVGATE_PAIRED,
        epp_configs.ROUND_ROBIN,
    ],
)
def test_named_configs_are_files_of_deploy_config(name: str) -> None:
    assert epp_configs.shipped_config(name) == (DEPLOY_CONFIG / name).read_text()


def test_an_unknown_name_lists_the_files() -> None:
    with pytest.raises(
        FileNotFoundError, match=r"nope\.yaml is not one of .*epp-config-dynamo\.yaml"
    ):
        epp_configs.shipped_config("nope.yaml")


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_builds_with_the_epps_own_plugins(name: str) -> None:
    context = PluginContext(
        env={"DYNAMO_KV_BLOCK_SIZE": "16"}, rng_seed=1, requests_carry_tokens=True
    )
    plugins = load_epp_config(epp_configs.shipped_config(name), context=context)
    assert plugins.scheduler().plugins
