"""Running a kvgate server process until SIGINT or SIGTERM, on uvloop when it is installed."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any


def run_until_signalled(serve: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run ``serve(stop)``; ``stop`` is set by SIGINT/SIGTERM so the server can shut down in
    order instead of being killed mid-request."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
        return
    uvloop.run(main())
