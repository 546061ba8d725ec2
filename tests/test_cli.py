"""The `kvgate` command table: every entry leads to a command that parses its own flags."""

from __future__ import annotations

import pytest

from kvgate.cli import COMMANDS, main


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_answers_help_under_its_own_name(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: kvgate {name} ")


def test_usage_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(f"\n  {name} " in out for name in COMMANDS), out


def test_unknown_command_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["epq"]) == 2
    assert "unknown command 'epq' (did you mean 'epp'?)" in capsys.readouterr().err
