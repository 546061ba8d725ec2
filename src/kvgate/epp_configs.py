"""The EndpointPickerConfig files kvgate ships, by file name.

Their one home is the repository's ``deploy/config/``. ``kvgate/deploy_config`` is a link to that
directory, so in a checkout they are read from it and a wheel (or the image built from one)
carries them as package data; the Helm chart links to the same directory as ``files/config``.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Final

KVGATE: Final = "epp-config-kvgate.yaml"
"""kvgate's routing (predicted latency): `kvgate up`'s default."""
DYNAMO: Final = "epp-config-dynamo.yaml"
"""The seed's KV-aware routing, the reference router's cost function (`dyn-kv`)."""
DISAGGREGATED_KVGATE: Final = "epp-config-disaggregated-kvgate.yaml"
"""Prefill/decode disaggregation decided and placed by predicted latency."""
DISAGGREGATED_KVGATE_PAIRED: Final = "epp-config-disaggregated-kvgate-paired.yaml"
"""Prefill/decode placed by predicted latency, every request paired (Dynamo's direct mode)."""
DISAGGREGATED: Final = "epp-config-disaggregated.yaml"
"""Prefill/decode disaggregation: `kvgate up` with prefill workers."""
ROUND_ROBIN: Final = "epp-config-round-robin.yaml"
"""The standard EPP fallback: `kvgate up --mode standard`."""


def config_dir() -> Traversable:
    return files("kvgate") / "deploy_config"


def shipped_config(filename: str) -> str:
    """The text of one file of ``deploy/config``."""
    path = config_dir() / filename
    if not path.is_file():
        known = sorted(p.name for p in config_dir().iterdir() if p.name.endswith(".yaml"))
        raise FileNotFoundError(
            f"{filename} is not one of kvgate's EndpointPickerConfig files ({', '.join(known)})"
        )
    return path.read_text(encoding="utf-8")
