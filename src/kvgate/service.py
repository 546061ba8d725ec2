"""The lifecycle shared by kvgate's background components (watchers, scrapers, subscribers,
replica sync): `start` returns once they run, `aclose` stops them, and ``async with`` does both."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Self


class Service(ABC):
    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class StackedService(Service):
    """A service made of parts that register their own shutdown on ``self._stack`` as they start
    (servers, watchers, subscribers): `aclose` stops them newest first, and a start that fails
    half-way stops what had started before re-raising."""

    def __init__(self) -> None:
        self._stack = contextlib.AsyncExitStack()

    @abstractmethod
    async def _start(self) -> None: ...

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise

    async def aclose(self) -> None:
        await self._stack.aclose()
