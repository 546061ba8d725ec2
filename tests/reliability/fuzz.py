"""The fuzz campaigns behind `make fuzz`: each target run for a number of cases, bounded in time.

    python -m tests.reliability.fuzz [--engine atheris|hypothesis|random] [--cases 100000]
        [--max-seconds 900] [--seed 0] [--json FILE] [TARGET ...]

Targets (see each module): ``extproc`` (ext_proc message sequences against the real EPP),
``epp-config`` (mutated EndpointPickerConfig documents), ``kv-events`` (KV-event streams decoded
and applied to the index), ``kv-events-raw`` (bytes straight into the decoder: libFuzzer mutates
real msgpack), ``kv-events-socket`` (KV-event streams through a real subscriber over TCP).

Engines: ``atheris`` (libFuzzer, coverage-guided over kvgate's Python code; each target in a
child process, since libFuzzer ends the process when done), ``hypothesis`` (``st.binary()``;
shrinks a failure), ``random`` (a seeded byte stream). Every case checks its own properties and
that nothing was left behind; the first failure ends a target's campaign. Prints one line per
target (cases, seconds, cases/s, outcome counts) and writes them all as JSON with ``--json``.
Artifacts (libFuzzer's corpus and crash files) go to ``--workdir`` (``.kvgate/fuzz``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

ALL_TARGETS = ("extproc", "epp-config", "kv-events", "kv-events-raw", "kv-events-socket")
MAX_LEN = {"extproc": 6000, "epp-config": 600, "kv-events": 4000, "kv-events-raw": 4000,
           "kv-events-socket": 4000}  # fmt: skip
REPO = Path(__file__).resolve().parents[2]


class Target(Protocol):
    name: str
    outcomes: dict[str, int]

    def __call__(self, data: bytes) -> None: ...


@contextlib.contextmanager
def open_target(name: str, workdir: Path) -> Iterator[Target]:
    """The target ``name``, started (imports are here so that atheris can instrument them)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tests.utils import qwen3_tokenizer_dir

    if name == "extproc":
        from tests.reliability.extproc_fuzz import ExtProcTarget

        with ExtProcTarget(qwen3_tokenizer_dir(), workdir) as target:
            yield target
    elif name == "epp-config":
        from tests.reliability.config_fuzz import ConfigTarget

        yield ConfigTarget()
    elif name == "kv-events":
        from tests.reliability.events_fuzz import DecodeTarget

        yield DecodeTarget()
    elif name == "kv-events-raw":
        from tests.reliability.events_fuzz import RawDecodeTarget

        yield RawDecodeTarget()
    elif name == "kv-events-socket":
        from tests.reliability.events_fuzz import SocketTarget

        with SocketTarget() as socket_target:
            yield socket_target
    else:
        raise SystemExit(f"unknown target {name!r} (known: {', '.join(ALL_TARGETS)})")


def seed_inputs(name: str, rng: random.Random, count: int = 64) -> list[bytes]:
    """Starting inputs: random bytes, and for the raw decoder real payloads of both layouts."""
    inputs = [rng.randbytes(rng.randrange(1, MAX_LEN[name])) for _ in range(count)]
    if name == "kv-events-raw":
        from tests.reliability.events_fuzz import sample_payloads

        inputs += sample_payloads()
    return inputs


# -- engines ----------------------------------------------------------------------------------


def run_random(target: Target, cases: int, max_seconds: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    inputs = seed_inputs(target.name, rng)
    started = time.monotonic()
    done = 0
    failure = None
    while done < cases and time.monotonic() - started < max_seconds:
        data = (
            inputs[done]
            if done < len(inputs)
            else rng.randbytes(rng.randrange(0, MAX_LEN[target.name]))
        )
        done += 1
        try:
            target(data)
        except Exception as err:
            failure = f"{type(err).__name__}: {err}\ninput (hex): {data.hex()}"
            break
    return _result(target, done, time.monotonic() - started, failure)


def run_hypothesis(target: Target, cases: int, max_seconds: float, seed: int) -> dict[str, Any]:
    from hypothesis import strategies as st

    from tests.reliability.fuzzing import campaign

    report = campaign(
        target.name,
        st.binary(max_size=MAX_LEN[target.name]),
        target,
        cases=cases,
        max_seconds=max_seconds,
        first_seed=seed,
    )
    return _result(target, report.cases, report.seconds, report.failure)


def _result(target: Target, cases: int, seconds: float, failure: str | None) -> dict[str, Any]:
    return {
        "target": target.name,
        "cases": cases,
        "seconds": round(seconds, 1),
        "cases_per_s": round(cases / seconds, 1) if seconds else 0.0,
        "failure": failure,
        "outcomes": dict(target.outcomes),
    }


def run_atheris_child(name: str, cases: int, max_seconds: float, seed: int, workdir: Path) -> None:
    """In the child process: instrument kvgate, then let libFuzzer drive the target. libFuzzer
    exits the process when done; the outcome counts go to a stats file as the run goes."""
    import atheris

    stats_file = workdir / f"{name}.stats.json"
    with atheris.instrument_imports(include=["kvgate"]):
        import kvgate.events.decode
        import kvgate.extproc.epp
        import kvgate.index.prefix_index
        import kvgate.scheduling.picker_config
        import kvgate.scheduling.registry
        import kvgate.tokens.tokenizer  # noqa: F401
    stack = contextlib.ExitStack()
    target = stack.enter_context(open_target(name, workdir))
    corpus = workdir / f"corpus-{name}"
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        for i, data in enumerate(seed_inputs(name, random.Random(seed))):
            (corpus / f"seed-{i:03d}").write_bytes(data)
    done = 0

    def one(data: bytes) -> None:
        nonlocal done
        done += 1
        target(data)
        if done % 1000 == 0:
            stats_file.write_text(json.dumps({"cases": done, "outcomes": target.outcomes}))

    atheris.Setup(
        [sys.argv[0], f"-runs={cases}", f"-max_total_time={int(max_seconds)}",
         f"-max_len={MAX_LEN[name]}", "-len_control=0", f"-seed={seed + 1}",
         "-print_final_stats=1", f"-artifact_prefix={workdir}/", str(corpus)],
        one,
    )  # fmt: skip
    atheris.Fuzz()


def run_atheris(
    name: str, cases: int, max_seconds: float, seed: int, workdir: Path
) -> dict[str, Any]:
    command = [sys.executable, "-m", "tests.reliability.fuzz", "--child", "--engine", "atheris",
               "--cases", str(cases), "--max-seconds", str(max_seconds), "--seed", str(seed),
               "--workdir", str(workdir), name]  # fmt: skip
    log = workdir / f"{name}.atheris.log"
    started = time.monotonic()
    with log.open("wb") as out:
        # Initialising the target and the instrumented imports take a while: allow for them.
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                              timeout=max_seconds + 600, check=False)  # fmt: skip
    seconds = time.monotonic() - started
    text = log.read_text(errors="replace")
    executed = re.search(r"stat::number_of_executed_units: (\d+)", text)
    rate = re.search(r"stat::average_exec_per_sec:\s+(\d+)", text)
    stats_file = workdir / f"{name}.stats.json"
    outcomes = json.loads(stats_file.read_text())["outcomes"] if stats_file.exists() else {}
    failure = None
    if done.returncode != 0:
        failure = f"exit code {done.returncode}; see {log}\n" + "\n".join(text.splitlines()[-40:])
    return {
        "target": name,
        "cases": int(executed.group(1)) if executed else 0,
        "seconds": round(seconds, 1),
        # libFuzzer rounds its rate down to whole seconds of run time (0 for runs under 1 s).
        "cases_per_s": float(rate.group(1)) if rate and int(rate.group(1)) else 0.0,
        "failure": failure,
        "outcomes": outcomes,
        "engine_log": str(log),
    }


ENGINES: dict[str, Callable[[Target, int, float, int], dict[str, Any]]] = {
    "random": run_random,
    "hypothesis": run_hypothesis,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", default=list(ALL_TARGETS))
    parser.add_argument("--engine", choices=["atheris", "hypothesis", "random"], default="atheris")
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workdir", type=Path, default=REPO / ".kvgate" / "fuzz")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Rejections, refused events and malformed batches are the point here: keep the log quiet.
    logging.basicConfig(level=logging.CRITICAL)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        run_atheris_child(args.targets[0], args.cases, args.max_seconds, args.seed, args.workdir)
        return 0
    engine = args.engine
    if engine == "atheris":
        try:
            import atheris  # noqa: F401
        except ImportError:
            print("atheris is not installed (pip install atheris); using hypothesis instead")
            engine = "hypothesis"
    results = []
    for name in args.targets:
        if engine == "atheris":
            result = run_atheris(name, args.cases, args.max_seconds, args.seed, args.workdir)
        else:
            with tempfile.TemporaryDirectory() as tmp, open_target(name, Path(tmp)) as target:
                result = ENGINES[engine](target, args.cases, args.max_seconds, args.seed)
        result["engine"] = engine
        results.append(result)
        verdict = "FAILED" if result["failure"] else "ok"
        print(
            f"{name}: {result['cases']:,} cases in {result['seconds']:.0f} s "
            f"({result['cases_per_s']:,.0f}/s), {engine}: {verdict} {result['outcomes']}",
            flush=True,
        )
        if result["failure"]:
            print(result["failure"], flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any(r["failure"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
