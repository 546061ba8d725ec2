"""What `kvgate up` prints while it runs: requests routed per worker and per EPP replica, read
from the replicas' Prometheus and /healthz endpoints."""

from __future__ import annotations

import json
import re
import urllib.request

from kvgate.gateway.local import RunningGateway

_DECISION = re.compile(r'^kvgate_decisions_total\{endpoint="([^"]+)"\} ([0-9.e+]+)$', re.M)
_INDEX = re.compile(r"^inference_extension_prefix_indexer_size ([0-9.e+]+)$", re.M)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return str(resp.read().decode())


def status_line(running: RunningGateway) -> str:
    """Decisions per worker (summed over the EPP replicas) and, with several replicas, per
    replica, with each one's replica-sync state and peer count."""
    urls = running.epp_metrics_urls or [running.epp_metrics_url]
    decisions: dict[str, int] = {}
    per_replica: list[str] = []
    blocks = 0
    for i, url in enumerate(urls):
        name = running.epp_children[i].name if running.epp_children else "epp"
        try:
            text = _get(url)
        except OSError as err:
            if len(urls) == 1:
                return f"EPP metrics unavailable: {err}"
            per_replica.append(f"{name}=down")
            continue
        routed = 0
        for endpoint, value in _DECISION.findall(text):
            decisions[endpoint] = decisions.get(endpoint, 0) + int(float(value))
            routed += int(float(value))
        index = _INDEX.search(text)
        blocks = max(blocks, int(float(index.group(1))) if index else 0)
        if len(urls) > 1:
            per_replica.append(f"{name}={routed}{_sync_summary(running, i)}")
    per_worker = " ".join(f"{w.rsplit(':', 1)[1]}={decisions.get(w, 0)}" for w in running.workers)
    line = f"routed {sum(decisions.values())} [{per_worker}] index entries {blocks}"
    if per_replica:
        line += f" replicas [{' '.join(per_replica)}]"
    return line


def _sync_summary(running: RunningGateway, replica: int) -> str:
    if running.nats_url is None or replica >= len(running.epp_healthz_urls):
        return ""
    try:
        sync = json.loads(_get(running.epp_healthz_urls[replica])).get("replica_sync", {})
    except (OSError, ValueError):
        return " (sync ?)"
    return f" (sync {sync.get('state', '?')}, {len(sync.get('peers') or {})} peers)"
