"""The KV router's typed configuration, read from the seed's ``DYNAMO_*`` environment variables.

Every value is validated once, at start-up; an invalid one raises `ConfigError` naming the variable,
the value it got and what is allowed. Nothing is silently clamped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from kvgate.errors import ConfigError
from kvgate.settings import Range, check_ranges

MIN_BLOCK_SIZE = 16
MAX_BLOCK_SIZE = 8192
DEFAULT_REQUEST_EXPIRY_S = 300.0

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def validate_block_size(value: int, field: str = "DYNAMO_KV_BLOCK_SIZE") -> int:
    if not MIN_BLOCK_SIZE <= value <= MAX_BLOCK_SIZE or value & (value - 1):
        raise ConfigError(
            field,
            f"got {value}; must be a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}] and "
            "equal to the engines' KV block size (vLLM --block-size)",
        )
    return value


@dataclass(frozen=True, slots=True)
class KvRouterConfig:
    block_size: int
    """Tokens per KV block; must equal the engines' block size or every match is wrong."""
    use_kv_routing: bool = True
    """False: plain round-robin, no tokenizing, no index."""
    use_kv_events: bool = True
    """False: no event subscription; the approximate TTL index learns from kvgate's own picks."""
    overlap_score_weight: Annotated[float, Range(ge=0)] = 1.0
    """Weight of prefill cost against decode load in the cost function."""
    temperature: Annotated[float, Range(ge=0)] = 0.0
    """0: always the cheapest worker; > 0: softmax sampling over normalised costs."""
    busy_threshold: Annotated[float | None, Range(gt=0, le=1)] = None
    """Skip workers whose active KV blocks exceed this fraction of capacity; None: never skip."""
    replica_sync: bool = False
    """Share active-sequence changes with other kvgate replicas over NATS."""
    namespace: str | None = None
    """Dynamo namespace of the backend (passed through to Dynamo-aware components)."""
    request_expiry_s: Annotated[float, Range(gt=0)] = DEFAULT_REQUEST_EXPIRY_S
    """Requests never reported complete are forgotten after this long."""

    def __post_init__(self) -> None:
        validate_block_size(self.block_size, "block_size")
        check_ranges(self)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KvRouterConfig:
        """Build from the seed's variables. ``DYNAMO_KV_BLOCK_SIZE`` is mandatory when KV routing
        is on (the default): without it routing would silently match nothing."""
        use_kv_routing = _bool(env, "DYNAMO_USE_KV_ROUTING", True)
        raw_block = env.get("DYNAMO_KV_BLOCK_SIZE", "").strip()
        if not raw_block:
            if use_kv_routing:
                raise ConfigError(
                    "DYNAMO_KV_BLOCK_SIZE",
                    "is required when KV routing is on: set it to the engines' KV block size "
                    "(a power of two in [16, 8192], e.g. 16 for vLLM's default)",
                )
            block_size = MIN_BLOCK_SIZE
        else:
            block_size = validate_block_size(_int(raw_block, "DYNAMO_KV_BLOCK_SIZE"))
        busy = _float(env, "DYNAMO_BUSY_THRESHOLD", -1.0)
        if busy >= 0 and not 0 < busy <= 1:
            raise ConfigError(
                "DYNAMO_BUSY_THRESHOLD",
                f"got {busy}; must be a fraction in (0, 1], or negative to disable",
            )
        namespace = env.get("DYN_NAMESPACE") or env.get("DYNAMO_NAMESPACE") or None
        try:
            return cls(
                block_size=block_size,
                use_kv_routing=use_kv_routing,
                use_kv_events=_bool(env, "DYNAMO_USE_KV_EVENTS", True),
                overlap_score_weight=_float(env, "DYNAMO_OVERLAP_SCORE_WEIGHT", 1.0),
                temperature=_float(env, "DYNAMO_ROUTER_TEMPERATURE", 0.0),
                busy_threshold=busy if busy > 0 else None,
                replica_sync=_bool(env, "DYNAMO_ROUTER_REPLICA_SYNC", False),
                namespace=namespace,
            )
        except ConfigError as err:
            raise ConfigError(_ENV_NAME.get(err.field, err.field), err.reason) from None


_ENV_NAME = {
    "overlap_score_weight": "DYNAMO_OVERLAP_SCORE_WEIGHT",
    "temperature": "DYNAMO_ROUTER_TEMPERATURE",
}


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(name, f"got {raw!r}; expected one of true/1/yes/on or false/0/no/off")


def _int(raw: str, name: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(name, f"got {raw!r}; expected an integer") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(name, f"got {raw!r}; expected a number") from None
    if not math.isfinite(value):
        raise ConfigError(name, f"got {raw!r}; expected a finite number")
    return value
