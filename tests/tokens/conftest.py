"""Session fixtures for the tokens tests: each tokenizer is loaded once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from kvgate.tokens import ModelTokenizer

# transformers and huggingface_hub read this when first imported: never reach the hub.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def qwen3(qwen3_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.load(qwen3_dir)


@pytest.fixture(scope="session")
def hf_qwen3(qwen3_dir: Path) -> Any:
    """transformers' tokenizer for the same files: the independent reference."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_dir, local_files_only=True)
