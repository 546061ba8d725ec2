from __future__ import annotations

from pathlib import Path

import pytest

from tests.utils import qwen3_tokenizer_dir


@pytest.fixture(scope="session")
def qwen3_dir() -> Path:
    return qwen3_tokenizer_dir()
