"""`prefix-cache-scorer`: the reference EPP's approximate prefix-cache scorer, on characters.

No tokenizer: the prompt's text is cut into blocks of ``blockSizeTokens`` × 4 bytes (4 characters
per token is the reference's guess; the text is UTF-8, so non-ASCII characters take more than one
byte) and each block is hashed with xxhash64 over ``block ‖ previous hash`` (previous as 8 bytes
little-endian), the chain starting from the hash of the model name followed by the body's
``cache_salt``. The text is ``prompt`` for completions (the compact JSON of it when it is not a
string, e.g. token ids) and the compact JSON of ``messages`` for chat. Only full blocks count, and
at most ``maxPrefixBlocksToMatch`` of them.

The scorer learns only from its own decisions: after a pick (`pre_request`) it records the
request's blocks as cached on the chosen endpoint of every profile (prefill and decode workers both
end up holding the prompt). An endpoint's score is its run of leading blocks recorded there,
divided by the request's block count.

State and bounds: per endpoint an LRU of at most ``lruCapacityPerServer`` block hashes (31,250 by
default: a Llama-3-8B on an 80 GB H100 keeps ~64 GB, ~500K tokens, of KV cache, i.e. ~31K blocks of
16 tokens), so memory is O(endpoints × capacity). With ``autoTune`` the block size comes from the
endpoints' reported KV block size and an endpoint's capacity from its reported GPU block count.
A hash maps to a bitmask of the endpoints holding it, so matching a request is a few integer ANDs
per block rather than a set operation per endpoint. Not thread-safe: owned by the EPP's loop.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, NewType, Self, cast

import msgspec
import xxhash

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import PluginContext, Range, Scorer
from kvgate.scheduling.request import LLMRequest, SchedulingResult

PromptBlockHash = NewType("PromptBlockHash", int)
"""Hash of a block of prompt characters; unrelated to the token-based block hashes."""

AVERAGE_CHARS_PER_TOKEN = 4
DEFAULT_BLOCK_SIZE_TOKENS = 16
DEFAULT_MAX_PREFIX_BLOCKS = 256
DEFAULT_LRU_CAPACITY_PER_SERVER = 31_250
# Hashes computed while scoring are kept for `pre_request`, which follows at once; the bound only
# matters for requests that were scored but never placed (e.g. refused later).
_PENDING_LIMIT = 256

_xxh64 = xxhash.xxh64_intdigest
_pack_u64 = struct.Struct("<Q").pack
_splitters: dict[tuple[int, int], struct.Struct] = {}
# Compact JSON, non-ASCII as UTF-8 (as Go's encoder writes it); ~7x faster than the json module.
_compact_json = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class PrefixCacheScorerParams:
    auto_tune: bool = True
    """Take block size and per-endpoint capacity from endpoint metrics when reported."""
    block_size_tokens: Annotated[int, Range(ge=1)] = DEFAULT_BLOCK_SIZE_TOKENS
    """Tokens per block when not auto-tuned; a block is this × 4 characters."""
    max_prefix_blocks_to_match: Annotated[int, Range(ge=1)] = DEFAULT_MAX_PREFIX_BLOCKS
    """Blocks hashed per request; two prompts equal up to this many blocks look identical."""
    lru_capacity_per_server: Annotated[int, Range(ge=1)] = DEFAULT_LRU_CAPACITY_PER_SERVER
    """Block hashes remembered per endpoint when its GPU block count is unknown."""


def prompt_bytes(request: LLMRequest, limit: int) -> bytes | None:
    """At least the first ``limit`` bytes of the UTF-8 text the scorer hashes (more is
    allowed), or None when the body has nothing to hash."""
    body = request.body
    kind = request.kind
    if kind == "chat" or (kind is None and "messages" in body):
        messages = body.get("messages")
        return None if messages is None else _json_prefix(messages, limit)
    prompt = body.get("prompt")
    if prompt is None:
        return None
    # A character is at least one byte, so `limit` characters cover `limit` bytes.
    return prompt[:limit].encode() if isinstance(prompt, str) else _json_prefix(prompt, limit)


def _json_prefix(value: object, limit: int) -> bytes | None:
    # A list is encoded item by item and the encoding stops once long enough: the start of a
    # 200 KB conversation costs what its first blocks cost, and the bytes are those of
    # encoding the whole list.
    try:
        if not isinstance(value, list):
            return _compact_json(value)
        parts = [b"["]
        size = 1
        for i, item in enumerate(value):
            if i:
                parts.append(b",")
                size += 1
            piece = _compact_json(item)
            parts.append(piece)
            size += len(piece)
            if size >= limit:
                return b"".join(parts)
        parts.append(b"]")
        return b"".join(parts)
    except (TypeError, ValueError, msgspec.EncodeError):
        return None


def hash_prompt(
    data: bytes, *, block_chars: int, max_blocks: int, model: str, cache_salt: str | None
) -> list[PromptBlockHash]:
    """The chained block hashes of ``data`` (full blocks only, at most ``max_blocks``)."""
    blocks = min(len(data) // block_chars, max_blocks)
    seed_text = model + cache_salt if cache_salt else model
    prev = _xxh64(seed_text.encode())
    hashes: list[int] = []
    for block in _splitter(block_chars, blocks).unpack_from(data):
        prev = _xxh64(block + _pack_u64(prev))
        hashes.append(prev)
    # NewType is a call per item at run time; the list is typed once instead.
    return cast(list[PromptBlockHash], hashes)


def _splitter(block_chars: int, blocks: int) -> struct.Struct:
    # One precompiled unpack cuts the text into blocks faster than slicing block by block; at
    # most max_blocks structs per block size are ever made.
    key = (block_chars, blocks)
    found = _splitters.get(key)
    if found is None:
        found = _splitters[key] = struct.Struct(f"{block_chars}s" * blocks)
    return found


class _ServerCache:
    """One endpoint's remembered blocks, least recently recorded first."""

    __slots__ = ("address", "capacity", "lru", "slot")

    def __init__(self, address: str, slot: int, capacity: int) -> None:
        self.address = address
        self.slot = slot
        self.capacity = capacity
        self.lru: OrderedDict[PromptBlockHash, None] = OrderedDict()


class PrefixCacheScorer(Scorer):
    type_name = "prefix-cache-scorer"
    params_type = PrefixCacheScorerParams

    def __init__(self, name: str, params: PrefixCacheScorerParams | None = None) -> None:
        super().__init__(name)
        self.params = params or PrefixCacheScorerParams()
        self._servers: dict[str, _ServerCache] = {}
        self._slot_owner: list[_ServerCache | None] = []
        self._free_slots: list[int] = []
        self._holders: dict[PromptBlockHash, int] = {}
        """Block hash → bitmask of the slots of the endpoints holding it."""
        self._pending: OrderedDict[str, tuple[int, list[PromptBlockHash]]] = OrderedDict()
        """Request id → (block size in bytes, hashes) from scoring, for `pre_request`."""

    @classmethod
    def from_config(
        cls, name: str, params: PrefixCacheScorerParams, context: PluginContext
    ) -> Self:
        return cls(name, params)

    @property
    def indexed_blocks(self) -> int:
        """Block entries held over all endpoints."""
        return sum(len(server.lru) for server in self._servers.values())

    def score(self, request: LLMRequest, endpoints: list[Endpoint]) -> dict[str, float]:
        hashes = self._request_hashes(request, self._block_chars(endpoints), remember=True)
        scores: dict[str, float] = {}
        if not hashes:
            return scores
        holders = self._holders
        alive = holders.get(hashes[0], 0)
        if not alive:
            return scores
        candidates = 0
        servers = self._servers
        for endpoint in endpoints:
            server = servers.get(endpoint.address)
            if server is not None:
                candidates |= 1 << server.slot
        alive &= candidates
        total = len(hashes)
        matched = 1
        while alive and matched < total:
            still = alive & holders.get(hashes[matched], 0)
            if still != alive:
                self._credit(alive & ~still, matched / total, scores)
                alive = still
            matched += 1
        self._credit(alive, matched / total, scores)
        return scores

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        primary = result.primary.endpoints
        hashes = self._request_hashes(request, self._block_chars(primary), remember=False)
        if not hashes:
            return
        recorded: set[str] = set()
        for profile in result.profiles.values():
            if profile.endpoints and profile.endpoints[0].address not in recorded:
                chosen = profile.endpoints[0]
                recorded.add(chosen.address)
                self._record(chosen, hashes)

    def on_endpoints_changed(self, joined: list[Endpoint], left: list[Endpoint]) -> None:
        for endpoint in left:
            server = self._servers.pop(endpoint.address, None)
            if server is None:
                continue
            keep = ~(1 << server.slot)
            holders = self._holders
            for block in server.lru:
                rest = holders[block] & keep
                if rest:
                    holders[block] = rest
                else:
                    del holders[block]
            self._slot_owner[server.slot] = None
            self._free_slots.append(server.slot)

    def _block_chars(self, endpoints: list[Endpoint]) -> int:
        # Endpoints of one pool share an engine configuration, so the first one speaks for all.
        tokens = self.params.block_size_tokens
        if self.params.auto_tune and endpoints:
            tokens = endpoints[0].metrics.block_size or tokens
        return tokens * AVERAGE_CHARS_PER_TOKEN

    def _request_hashes(
        self, request: LLMRequest, block_chars: int, *, remember: bool
    ) -> list[PromptBlockHash]:
        pending = self._pending
        found = pending.pop(request.request_id, None)
        if found is not None and found[0] == block_chars:
            hashes = found[1]
        else:
            max_blocks = self.params.max_prefix_blocks_to_match
            data = prompt_bytes(request, block_chars * max_blocks)
            hashes = (
                []
                if data is None
                else hash_prompt(
                    data,
                    block_chars=block_chars,
                    max_blocks=max_blocks,
                    model=request.model,
                    cache_salt=_cache_salt(request.body),
                )
            )
        if remember:
            pending[request.request_id] = (block_chars, hashes)
            if len(pending) > _PENDING_LIMIT:
                pending.popitem(last=False)
        return hashes

    def _credit(self, mask: int, score: float, scores: dict[str, float]) -> None:
        owners = self._slot_owner
        while mask:
            low = mask & -mask
            owner = owners[low.bit_length() - 1]
            if owner is not None:
                scores[owner.address] = score
            mask ^= low

    def _record(self, endpoint: Endpoint, hashes: list[PromptBlockHash]) -> None:
        server = self._servers.get(endpoint.address)
        if server is None:
            server = self._add_server(endpoint)
        lru = server.lru
        bit = 1 << server.slot
        holders = self._holders
        # Newest last: recording the prompt back to front makes its leading blocks the most
        # recent, so eviction trims a prompt from its tail, as an engine's cache does, and never
        # orphans a tail whose leading blocks are gone (which could no longer match at all).
        for block in reversed(hashes):
            if block in lru:
                lru.move_to_end(block)
                continue
            lru[block] = None
            holders[block] = holders.get(block, 0) | bit
            if len(lru) > server.capacity:
                evicted, _ = lru.popitem(last=False)
                rest = holders[evicted] & ~bit
                if rest:
                    holders[evicted] = rest
                else:
                    del holders[evicted]

    def _add_server(self, endpoint: Endpoint) -> _ServerCache:
        capacity = self.params.lru_capacity_per_server
        if self.params.auto_tune and endpoint.metrics.num_gpu_blocks:
            capacity = endpoint.metrics.num_gpu_blocks
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot = len(self._slot_owner)
            self._slot_owner.append(None)
        server = _ServerCache(endpoint.address, slot, capacity)
        self._slot_owner[slot] = server
        self._servers[endpoint.address] = server
        return server


def _cache_salt(body: Mapping[str, Any]) -> str | None:
    salt = body.get("cache_salt")
    return salt if isinstance(salt, str) and salt else None
