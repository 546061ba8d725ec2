"""The lifecycle shared by kvgate's background components (watchers, scrapers, subscribers,
replica sync): `start` returns once they run, `aclose` stops them, and ``async with`` does both."""

from __future__ import annotations

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
