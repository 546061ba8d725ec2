"""The kvgate-gaie Helm chart: lint, render offline for several value sets, check the output.

Rendering goes through helm-python-sdk (Helm v4 as a library, no binary, no cluster). Core kinds are
validated against Kubernetes' own schemas (kubernetes-validate, strict: unknown fields refused),
the Inference Extension resources against the upstream CRDs vendored in deploy/crds/, and the rest
by cross-reference: every port, name and flag one object names must exist in the object it names.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_python import Chart, HelmRenderError, HelmValuesError, lint

from kvgate.commands import body_transformer
from kvgate.commands.epp import build_parser, settings_from_args
from kvgate.extproc.epp_runtime import EppRuntime
from kvgate.extproc.headers import GATEWAY_INPUTS
from kvgate.scheduling.router_config import KvRouterConfig
from tests.extproc.utils import ExtProcStream, chat_body

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "kvgate-gaie"
EXAMPLE = CHART / "examples" / "vllm_agg_qwen.yaml"
LUA_DIR = REPO / "deploy" / "lua-filter"
CONFIG_DIR = REPO / "deploy" / "config"
CRD_DIR = REPO / "deploy" / "crds"
NAMESPACE = "my-model"
KUBE_VERSION = "1.30"
CORE_KINDS = {"Deployment", "Service", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"}
EPP_PORTS = {"grpc": 9002, "grpc-health": 9003, "metrics": 9090}
SEED_STANDARD_IMAGE = (
    "us-central1-docker.pkg.dev/k8s-artifacts-prod/images/"
    "gateway-api-inference-extension/epp:v1.2.1"
)


def _example() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return values


def _with(base: dict[str, Any], **overrides: dict[str, Any]) -> dict[str, Any]:
    values = copy.deepcopy(base)
    for key, override in overrides.items():
        values.setdefault(key, {}).update(override)
    return values


VALUE_SETS: dict[str, dict[str, Any]] = {
    "example-kv-routing": _example(),
    "body-transformer-replicas-monitor": _with(
        _example(),
        bodyTransformer={"enabled": True, "mode": "extProc", "replicas": 2},
        epp={"replicas": 3, "secureServing": False, "extraArgs": ["--decision-header"]},
        dynamo={"replicaSync": {"enabled": True, "natsUrl": "nats://nats.dynamo:4222"}},
        metrics={"serviceMonitor": {"enabled": True}},
        httpRoute={"gatewayNamespace": "gateways"},
        inferencePool={"targetPorts": [8000, 8001], "failureMode": "FailClose"},
    ),
    "standard-epp": _with(_example(), epp={"useDynamo": False}, dynamo={"kvBlockSize": None}),
    # The seed's `--set epp.useDynamo=false --set-string extension.image=$EPP_IMAGE`.
    "seed-standard-epp-image": _with(
        _example(), epp={"useDynamo": False}, extension={"image": SEED_STANDARD_IMAGE}
    ),
    "round-robin-no-block-size": _with(_example(), dynamo={"useKvRouting": False}),
    "istio-lua": _with(_example(), bodyTransformer={"enabled": True, "mode": "istioLua"}),
    "envoy-gateway-lua": _with(
        _example(), bodyTransformer={"enabled": True, "mode": "envoyGatewayLua"}
    ),
}


@functools.cache
def _chart() -> Chart:
    return Chart.load(CHART)


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    manifests = _chart().render(values, name="kvgate", namespace=NAMESPACE)
    objects: list[dict[str, Any]] = []
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


@functools.cache
def _rendered(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(VALUE_SETS[name]))


@pytest.fixture(params=sorted(VALUE_SETS))
def case(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    name: str = request.param
    return name, copy.deepcopy(list(_rendered(name)))


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def containers(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for o in objects:
        if o["kind"] == "Deployment":
            for c in o["spec"]["template"]["spec"]["containers"]:
                yield o, c


def _crd_schema(filename: str, version: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRD_DIR / filename).read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema: dict[str, Any] = v["schema"]["openAPIV3Schema"]
            return schema
    raise AssertionError(f"{filename} has no version {version}")


# Each kind against the release the chart targets and, for the pool, the API as it stands on main.
CRD_SCHEMAS: dict[tuple[str, str], list[tuple[str, str]]] = {
    ("inference.networking.k8s.io/v1", "InferencePool"): [
        ("v1.2.1/inference.networking.k8s.io_inferencepools.yaml", "v1"),
        ("main/inference.networking.k8s.io_inferencepools.yaml", "v1"),
    ],
    ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective"): [
        ("v1.2.1/inference.networking.x-k8s.io_inferenceobjectives.yaml", "v1alpha2"),
    ],
}


# --- lint -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_strict_is_clean(name: str) -> None:
    report = lint(CHART, VALUE_SETS[name], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems, problems
    assert not report["errors"]


# --- schemas ----------------------------------------------------------------------------------


def test_every_object_validates(case: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = case
    assert objects
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"])
        assert obj["metadata"]["name"], obj
        if obj["kind"] in CORE_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        elif key in CRD_SCHEMAS:
            for crd in CRD_SCHEMAS[key]:
                jsonschema.validate(obj, _crd_schema(*crd))
        else:
            # Gateway API, kGateway, Istio, Envoy Gateway and Prometheus operator kinds: no schema
            # here; their references are checked by the semantic tests below.
            assert key in {
                ("gateway.networking.k8s.io/v1", "HTTPRoute"),
                ("gateway.networking.k8s.io/v1beta1", "ReferenceGrant"),
                ("gateway.kgateway.dev/v1alpha1", "GatewayExtension"),
                ("gateway.kgateway.dev/v1alpha1", "TrafficPolicy"),
                ("networking.istio.io/v1alpha3", "EnvoyFilter"),
                ("gateway.envoyproxy.io/v1alpha1", "EnvoyPatchPolicy"),
                ("monitoring.coreos.com/v1", "ServiceMonitor"),
            }, key


@pytest.mark.parametrize(
    "crd",
    CRD_SCHEMAS[("inference.networking.k8s.io/v1", "InferencePool")],
    ids=lambda crd: crd[0].split("/")[0],
)
def test_missing_fields_are_caught_by_the_crd_schema(crd: tuple[str, str]) -> None:
    """The CRD check is not vacuous: a pool without targetPorts is refused."""
    pool = one(render(VALUE_SETS["example-kv-routing"]), "InferencePool")
    del pool["spec"]["targetPorts"]
    with pytest.raises(jsonschema.ValidationError, match="targetPorts"):
        jsonschema.validate(pool, _crd_schema(*crd))


# --- cross references -------------------------------------------------------------------------


def _container_port(container: dict[str, Any], ref: int | str) -> int:
    for port in container["ports"]:
        if ref in (port["name"], port["containerPort"]):
            number: int = port["containerPort"]
            return number
    raise AssertionError(f"{container['name']} has no port {ref!r}")


def test_ports_agree_between_deployment_service_probes_and_pool(
    case: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = case
    pool = one(objects, "InferencePool")
    ref = pool["spec"]["endpointPickerRef"]
    service = one(objects, "Service", ref["name"])
    deployment = one(objects, "Deployment", ref["name"])
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == EPP_PORTS
    by_port = {p["port"]: p for p in service["spec"]["ports"]}
    assert sorted(by_port) == sorted(EPP_PORTS.values())
    for number, port in by_port.items():
        assert _container_port(container, port["targetPort"]) == number
    # The pool's picker port is the Service port leading to the ext_proc container port.
    ext_proc = by_port[ref["port"]["number"]]
    assert _container_port(container, ext_proc["targetPort"]) == EPP_PORTS["grpc"]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == EPP_PORTS["grpc-health"]
    assert container["readinessProbe"]["grpc"]["service"] == "readiness"
    route = one(objects, "HTTPRoute")
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    assert (backend["group"], backend["kind"], backend["name"]) == (
        "inference.networking.k8s.io",
        "InferencePool",
        pool["metadata"]["name"],
    )
    objective = one(objects, "InferenceObjective")
    assert objective["spec"]["poolRef"]["name"] == pool["metadata"]["name"]


def test_pool_follows_values(case: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = case
    values = VALUE_SETS[name]
    pool = one(objects, "InferencePool")
    assert (
        pool["spec"]["selector"]["matchLabels"]
        == values["inferencePool"]["selector"]["matchLabels"]
    )
    ports = values["inferencePool"].get("targetPorts") or [values["inferencePool"]["port"]]
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == ports
    assert pool["spec"]["endpointPickerRef"]["failureMode"] == values["inferencePool"].get(
        "failureMode", "FailOpen"
    )
    epp = one(objects, "Deployment", pool["spec"]["endpointPickerRef"]["name"])
    assert epp["spec"]["replicas"] == values["epp"].get("replicas", 1)


def _epp_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pool = one(objects, "InferencePool")
    deployment = one(objects, "Deployment", pool["spec"]["endpointPickerRef"]["name"])
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def test_epp_args_are_flags_kvgate_has(
    case: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    name, objects = case
    container = _epp_container(objects)
    image = VALUE_SETS[name].get("extension", {}).get("image")
    if not VALUE_SETS[name]["epp"].get("useDynamo", True) and image:
        # The upstream picker, run as the seed's command names it.
        assert container["image"] == image
        assert "command" not in container
        return
    assert container["command"] == ["kvgate"]
    subcommand, *args = container["args"]
    assert subcommand == "epp"
    parser = build_parser()
    known = {opt for action in parser._actions for opt in action.option_strings}
    flags = [a.split("=", 1)[0] for a in args]
    assert all(f.startswith("--") for f in flags), flags
    assert set(flags) <= known, set(flags) - known
    # Beyond the names: kvgate parses the values and builds its settings from them.
    config = one(objects, "ConfigMap")["data"]["epp-config.yaml"]
    config_path = tmp_path / "epp-config.yaml"
    config_path.write_text(config)
    local = [a.replace("/etc/kvgate/epp-config.yaml", str(config_path)) for a in args]
    settings = settings_from_args(parser.parse_args(local))
    pool = one(objects, "InferencePool")
    assert (settings.pool_name, settings.pool_namespace) == (pool["metadata"]["name"], NAMESPACE)
    assert (settings.grpc_port, settings.health_port, settings.metrics_port) == (9002, 9003, 9090)
    assert settings.config_text == config
    objective = one(objects, "InferenceObjective")
    assert settings.options.priorities == {
        objective["metadata"]["name"]: objective["spec"]["priority"]
    }
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/kvgate"


def test_kv_routing_env_and_flags(case: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = case
    values = VALUE_SETS[name]
    container = _epp_container(objects)
    env = _env(container)
    if not values["epp"].get("useDynamo", True):
        assert not any(k.startswith("DYNAMO_") for k in env)
        return
    kv = values["dynamo"].get("useKvRouting", True)
    assert env["DYNAMO_USE_KV_ROUTING"] == str(kv).lower()
    assert ("DYNAMO_KV_BLOCK_SIZE" in env) == (values["dynamo"].get("kvBlockSize") is not None)
    if kv:
        assert env["DYNAMO_KV_BLOCK_SIZE"] == "16"
        assert "--tokenizer=Qwen/Qwen3-0.6B" in container["args"]
        assert "--events-port=5557" in container["args"]
        assert "--replay-port=5558" in container["args"]
    else:
        assert not any(
            a.startswith(("--tokenizer", "--events-port", "--replay-port"))
            for a in container["args"]
        )
    # kvgate's own parser accepts the rendered environment, with the values given.
    config = KvRouterConfig.from_env(env)
    assert config.use_kv_routing is kv
    if kv:
        assert config.block_size == values["dynamo"]["kvBlockSize"]
    sync = values["dynamo"].get("replicaSync", {})
    assert env["DYNAMO_ROUTER_REPLICA_SYNC"] == str(sync.get("enabled", False)).lower()
    assert env.get("NATS_SERVER") == sync.get("natsUrl")
    hf = next(e for e in container["env"] if e["name"] == "HF_TOKEN")
    assert hf["valueFrom"]["secretKeyRef"] == {"name": "hf-token-secret", "key": "HF_TOKEN"}


def test_pods_run_unprivileged(case: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = case
    for deployment, container in containers(objects):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        # A read-only root needs somewhere writable for temp files.
        assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])


def test_rbac_is_read_only_and_bound_to_the_epp(case: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = case
    role = one(objects, "Role")
    granted = {
        (group, resource)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert granted == {
        ("inference.networking.k8s.io", "inferencepools"),
        ("inference.networking.x-k8s.io", "inferenceobjectives"),
        ("", "pods"),
    }
    assert all(sorted(rule["verbs"]) == ["get", "list", "watch"] for rule in role["rules"])
    binding = one(objects, "RoleBinding")
    account = one(objects, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    pool = one(objects, "InferencePool")
    epp = one(objects, "Deployment", pool["spec"]["endpointPickerRef"]["name"])
    assert epp["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


def test_body_transformer_wiring() -> None:
    values = VALUE_SETS["body-transformer-replicas-monitor"]
    objects = render(values)
    route = one(objects, "HTTPRoute")
    assert route["spec"]["parentRefs"][0]["namespace"] == "gateways"
    extension = one(objects, "GatewayExtension")
    service = one(
        objects, "Service", extension["spec"]["extProc"]["grpcService"]["backendRef"]["name"]
    )
    deployment = one(objects, "Deployment", service["metadata"]["name"])
    assert deployment["spec"]["replicas"] == 2
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    backend = extension["spec"]["extProc"]["grpcService"]["backendRef"]
    port = next(p for p in service["spec"]["ports"] if p["port"] == backend["port"])
    assert _container_port(container, port["targetPort"]) == 9004
    assert container["livenessProbe"]["grpc"]["port"] == _container_port(container, "grpc-health")
    subcommand, *args = container["args"]
    assert subcommand == "body-transformer"
    parsed = body_transformer.build_parser().parse_args(args)
    assert (parsed.port, parsed.grpc_health_port, parsed.metrics_port) == (9004, 9005, 9091)
    policy = one(objects, "TrafficPolicy")
    assert policy["spec"]["targetRefs"][0]["name"] == route["metadata"]["name"]
    assert policy["spec"]["extProc"]["extensionRef"]["name"] == extension["metadata"]["name"]
    grant = one(objects, "ReferenceGrant")
    assert {"group": "", "kind": "Service", "name": service["metadata"]["name"]} in grant["spec"][
        "to"
    ]
    assert extension["metadata"]["namespace"] in {f["namespace"] for f in grant["spec"]["from"]}
    monitor = one(objects, "ServiceMonitor")
    epp_service = one(
        objects, "Service", one(objects, "InferencePool")["spec"]["endpointPickerRef"]["name"]
    )
    assert (
        monitor["spec"]["selector"]["matchLabels"].items()
        <= epp_service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] in {
        p["name"] for p in epp_service["spec"]["ports"]
    }


def test_body_transformer_off_renders_none_of_it() -> None:
    kinds = {o["kind"] for o in _rendered("example-kv-routing")}
    assert not kinds & {"GatewayExtension", "TrafficPolicy", "ReferenceGrant", "EnvoyFilter"}
    assert sum(o["kind"] == "Deployment" for o in _rendered("example-kv-routing")) == 1


def _lua(doc: dict[str, Any]) -> str:
    if doc["kind"] == "EnvoyFilter":
        value = doc["spec"]["configPatches"][0]["patch"]["value"]
    else:
        value = doc["spec"]["jsonPatches"][0]["operation"]["value"]
    source: str = value["typed_config"]["default_source_code"]["inline_string"]
    return source


@pytest.mark.parametrize(
    ("name", "kind", "source"),
    [
        ("istio-lua", "EnvoyFilter", "istio-envoyfilter.yaml"),
        ("envoy-gateway-lua", "EnvoyPatchPolicy", "envoygateway-patch.yaml"),
    ],
)
def test_lua_variant_uses_the_shipped_filter(name: str, kind: str, source: str) -> None:
    objects = list(_rendered(name))
    doc = one(objects, kind)
    shipped = yaml.safe_load((LUA_DIR / source).read_text())
    assert _lua(doc) == _lua(shipped)
    gateway_ns = VALUE_SETS[name]["httpRoute"]["gatewayNamespace"]
    assert gateway_ns != NAMESPACE
    # The filter applies to the gateway's proxies, so it lives in the gateway's namespace.
    assert doc["metadata"]["namespace"] == gateway_ns
    if kind == "EnvoyFilter":
        assert doc["spec"]["workloadSelector"]["labels"] == {
            "gateway.networking.k8s.io/gateway-name": "inference-gateway"
        }
    else:
        assert doc["spec"]["targetRef"]["name"] == "inference-gateway"
        assert doc["spec"]["jsonPatches"][0]["name"] == f"{gateway_ns}/inference-gateway/http"
    assert not {o["kind"] for o in objects} & {"GatewayExtension", "TrafficPolicy"}


# --- the seed's commands, as written ----------------------------------------------------------

EPP_IMAGE = "registry.example/team/epp:custom"


@pytest.mark.parametrize(
    ("overrides", "image", "kvgate"),
    [
        # helm ... -f vllm_agg_qwen.yaml --set-string extension.image=$EPP_IMAGE
        ({"extension": {"image": EPP_IMAGE}}, EPP_IMAGE, True),
        # helm ... --set epp.useDynamo=false --set-string extension.image=$EPP_IMAGE
        ({"epp": {"useDynamo": False}, "extension": {"image": EPP_IMAGE}}, EPP_IMAGE, False),
        # helm ... --set epp.useDynamo=false: kvgate's own image, routing round-robin
        ({"epp": {"useDynamo": False}}, "ghcr.io/kvgate/kvgate:0.1.0", True),
        (
            {"epp": {"useDynamo": False}, "extension": {"image": EPP_IMAGE, "flavor": "kvgate"}},
            EPP_IMAGE,
            True,
        ),
    ],
    ids=["kvgate-image", "standard-image", "standard-default", "standard-kvgate-build"],
)
def test_the_picker_runs_the_image_the_command_names(
    overrides: dict[str, dict[str, Any]], image: str, kvgate: bool
) -> None:
    values = _with(_example(), bodyTransformer={"enabled": True}, **overrides)
    objects = render(values)
    container = _epp_container(objects)
    assert container["image"] == image
    assert ("command" in container) == kvgate
    if kvgate:
        assert container["args"][0] == "epp"
    else:
        assert "--pool-group=inference.networking.k8s.io" in container["args"]
    transformer = one(objects, "Deployment", "qwen-body-transformer")
    # The body transformer is kvgate's: the picker's image only when that is kvgate too.
    expected = image if kvgate else "ghcr.io/kvgate/kvgate:0.1.0"
    assert transformer["spec"]["template"]["spec"]["containers"][0]["image"] == expected


async def test_standard_mode_routes_round_robin(tmp_path: Path) -> None:
    """`--set epp.useDynamo=false`: the rendered picker, run with its rendered arguments and
    config (static endpoints instead of the pool), answers requests in turn."""
    objects = render(VALUE_SETS["standard-epp"])
    container = _epp_container(objects)
    config = tmp_path / "epp-config.yaml"
    config.write_text(one(objects, "ConfigMap")["data"]["epp-config.yaml"])
    args = [a.replace("/etc/kvgate/epp-config.yaml", str(config)) for a in container["args"][1:]]
    settings = settings_from_args(build_parser().parse_args(args))
    endpoints = ["127.0.0.1:9", "127.0.0.1:19", "127.0.0.1:29"]
    settings = dataclasses.replace(
        settings, pool_name=None, endpoints=",".join(endpoints), bind="127.0.0.1",
        grpc_port=0, health_port=0, metrics_port=0, secure=False,
    )  # fmt: skip
    async with (
        EppRuntime(settings) as runtime,
        grpc.aio.insecure_channel(f"127.0.0.1:{runtime.bound_ports['grpc']}") as channel,
    ):
        picked = []
        for i in range(6):
            stream = ExtProcStream(channel)
            routed = await stream.route(chat_body(f"turn {i}"))
            await stream.close()
            picked.append(routed.destination)
    assert sorted(picked[:3]) == sorted(endpoints)
    assert picked[3:] == picked[:3]


@pytest.mark.parametrize(
    ("prefix", "name"), [("", "nvext-body-injector"), ("qwen-", "qwen-nvext-body-injector")]
)
def test_the_seeds_verification_commands_find_the_body_transformer(prefix: str, name: str) -> None:
    """`kubectl get trafficpolicy nvext-body-injector` and `kubectl get pods -l
    app=body-transformer`, as the seed writes them (a prefix for several releases)."""
    values = _with(_example(), bodyTransformer={"enabled": True, "namePrefix": prefix})
    objects = render(values)
    assert one(objects, "TrafficPolicy")["metadata"]["name"] == name
    (deployment,) = [
        d
        for d in objects
        if d["kind"] == "Deployment"
        and d["spec"]["template"]["metadata"]["labels"].get("app") == "body-transformer"
    ]
    service = one(objects, "GatewayExtension")["spec"]["extProc"]["grpcService"]["backendRef"]
    assert deployment["metadata"]["name"] == service["name"]


def test_the_route_removes_the_gateway_inputs_and_only_them() -> None:
    """Gateway inputs a client could forge never reach a worker; the picker's outputs are left
    alone (tests/deploy/test_chart_gateway_envoy.py runs this route in a real Envoy)."""
    route = one(_rendered_list("example-kv-routing"), "HTTPRoute")
    (rule,) = route["spec"]["rules"]
    (modifier,) = [f for f in rule["filters"] if f["type"] == "RequestHeaderModifier"]
    assert modifier["requestHeaderModifier"]["remove"] == list(GATEWAY_INPUTS)


def _rendered_list(name: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_rendered(name)))


# --- fail-fast validations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dynamo": {"kvBlockSize": None}}, "dynamo.kvBlockSize is required"),
        ({"dynamo": {"kvBlockSize": 24}}, "dynamo.kvBlockSize must be a power of two"),
        ({"model": {"identifier": ""}}, "model.identifier is required"),
        ({"model": {"shortName": "Qwen_3"}}, "model.shortName"),
        ({"inferencePool": {"selector": {"matchLabels": {}}}}, "inferencePool.selector"),
        ({"inferencePool": {"failureMode": "Open"}}, "inferencePool.failureMode"),
        ({"dynamo": {"replicaSync": {"enabled": True}}}, "dynamo.replicaSync.natsUrl"),
        ({"bodyTransformer": {"enabled": True, "mode": "wasm"}}, "bodyTransformer.mode"),
        ({"epp": {"configFile": "nope.yaml"}}, "epp.configFile"),
        ({"extension": {"flavor": "gaie"}}, "extension.flavor gaie with epp.useDynamo"),
    ],
    ids=[
        "kv-routing-without-block-size",
        "block-size-not-power-of-two",
        "no-model",
        "short-name-not-dns",
        "no-selector",
        "bad-failure-mode",
        "replica-sync-without-nats",
        "unknown-body-mode",
        "unknown-config-file",
        "upstream-picker-cannot-route-on-kv",
    ],
)
def test_bad_values_fail_rendering_naming_the_value(
    overrides: dict[str, dict[str, Any]], message: str
) -> None:
    with pytest.raises(HelmRenderError, match=message.replace(".", r"\.")):
        render(_with(_example(), **overrides))


@pytest.mark.parametrize(
    ("overrides", "shipped"),
    [
        ({}, "epp-config-kvgate.yaml"),
        ({"epp": {"routing": "dynamo"}}, "epp-config-dynamo.yaml"),
        (
            {"epp": {"useDynamo": False}, "dynamo": {"kvBlockSize": None}},
            "epp-config-round-robin.yaml",
        ),
        (
            {"epp": {"useDynamo": False}, "extension": {"image": SEED_STANDARD_IMAGE}},
            "epp-config-random.yaml",
        ),
        ({"epp": {"configFile": "epp-config-kv-approx.yaml"}}, "epp-config-kv-approx.yaml"),
    ],
    ids=[
        "kvgate-default",
        "dynamo-routing",
        "standard-picker-default",
        "upstream-picker-default",
        "config-file",
    ],
)
def test_configmap_holds_a_file_of_deploy_config(
    overrides: dict[str, dict[str, Any]], shipped: str
) -> None:
    objects = render(_with(_example(), **overrides))
    text = one(objects, "ConfigMap")["data"]["epp-config.yaml"]
    assert text.strip() == (CONFIG_DIR / shipped).read_text().strip()


def test_inline_config_wins_and_reaches_the_configmap() -> None:
    text = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
    objects = render(_with(_example(), epp={"config": text}))
    assert one(objects, "ConfigMap")["data"]["epp-config.yaml"].strip() == text.strip()


def test_args_override_replaces_the_arguments() -> None:
    objects = render(_with(_example(), epp={"argsOverride": ["epp", "--endpoints=10.0.0.1:8000"]}))
    assert _epp_container(objects)["args"] == ["epp", "--endpoints=10.0.0.1:8000"]


def test_chart_copied_without_its_linked_files_fails_clearly(tmp_path: Path) -> None:
    """files/ links to deploy/config and deploy/lua-filter; a copy that lost them must not
    quietly render an empty picker config (kvgate would fall back to its built-in one)."""
    copy_dir = tmp_path / "kvgate-gaie"
    shutil.copytree(CHART, copy_dir, symlinks=True)
    shutil.rmtree(copy_dir / "files")
    with pytest.raises(HelmRenderError, match="EndpointPickerConfig is empty"):
        Chart.load(copy_dir).render(_example(), name="kvgate", namespace=NAMESPACE)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epp": {"replicaz": 2}}, "additional properties 'replicaz' not allowed"),
        ({"inferencePool": {"targetPorts": [0]}}, "/inferencePool/targetPorts/0"),
        ({"epp": {"logLevel": "verbose"}}, "/epp/logLevel"),
    ],
    ids=["misspelt-key", "port-zero", "unknown-log-level"],
)
def test_values_schema_refuses_typos_and_bad_types(
    overrides: dict[str, dict[str, Any]], message: str
) -> None:
    with pytest.raises(HelmValuesError, match=re.escape(message)):
        render(_with(_example(), **overrides))
