from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvgate.dynamo.processes import DynamoFleet, FleetSettings, dynamo_installed


def require_dynamo() -> None:
    if not dynamo_installed():
        pytest.skip("ai-dynamo is not installed (`make install` installs it)")


@pytest.fixture(scope="session")
def agg_fleet(qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DynamoFleet]:
    """Three aggregated mocker workers behind two frontends (direct and kv router modes)."""
    require_dynamo()
    settings = FleetSettings(workers=3, router_modes=("direct", "kv"), speedup=10.0)
    with DynamoFleet(
        settings, tmp_path_factory.mktemp("dynamo-agg"), tokenizer_dir=qwen3_dir
    ) as fleet:
        yield fleet
