"""`kvgate up --backend dynamo`: the local gateway's backend is a Dynamo frontend and mocker
workers (`kvgate.dynamo.processes`), and the EPP learns the workers from Dynamo's file discovery
store and sends every request to the frontend, naming the worker it picked.

Router mode of the frontend, and what the gateway's failure mode then means:

- ``direct``: the frontend only forwards to the worker the request names
  (``x-worker-instance-id`` / ``nvext``) and answers 400 without one. With ``FailClose`` that is
  the cleanest split of work (one router: kvgate). With ``FailOpen`` a request that passes while
  the EPP is down names no worker and gets the frontend's 400: fail-open does not serve.
- ``kv`` (the default with ``FailOpen``): a picked worker is still honoured; a request that
  names none (the EPP down, fail-open) is placed by Dynamo's own KV router, so fail-open serves
  with KV-aware routing. The frontend then also follows KV events and load itself.
- ``round-robin``: as ``kv``, with round-robin placement for the unnamed requests.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from kvgate.dynamo.processes import DynamoFleet, FleetSettings, Frontend, RouterMode
from kvgate.gateway.bootstrap import FailureMode
from kvgate.gateway.supervisor import Supervisor

__all__ = ["DynamoBackend", "default_router_mode", "print_served", "start_dynamo_backend"]


def default_router_mode(failure_mode: FailureMode) -> RouterMode:
    """``kv`` when requests may pass without the EPP (they must still be placed), else
    ``direct``."""
    return "kv" if failure_mode == "FailOpen" else "direct"


@dataclass
class DynamoBackend:
    fleet: DynamoFleet
    frontend: Frontend
    """The frontend the gateway sends requests to."""

    def epp_args(self) -> list[str]:
        """The EPP's endpoint source: Dynamo's file store, requests to the frontend."""
        return [
            "--dynamo-discovery", "file", "--dynamo-store", str(self.fleet.store),
            "--dynamo-frontend", self.frontend.address,
        ]  # fmt: skip

    def workers(self) -> list[str]:
        return [w.address for w in self.fleet.workers if w.child.alive()]

    def fail_open_hosts(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", self.frontend.port)]


def start_dynamo_backend(
    supervisor: Supervisor,
    run_dir: Path,
    *,
    workers: int,
    prefill_workers: int,
    router_mode: RouterMode,
    block_size: int,
    num_gpu_blocks: int | None,
    speedup: float,
    model: str,
    tokenizer: str | None,
    fleet: DynamoFleet | None = None,
) -> DynamoBackend:
    """Start a fleet of ``workers`` mockers (``prefill_workers`` of them prefill, the rest
    decode) behind one frontend in ``router_mode``; or use ``fleet`` if given (it must run a
    frontend in that mode)."""
    if fleet is None:
        settings = FleetSettings(
            workers=workers - prefill_workers,
            prefill_workers=prefill_workers,
            router_modes=(router_mode,),
            model=model,
            block_size=block_size,
            speedup=speedup,
        )
        if num_gpu_blocks is not None:
            settings = replace(settings, num_gpu_blocks=num_gpu_blocks)
        fleet = DynamoFleet(
            settings,
            run_dir,
            supervisor=supervisor,
            tokenizer_dir=Path(tokenizer) if tokenizer and Path(tokenizer).is_dir() else None,
        ).start()
    return DynamoBackend(fleet, fleet.frontend(router_mode))


def print_served(fleet: DynamoFleet, before: dict[int, int]) -> None:
    """Requests per worker since ``before``, from the workers' own counters."""
    after = fleet.requests_by_worker()
    print(f"  {'Dynamo worker (its own request counter)':<44}{'requests':>9}")
    for worker in fleet.workers:
        if worker.instance_id in after:
            served = after[worker.instance_id] - before.get(worker.instance_id, 0)
            label = f"{worker.name} #{worker.instance_id}"
            print(f"  {label:<44}{served:>9}")
