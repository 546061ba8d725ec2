"""`kvgate` command line: a static table of subcommands, each imported only when used."""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Callable
from typing import cast

# name -> (module exposing main(argv) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("kvgate.commands.demo", "local gateway + shared-prefix load, KV-aware vs round-robin"),
    "up": ("kvgate.commands.up", "run Envoy + EPP + engines locally until Ctrl-C"),
    "tokenize": ("kvgate.commands.tokenize", "token ids and block hashes of one OpenAI request"),
    "microbench": ("kvgate.commands.microbench", "time the routing core against the reference"),
    "epp": ("kvgate.commands.epp", "the endpoint picker (Envoy ext_proc, GAIE protocol)"),
    "body-transformer": (
        "kvgate.commands.body_transformer",
        "ext_proc service turning Dynamo routing headers into the nvext body field",
    ),
    "sim": ("kvgate.commands.sim", "run simulated vLLM-compatible engines"),
    "simulate": (
        "kvgate.commands.simulate",
        "trace replay in virtual time: compare routing policies",
    ),
    "bench": ("kvgate.commands.bench", "trace replay against an OpenAI endpoint (live load)"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: kvgate <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`kvgate <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if args[0] == "--version":
        from kvgate import __version__

        print(f"kvgate {__version__}")
        return 0
    name, rest = args[0], args[1:]
    entry = COMMANDS.get(name)
    if entry is None:
        hint = difflib.get_close_matches(name, COMMANDS, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        print(f"kvgate: unknown command {name!r}{suggestion}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(entry[0])
    command = cast(Callable[[list[str]], int], module.main)
    return command(rest)


if __name__ == "__main__":
    sys.exit(main())
