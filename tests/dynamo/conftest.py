from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvgate.dynamo.processes import DynamoFleet, FleetSettings
from tests.dynamo.helpers import require_dynamo


@pytest.fixture(scope="session")
def agg_fleet(qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DynamoFleet]:
    """Three aggregated mocker workers behind one frontend per router mode (direct, kv,
    round-robin)."""
    require_dynamo()
    settings = FleetSettings(workers=3, router_modes=("direct", "kv", "round-robin"), speedup=10.0)
    with DynamoFleet(
        settings, tmp_path_factory.mktemp("dynamo-agg"), tokenizer_dir=qwen3_dir
    ) as fleet:
        yield fleet
