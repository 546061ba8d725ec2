from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq.asyncio


@pytest.fixture
def zmq_ctx() -> Iterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)
