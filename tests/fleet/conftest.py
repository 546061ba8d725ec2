from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from tests.fleet.fake_apiserver import FakeApiServer


@pytest.fixture
async def stack() -> AsyncIterator[contextlib.AsyncExitStack]:
    async with contextlib.AsyncExitStack() as stack:
        yield stack


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer()
    await server.start()
    try:
        yield server
    finally:
        await server.aclose()
