"""Watching --endpoints-file: changes applied, broken or vanished files keep the last good fleet."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from kvgate.fleet.endpoint import Endpoint, EndpointSet
from kvgate.fleet.sources import EndpointsFileWatcher, EndpointSpecError
from tests.fleet.utils import Changes, wait_until

POLL = 0.02
NEVER = 3600.0  # a poll interval for tests that drive `check` themselves
LOGGER = "kvgate.fleet.sources"


def addresses(endpoints: EndpointSet) -> list[str]:
    return sorted(e.address for e in endpoints)


def errors(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno >= logging.ERROR and text in r.getMessage()
    ]


@pytest.fixture(autouse=True)
def info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)


@pytest.fixture
async def watch(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., EndpointsFileWatcher]]:
    watchers: list[EndpointsFileWatcher] = []

    def make(
        endpoints: EndpointSet, name: str = "eps.yaml", poll: float = POLL
    ) -> EndpointsFileWatcher:
        watcher = EndpointsFileWatcher(tmp_path / name, endpoints, poll_interval_s=poll)
        watchers.append(watcher)
        return watcher

    yield make
    for watcher in watchers:
        await watcher.aclose()


async def test_an_absent_file_at_start_gives_zero_endpoints_then_follows_the_file(
    tmp_path: Path, watch: Callable[..., EndpointsFileWatcher], caplog: pytest.LogCaptureFixture
) -> None:
    endpoints = EndpointSet()
    watcher = watch(endpoints)
    await watcher.start()
    assert len(endpoints) == 0
    assert endpoints.known  # the EPP is ready with zero endpoints
    assert any("does not exist" in r.getMessage() for r in caplog.records if r.name == LOGGER)

    (tmp_path / "eps.yaml").write_text("- 10.0.0.1:8000\n")
    await wait_until(lambda: addresses(endpoints) == ["10.0.0.1:8000"])


async def test_changes_are_applied_as_joins_and_leaves(
    tmp_path: Path, watch: Callable[..., EndpointsFileWatcher]
) -> None:
    path = tmp_path / "eps.yaml"
    path.write_text("- 10.0.0.1:8000\n- 10.0.0.2:8000\n")
    endpoints = EndpointSet()
    changes = Changes(endpoints)
    async with watch(endpoints):
        assert addresses(endpoints) == ["10.0.0.1:8000", "10.0.0.2:8000"]
        first = endpoints.get("10.0.0.1:8000")

        path.write_text("- 10.0.0.1:8000\n- 10.0.0.3:8000\n")
        await wait_until(lambda: addresses(endpoints) == ["10.0.0.1:8000", "10.0.0.3:8000"])
        assert changes.calls[-1] == (["10.0.0.3:8000"], ["10.0.0.2:8000"])
        assert endpoints.get("10.0.0.1:8000") is first  # unchanged endpoints keep their state

        path.write_text("[]\n")
        await wait_until(lambda: len(endpoints) == 0)


async def test_a_broken_file_keeps_the_last_good_fleet_and_is_logged_once(
    tmp_path: Path, watch: Callable[..., EndpointsFileWatcher], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "eps.yaml"
    path.write_text("- 10.0.0.1:8000\n")
    endpoints = EndpointSet()
    async with watch(endpoints) as watcher:
        path.write_text("- 10.0.0.1:8000\n- {adress: 10.0.0.2:8000}\n")
        await wait_until(lambda: len(errors(caplog, "unknown key 'adress'")) == 1)
        # Many polls later (the file is recent, so it is re-read on each): still one line.
        await asyncio.sleep(15 * POLL)
        assert len(errors(caplog, "unknown key 'adress'")) == 1
        assert "entry 1" in errors(caplog, "adress")[0]
        assert "keeping the last 1 endpoints" in errors(caplog, "adress")[0]
        assert addresses(endpoints) == ["10.0.0.1:8000"]

        path.write_text("- 10.0.0.1:8000\n- [oops\n")  # another error: logged too
        await wait_until(lambda: len(errors(caplog, "while parsing")) == 1)

        path.write_text("- 10.0.0.1:8000\n- 10.0.0.2:8000\n")
        await wait_until(lambda: len(endpoints) == 2)
        assert any("usable again" in r.getMessage() for r in caplog.records)
        assert watcher.applied == 2


async def test_a_deleted_file_keeps_the_fleet_until_it_comes_back(
    tmp_path: Path, watch: Callable[..., EndpointsFileWatcher], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "eps.yaml"
    path.write_text("- 10.0.0.1:8000\n")
    endpoints = EndpointSet()
    async with watch(endpoints):
        path.unlink()
        await wait_until(lambda: len(errors(caplog, "has disappeared")) == 1)
        await asyncio.sleep(10 * POLL)
        assert len(errors(caplog, "has disappeared")) == 1
        assert addresses(endpoints) == ["10.0.0.1:8000"]

        path.write_text("- 10.0.0.9:8000\n")
        await wait_until(lambda: addresses(endpoints) == ["10.0.0.9:8000"])


async def test_an_atomic_rename_is_picked_up(
    tmp_path: Path, watch: Callable[..., EndpointsFileWatcher]
) -> None:
    path = tmp_path / "eps.yaml"
    path.write_text("- 10.0.0.1:8000\n")
    endpoints = EndpointSet()
    async with watch(endpoints):
        staged = tmp_path / "eps.yaml.tmp"
        staged.write_text("- 10.0.0.2:8000\n")
        os.replace(staged, path)
        await wait_until(lambda: addresses(endpoints) == ["10.0.0.2:8000"])


async def test_an_invalid_file_at_start_is_an_error(
    tmp_path: Path, watch: Callable[..., EndpointsFileWatcher]
) -> None:
    (tmp_path / "eps.yaml").write_text("- 10.0.0.1\n")
    endpoints = EndpointSet()
    with pytest.raises(EndpointSpecError, match="entry 0: expected ip:port"):
        await watch(endpoints).start()
    assert not endpoints.known


async def test_a_change_is_applied_only_once_seen_twice(
    tmp_path: Path, watch: Callable[..., EndpointsFileWatcher]
) -> None:
    path = tmp_path / "eps.yaml"
    path.write_text("- 10.0.0.1:8000\n")
    endpoints = EndpointSet()
    async with watch(endpoints, poll=NEVER) as watcher:
        path.write_text("- 10.0.0.1:8000\n")  # the writer is half way: a shorter list
        assert not watcher.check()
        path.write_text("- 10.0.0.1:8000\n- 10.0.0.2:8000\n")  # done
        assert not watcher.check()  # changed again since the last poll: wait
        assert watcher.check()
        assert len(endpoints) == 2
        assert not watcher.check()


async def test_rewriting_the_same_content_changes_nothing(
    tmp_path: Path, watch: Callable[..., EndpointsFileWatcher]
) -> None:
    path = tmp_path / "eps.yaml"
    path.write_text("- 10.0.0.1:8000\n")
    endpoints = EndpointSet()
    changes = Changes(endpoints)
    async with watch(endpoints, poll=NEVER) as watcher:
        calls = len(changes.calls)
        path.write_text("- 10.0.0.1:8000\n")
        os.utime(path)
        for _ in range(3):
            assert not watcher.check()
        assert len(changes.calls) == calls
        assert watcher.applied == 1


async def test_a_same_size_rewrite_within_the_mtime_granularity_is_seen(
    tmp_path: Path, watch: Callable[..., EndpointsFileWatcher]
) -> None:
    path = tmp_path / "eps.yaml"
    path.write_text("- 10.0.0.1:8000\n")
    endpoints = EndpointSet()
    async with watch(endpoints, poll=NEVER) as watcher:
        before = path.stat()
        path.write_text("- 10.0.0.2:8000\n")  # same size
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # same (recent) mtime
        assert path.stat().st_size == before.st_size
        assert not watcher.check()
        assert watcher.check()
        assert addresses(endpoints) == ["10.0.0.2:8000"]


async def test_a_failing_listener_does_not_stop_the_watcher(
    tmp_path: Path, watch: Callable[..., EndpointsFileWatcher], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "eps.yaml"
    path.write_text("- 10.0.0.1:8000\n")
    endpoints = EndpointSet()
    failures = [RuntimeError("listener bug")]

    def flaky(_joined: list[Endpoint], _left: list[Endpoint]) -> None:
        if failures:
            raise failures.pop()

    async with watch(endpoints):
        endpoints.subscribe(flaky)
        path.write_text("- 10.0.0.2:8000\n")
        await wait_until(lambda: not failures)
        path.write_text("- 10.0.0.3:8000\n")
        await wait_until(lambda: addresses(endpoints) == ["10.0.0.3:8000"])
    assert any("applying endpoints file" in r.getMessage() for r in caplog.records)


async def test_aclose_is_idempotent_and_stops_polling(
    tmp_path: Path, watch: Callable[..., EndpointsFileWatcher]
) -> None:
    path = tmp_path / "eps.yaml"
    path.write_text("- 10.0.0.1:8000\n")
    endpoints = EndpointSet()
    watcher = watch(endpoints)
    await watcher.start()
    await watcher.aclose()
    await watcher.aclose()
    path.write_text("- 10.0.0.2:8000\n")
    await asyncio.sleep(5 * POLL)
    assert addresses(endpoints) == ["10.0.0.1:8000"]


def test_poll_interval_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="poll_interval_s must be positive"):
        EndpointsFileWatcher(tmp_path / "x", EndpointSet(), poll_interval_s=0)
