"""How the metrics scraper fetches a page: one small interface, over aiohttp in production and
from a function in tests (`MockTransport`)."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import aiohttp
from yarl import URL

from kvgate.fleet.prometheus_text import MetricsParseError

__all__ = ["AiohttpTransport", "MetricsTransport", "MockTransport", "TransportError"]


class TransportError(OSError):
    """The page could not be fetched (connection refused or lost, timeout, broken answer)."""


class MetricsTransport(Protocol):
    async def get(self, url: URL) -> str:
        """The body of a 200 answer to ``GET url``, as text.

        Raises `OSError` (`TransportError`, `TimeoutError`) when no answer came in time and
        `ValueError` for an unusable one: `MetricsParseError` for another status,
        `UnicodeDecodeError` for a body that is not UTF-8.
        """
        ...

    async def aclose(self) -> None: ...


_HEADERS: Final = {"Accept": "text/plain;version=0.0.4", "Accept-Encoding": "identity"}


class AiohttpTransport:
    """One `aiohttp.ClientSession` with keep-alive for every endpoint, opened on first use.

    The body is asked uncompressed: gzip would make the engine compress every answer to save
    bandwidth that does not matter inside a cluster.
    """

    def __init__(self, *, timeout_s: float, max_connections: int) -> None:
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def get(self, url: URL) -> str:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                headers=_HEADERS,
                # Engines set no cookies worth keeping; the dummy jar skips cookie handling.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    raise MetricsParseError(f"HTTP {response.status} from {url.path}")
                body = await response.read()
        except aiohttp.ClientError as err:
            raise TransportError(str(err) or type(err).__name__) from err
        return body.decode("utf-8")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class MockTransport:
    """Answers every request with ``handler(url)`` (a body, or an awaitable of one); what the
    handler raises is the scrape's failure. For tests that need no sockets."""

    def __init__(self, handler: Callable[[URL], str | Awaitable[str]]) -> None:
        self.handler = handler
        self.requests: list[URL] = []
        self.closed = False

    async def get(self, url: URL) -> str:
        self.requests.append(url)
        body = self.handler(url)
        return await body if inspect.isawaitable(body) else body

    async def aclose(self) -> None:
        self.closed = True
