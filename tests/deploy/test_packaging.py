"""The CRD install script, the Dockerfile, the image make targets and what the package carries
(no cluster, no Docker)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "scripts" / "install_gaie_crd_kgateway.sh"
DOCKERFILE = REPO / "Dockerfile"


def _run(*argv: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        argv,
        cwd=REPO,
        # Without the calling make's flags (jobserver, -n): these sub-makes stand alone.
        env={
            **{
                k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")
            },
            **(env or {}),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_install_script_parses() -> None:
    _run("bash", "-n", str(SCRIPT))
    assert SCRIPT.read_text().splitlines()[:1] == ["#!/usr/bin/env bash"]
    assert "set -euo pipefail" in SCRIPT.read_text()
    assert os.access(SCRIPT, os.X_OK)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_install_script_passes_shellcheck() -> None:
    _run("shellcheck", str(SCRIPT))


def test_install_script_steps_and_version_overrides() -> None:
    default = _run("bash", str(SCRIPT), env={"DRY_RUN": "1"})
    commands = [line[2:] for line in default.splitlines() if line.startswith("+ ")]
    assert commands[0].endswith("gateway-api/releases/download/v1.4.1/standard-install.yaml")
    assert commands[1].endswith("inference-extension/releases/download/v1.2.1/manifests.yaml")
    assert "--version v2.1.1 kgateway-crds" in commands[2]
    assert commands[3].endswith("--set inferenceExtension.enabled=true")
    assert "refs/tags/v1.2.1/config/manifests/gateway/kgateway/gateway.yaml" in commands[4]
    assert '"value": "kgateway"' in commands[5]
    overridden = _run(
        "bash",
        str(SCRIPT),
        env={
            "DRY_RUN": "1",
            "GATEWAY_API_VERSION": "v1.5.0",
            "IGW_VERSION": "v1.3.0",
            "KGTW_VERSION": "v2.2.0",
        },
    )
    assert "v1.5.0/standard-install.yaml" in overridden
    assert "v1.3.0/manifests.yaml" in overridden
    assert "--version v2.2.0" in overridden
    assert "v1.4.1" not in overridden and "v2.1.1" not in overridden


def _stages(text: str) -> list[list[str]]:
    """Dockerfile instructions (continuations joined), split into build stages."""
    joined = re.sub(r"\\\n\s*", " ", text)
    stages: list[list[str]] = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    build, runtime = _stages(DOCKERFILE.read_text())
    assert all("-slim" in stage[0] for stage in (build, runtime))
    # The install step is the README's: pip installing the project directory.
    assert any(re.search(r"pip install [^&]*\s\.$", i) for i in build), build
    assert not any("envoy" in i.lower() for i in build + runtime)
    users = [i.split()[1] for i in runtime if i.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert runtime[-2:] == ['ENTRYPOINT ["kvgate"]', 'CMD ["epp", "--help"]']


def test_dockerignore_lets_in_what_the_build_copies() -> None:
    build, _ = _stages(DOCKERFILE.read_text())
    patterns = (REPO / ".dockerignore").read_text().splitlines()
    rules = [p.strip() for p in patterns if p.strip() and not p.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for rule in rules:
            negate = rule.startswith("!")
            pattern = rule.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                keep = negate
        return keep

    copied = [
        src for i in build if i.startswith("COPY ") and "--from" not in i for src in i.split()[1:-1]
    ]
    assert copied
    for src in copied:
        assert (REPO / src).exists(), src
        assert included(src), f"{src} is copied but excluded by .dockerignore"
    assert not included("tests/conftest.py")
    assert not included(".venv/bin/python")


def test_the_install_carries_every_epp_config_file() -> None:
    """kvgate/deploy_config links to deploy/config: package data takes the files into a wheel
    (checked by hand with `pip wheel .`; the venv's setuptools is too old to build here), and
    the image's build stage must copy deploy/config for the link to resolve."""
    package = REPO / "src" / "kvgate"
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["kvgate"]
    shipped = sorted((REPO / "deploy" / "config").glob("*"))
    assert shipped
    for path in shipped:
        relative = (package / "deploy_config" / path.name).relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative
    build, _ = _stages(DOCKERFILE.read_text())
    install = next(n for n, i in enumerate(build) if re.search(r"pip install [^&]*\s\.$", i))
    assert "COPY deploy/config ./deploy/config" in build[:install]


def test_make_image_targets() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    info = _run("make", "--no-print-directory", "info")
    assert f"ghcr.io/kvgate/kvgate:{version}" in info
    dry = _run("make", "--no-print-directory", "-n", "image-kind", "IMAGE=reg/kvgate:t")
    assert "docker build -t reg/kvgate:t ." in dry
    assert "kind load docker-image reg/kvgate:t" in dry
    push = _run("make", "--no-print-directory", "-n", "image-push", "DOCKER=podman")
    assert f"podman push ghcr.io/kvgate/kvgate:{version}" in push


def _doc_yaml_blocks() -> list[dict[str, Any]]:
    text = (REPO / "docs" / "kubernetes.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]


def test_documented_model_deployment_matches_the_example_values() -> None:
    """The vLLM Deployment of docs/kubernetes.md is valid and agrees with the example values."""
    (deployment,) = [d for d in _doc_yaml_blocks() if d.get("kind") == "Deployment"]
    kubernetes_validate.validate(deployment, "1.30", strict=True)
    example = yaml.safe_load(
        (REPO / "deploy" / "helm" / "kvgate-gaie" / "examples" / "vllm_agg_qwen.yaml").read_text()
    )
    pod = deployment["spec"]["template"]
    selector = example["inferencePool"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    args = dict(a.split("=", 1) for a in container["args"] if "=" in a)
    assert int(args["--block-size"]) == example["dynamo"]["kvBlockSize"]
    assert int(args["--port"]) == example["inferencePool"]["port"]
    assert args["--model"] == example["model"]["identifier"]
    events = json.loads(args["--kv-events-config"])
    assert events["enable_kv_cache_events"] is True
    assert events["endpoint"] == f"tcp://*:{example['epp']['kvEventsPort']}"
