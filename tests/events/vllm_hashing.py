"""vLLM's own prefix-cache block hashing (``vllm/v1/core/kv_cache_utils.py``, vllm 0.33.0), run from
the wheel without vLLM installed.

``kv_cache_utils`` imports torch and most of vLLM, so only the functions that key and hash blocks
are taken out of its source, by name (AST), and executed with the handful of names they use: the
block hasher a vLLM engine runs for every request, the extra keys per block (LoRA, multimodal,
``cache_salt``, prompt embeddings) and their untagged form in ``BlockStored`` events. The hash
function is vLLM's default, ``sha256`` of the pickled tuple, from ``vllm/utils/hashing.py``.
:func:`stored_event` builds the ``BlockStored`` event the engine's block pool publishes when it
caches a request's blocks (``BlockPool.cache_full_blocks``).
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import pickle
import types
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NewType

import pytest

from tests.events.vllm_publisher import VLLM_VERSION, find_wheel

_UTILS = "vllm/v1/core/kv_cache_utils.py"
_HASHING = "vllm/utils/hashing.py"
_FUNCTIONS = {
    _UTILS: (
        "maybe_convert_block_hash",
        "resolve_none_hash_seed",
        "init_none_hash",
        "_gen_mm_extra_hash_keys",
        "_gen_lora_extra_hash_keys",
        "_gen_prompt_embeds_extra_hash_keys",
        "generate_block_hash_extra_keys",
        "generate_lookahead_block_hash_extra_keys",
        "to_event_extra_keys",
        "hash_block_tokens",
        "get_request_block_hasher",
    ),
    _HASHING: ("sha256",),
}
_ASSIGNED = {_UTILS: ("DEFAULT_NONE_HASH_SEED", "_NONE_HASH_SEED")}


@dataclass
class LoraRequest:
    """The fields of vLLM's ``LoRARequest`` its hashing and events read."""

    lora_name: str
    lora_int_id: int = 1
    lora_path: str = "/adapters/one"

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id


@dataclass
class Request:
    """The fields of vLLM's ``v1.request.Request`` the block hasher reads."""

    all_token_ids: list[int]
    cache_salt: str | None = None
    lora_request: LoraRequest | None = None
    mm_features: list[Any] = field(default_factory=list)
    prompt_embeds: Any = None
    block_hashes: list[bytes] = field(default_factory=list)
    session_id: str | None = None
    _prompt_embeds_per_block_hashes: dict[Any, bytes] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def _definitions(source: str, names: Iterable[str], assigned: Iterable[str]) -> str:
    wanted, constants = set(names), set(assigned)
    found: list[str] = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name in wanted:
            wanted.discard(node.name)
            found.append(ast.unparse(node))
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id in constants for t in targets):
                found.append(ast.unparse(node))
    if wanted:
        raise AssertionError(f"vLLM {VLLM_VERSION} no longer defines {sorted(wanted)}")
    return "\n\n".join(found)


def _unavailable(name: str) -> Callable[..., Any]:
    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise NotImplementedError(f"{name} is not loaded from the vLLM wheel")

    return fail


def load_block_hashing() -> types.SimpleNamespace:
    """vLLM's block hashing functions, NONE_HASH initialised for sha256 (vLLM's default), or skip
    the test with the reason the wheel is not available (fail under ``make test``)."""
    wheel = find_wheel()
    if wheel is None:
        if "KVGATE_VLLM_WHEEL" in os.environ:
            pytest.fail(f"KVGATE_VLLM_WHEEL={os.environ['KVGATE_VLLM_WHEEL']} holds no vLLM wheel")
        pytest.skip(f"vLLM {VLLM_VERSION} wheel not found (see tests/events/vllm_publisher.py)")
    namespace: dict[str, Any] = {
        "__name__": "_kvgate_tests_vllm_kv_cache_utils",
        "hashlib": hashlib,
        "os": os,
        "pickle": pickle,
        "Any": Any,
        "Callable": Callable,
        "Iterable": Iterable,
        "Sequence": Sequence,
        "BlockHash": NewType("BlockHash", bytes),
        "ExternalBlockHash": bytes | int,
        "Request": Request,
        "logger": logging.getLogger("vllm.v1.core.kv_cache_utils"),
        "envs": types.SimpleNamespace(VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=True),
        "_NON_CRYPTO_HASH_FUNCTIONS": frozenset(),
        "get_mm_features_in_window": _unavailable("get_mm_features_in_window"),
        "tensor_data": _unavailable("tensor_data"),
    }
    with zipfile.ZipFile(wheel) as archive:
        for path, names in _FUNCTIONS.items():
            source = archive.read(path).decode()
            code = _definitions(source, names, _ASSIGNED.get(path, ()))
            exec(compile(code, f"{wheel}!/{path}", "exec"), namespace)
    namespace["init_none_hash"](namespace["sha256"])
    return types.SimpleNamespace(**namespace)


def block_hashes(vllm: types.SimpleNamespace, request: Request, block_size: int) -> list[bytes]:
    """The block hashes a vLLM engine computes for ``request`` (its full blocks)."""
    hasher = vllm.get_request_block_hasher(block_size, vllm.sha256)
    hashes: list[bytes] = hasher(request)
    return hashes


def stored_event(
    vllm: types.SimpleNamespace, kv_events: Any, request: Request, block_size: int
) -> Any:
    """The ``BlockStored`` event vLLM's block pool publishes when it caches every full block of
    ``request`` at once (no block cached before it)."""
    hashes = block_hashes(vllm, request, block_size)
    extra_keys = []
    mm_index = 0
    for i in range(len(hashes)):
        keys, mm_index = vllm.generate_block_hash_extra_keys(
            request, i * block_size, (i + 1) * block_size, mm_index
        )
        extra_keys.append(keys)
    lora = request.lora_request
    return kv_events.BlockStored(
        block_hashes=[vllm.maybe_convert_block_hash(h) for h in hashes],
        parent_block_hash=None,
        token_ids=request.all_token_ids[: len(hashes) * block_size],
        block_size=block_size,
        lora_id=lora.adapter_id if lora else None,
        medium="GPU",
        lora_name=lora.name if lora else None,
        extra_keys=vllm.to_event_extra_keys(extra_keys),
        group_idx=0,
    )
