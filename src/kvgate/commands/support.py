"""What every `kvgate` command does the same way: its log level, how it reports an error, and how
a server command runs until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from kvgate.errors import InvalidInput, KvgateError

Settings = TypeVar("Settings")

USAGE_ERROR = 2
"""Exit code for bad flags, configuration or input: running again unchanged would fail again."""
RUNTIME_ERROR = 1
"""Exit code for a failure while running (a port in use, a process that died)."""


class UsageError(InvalidInput):
    """Bad flags or input; `main` reports it with `fail` and exits with `USAGE_ERROR`."""


def fail(prog: str, error: object, code: int) -> int:
    """Print ``<prog>: <error>`` (prog is ``kvgate <command>``) on stderr and return ``code``."""
    print(f"{prog}: {error}", file=sys.stderr)
    return code


def add_log_level(parser: argparse.ArgumentParser) -> None:
    levels = ["debug", "info", "warning", "error"]
    parser.add_argument("--log-level", default="info", choices=levels)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def run_server(
    prog: str,
    settings: Callable[[], Settings],
    serve: Callable[[Settings, asyncio.Event], Coroutine[Any, Any, None]],
    *,
    runtime_errors: tuple[type[Exception], ...] = (),
) -> int:
    """Build the settings, then ``serve(settings, stop)`` until SIGINT/SIGTERM sets ``stop``. A
    `KvgateError` raised while building or serving is printed by `fail` with its exit code, as is
    one of ``runtime_errors`` (a library's error for a port in use, say) with `RUNTIME_ERROR`;
    anything else is a bug and keeps its traceback."""
    try:
        built = settings()
        run_until_signalled(lambda stop: serve(built, stop))
    except KvgateError as err:
        return fail(prog, err, err.exit_code)
    except runtime_errors as err:
        return fail(prog, err, RUNTIME_ERROR)
    return 0


def run_until_signalled(serve: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run ``serve(stop)`` on uvloop when it is installed; ``stop`` is set by SIGINT/SIGTERM so
    the server can shut down in order instead of being killed mid-request."""

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
