from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

from tests.utils import qwen3_tokenizer_dir

# No per-example deadline anywhere: the machines are shared and noisy, so a deadline fails
# correct code at random; speed is measured in benchmarks/, not asserted in tests.
settings.register_profile("kvgate", deadline=None)
settings.load_profile("kvgate")


@pytest.fixture(scope="session")
def qwen3_dir() -> Path:
    return qwen3_tokenizer_dir()
