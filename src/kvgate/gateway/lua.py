"""The nvext Lua filter, taken from the shipped Istio manifest so `kvgate up --body-transformer
lua` runs exactly the code users deploy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MANIFEST = Path(__file__).resolve().parents[3] / "deploy" / "lua-filter" / "istio-envoyfilter.yaml"


def _find_inline(node: Any) -> str | None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "inline_string" and isinstance(value, str):
                return value
            found = _find_inline(value)
            if found is not None:
                return found
    elif isinstance(node, list):
        for item in node:
            found = _find_inline(item)
            if found is not None:
                return found
    return None


def load_lua(manifest: Path = MANIFEST) -> str:
    for document in yaml.safe_load_all(manifest.read_text(encoding="utf-8")):
        code = _find_inline(document)
        if code is not None:
            return code
    raise FileNotFoundError(f"no inline Lua code in {manifest}")
