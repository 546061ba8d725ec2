"""Finding the external programs kvgate runs (Envoy, nats-server): an explicit path in an
environment variable wins and must be right; otherwise the first executable candidate."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path


def find_executable(
    env_var: str,
    name: str,
    *,
    before_path: Sequence[Path],
    after_path: Sequence[Path],
    missing: type[FileNotFoundError],
    hint: str,
) -> Path:
    """``$env_var``, else ``before_path``, then ``name`` on PATH, then ``after_path``; raises
    ``missing`` (with ``hint``) when none is an executable file."""
    explicit = os.environ.get(env_var)
    if explicit:
        path = Path(explicit)
        if _runnable(path):
            return path
        raise missing(f"{env_var}={explicit} is not an executable file")
    on_path = shutil.which(name)
    candidates = [*before_path, *([Path(on_path)] if on_path else []), *after_path]
    for path in candidates:
        if _runnable(path):
            return path
    raise missing(hint)


def _runnable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)
