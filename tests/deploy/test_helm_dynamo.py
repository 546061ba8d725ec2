"""The chart's Dynamo backend (examples/dynamo_agg_qwen.yaml): the pool selects the frontend
pods, the picker discovers the workers from a frontend, and fail-open stays coherent with the
frontend's router mode. Render tests only (no cluster)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_python import HelmRenderError, lint

from kvgate.commands.epp import build_parser, settings_from_args
from tests.deploy.test_helm_chart import CHART, CORE_KINDS, KUBE_VERSION, NAMESPACE, one, render

EXAMPLE = CHART / "examples" / "dynamo_agg_qwen.yaml"


def example(**overrides: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    for key, override in overrides.items():
        values.setdefault(key, {}).update(copy.deepcopy(override))
    return values


def epp_args(objects: list[dict[str, Any]]) -> list[str]:
    deployment = one(objects, "Deployment", "qwen-epp")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args: list[str] = container["args"]
    return args


def test_example_lints_and_validates() -> None:
    report = lint(CHART, example(), strict=True, namespace=NAMESPACE)
    assert not [m for m in report["messages"] if m["severity"] >= 2]
    for obj in render(example()):
        if obj["kind"] in CORE_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_pool_is_the_frontends_and_the_picker_discovers_the_workers(tmp_path: Path) -> None:
    objects = render(example())
    pool = one(objects, "InferencePool")
    assert pool["spec"]["selector"]["matchLabels"] == {
        "nvidia.com/dynamo-graph-deployment-name": "qwen-agg",
        "nvidia.com/dynamo-component-type": "frontend",
    }
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["endpointPickerRef"]["failureMode"] == "FailOpen"
    subcommand, *args = epp_args(objects)
    assert subcommand == "epp"
    assert not any(a.startswith(("--events-port", "--instance-id-annotation")) for a in args)
    config = tmp_path / "epp-config.yaml"
    config.write_text(one(objects, "ConfigMap")["data"]["epp-config.yaml"])
    local = [a.replace("/etc/kvgate/epp-config.yaml", str(config)) for a in args]
    settings = settings_from_args(build_parser().parse_args(local))
    assert settings.pool_name == "qwen-pool"
    dynamo = settings.dynamo
    assert dynamo is not None
    # Frontends come from the pool (no static list); workers from their /health.
    assert (dynamo.source, dynamo.frontends) == ("frontend", ())
    assert dynamo.addressing.system_port == 9090
    assert (str(dynamo.addressing.events), str(dynamo.addressing.replay)) == ("+1", "+2")
    env = {e["name"]: e.get("value") for e in one(objects, "Deployment", "qwen-epp")["spec"][
        "template"]["spec"]["containers"][0]["env"]}  # fmt: skip
    assert env["DYN_NAMESPACE"] == "my-model-qwen-agg"
    assert env["DYNAMO_KV_BLOCK_SIZE"] == "16"


def test_kv_events_off_turns_the_worker_subscriptions_off() -> None:
    args = epp_args(render(example(dynamo={"useKvEvents": False})))
    assert "--dynamo-events-port=off" in args
    assert "--dynamo-replay-port=off" in args


def test_fail_close_may_use_a_direct_frontend() -> None:
    values = example(
        inferencePool={"failureMode": "FailClose"}, dynamoBackend={"frontendRouterMode": "direct"}
    )
    assert one(render(values), "InferencePool")["spec"]["endpointPickerRef"]["failureMode"] == (
        "FailClose"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dynamoBackend": {"frontendRouterMode": "direct"}}, "FailOpen with"),
        ({"epp": {"useDynamo": False}, "dynamo": {"kvBlockSize": None}}, "needs epp.useDynamo"),
    ],
    ids=["fail-open-with-direct-frontend", "standard-picker"],
)
def test_incoherent_values_fail_rendering(
    overrides: dict[str, dict[str, Any]], message: str
) -> None:
    with pytest.raises(HelmRenderError, match=message):
        render(example(**overrides))
