"""What an OpenAI-style request asks the engine to tokenize, read the way vLLM reads it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from kvgate.tokens.errors import RequestError, type_name

RequestKind = Literal["chat", "completions"]

# vLLM 0.33's limits on cache_salt (validate_cache_salt): it refuses the request otherwise.
_MAX_CACHE_SALT_CHARS = 128
_CACHE_SALT_FORBIDDEN = frozenset("@/\\\0")

_KIND_BY_PATH: dict[str, RequestKind] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
}


def request_kind_for_path(path: str) -> RequestKind | None:
    """The kind of request an HTTP path serves (``/v1/completions?x=1`` → ``"completions"``), or
    None for a path kvgate does not tokenize."""
    return _KIND_BY_PATH.get(path.partition("?")[0])


def completion_prompt(body: Mapping[str, Any], vocab_size: int) -> str | list[int]:
    """The prompt of a ``/v1/completions`` body: text to tokenize, or token ids as given (each
    checked to be in ``[0, vocab_size)``, as the engine checks them).

    ``prompt`` may be a string, a list of token ids, or a batch — a list of strings or a list of
    lists of ids. The engine runs each prompt of a batch as its own request, but the router sees one
    request and places it once: it routes on the first prompt, so the other prompts of the batch
    land on the same worker whatever their prefix.
    """
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if prompt is None:
        if body.get("prompt_embeds") is not None:
            raise RequestError("prompt_embeds", "prompt embeddings have no tokens to route on")
        raise RequestError("prompt", "is required")
    if not isinstance(prompt, list):
        raise RequestError(
            "prompt",
            f"expected a string, a list of token ids or a list of prompts, got {type_name(prompt)}",
        )
    if not prompt:
        raise RequestError("prompt", "expected a non-empty list")
    first = prompt[0]
    if _is_token_id(first):
        return _token_ids(prompt, "prompt", vocab_size)
    if isinstance(first, str):
        for i, item in enumerate(prompt):
            if not isinstance(item, str):
                raise RequestError(
                    f"prompt[{i}]",
                    f"expected a string like the rest of the batch, got {type_name(item)}",
                )
        return first
    if isinstance(first, list):
        for i, item in enumerate(prompt):
            if not isinstance(item, list):
                raise RequestError(
                    f"prompt[{i}]",
                    "expected a list of token ids like the rest of the batch, "
                    f"got {type_name(item)}",
                )
        if not first:
            raise RequestError("prompt[0]", "expected a non-empty list of token ids")
        return _token_ids(first, "prompt[0]", vocab_size)
    raise RequestError(
        "prompt[0]", f"expected a token id, a string or a list of token ids, got {type_name(first)}"
    )


def _is_token_id(value: object) -> bool:
    # JSON true/false arrive as bool, which Python counts as int.
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids(values: list[Any], field: str, vocab_size: int) -> list[int]:
    for i, value in enumerate(values):
        if not _is_token_id(value):
            raise RequestError(f"{field}[{i}]", f"expected a token id, got {type_name(value)}")
        if not 0 <= value < vocab_size:
            raise RequestError(
                f"{field}[{i}]", f"token id {value} is outside the vocabulary [0, {vocab_size})"
            )
    return list(values)


def add_special_tokens(body: Mapping[str, Any], *, default: bool) -> bool:
    """The request's ``add_special_tokens`` (vLLM's default: true for completions, false for chat,
    whose template writes the special tokens itself)."""
    value = body.get("add_special_tokens", default)
    if not isinstance(value, bool):
        raise RequestError("add_special_tokens", f"expected a boolean, got {type_name(value)}")
    return value


def truncate(ids: list[int], body: Mapping[str, Any]) -> list[int]:
    """Apply the request's ``truncate_prompt_tokens`` as the engine will, so that the router sees
    the tokens the engine caches: the last N by default (``truncation_side="left"``, vLLM's default
    for generation), the first N with ``"right"``.

    ``-1`` ("truncate to the model's context length") is left to the engine: the router does not
    know the context length, and a prompt longer than it is refused anyway.
    """
    limit = body.get("truncate_prompt_tokens")
    if limit is None:
        return ids
    if not _is_token_id(limit) or limit < -1:
        raise RequestError("truncate_prompt_tokens", f"expected an integer >= -1, got {limit!r}")
    side = body.get("truncation_side")
    if side not in (None, "left", "right"):
        raise RequestError("truncation_side", f"expected 'left' or 'right', got {side!r}")
    if limit == -1 or limit >= len(ids):
        return ids
    if side == "right":
        return ids[:limit]
    return ids[len(ids) - limit :]


def cache_salt(body: Mapping[str, Any]) -> str | None:
    """The request's ``cache_salt``: vLLM hashes it into the prompt's first KV block, so only
    requests with the same salt share cached prefixes. Checked as vLLM checks it (a non-empty
    string of at most 128 characters without ``@``, ``/``, ``\\`` or NUL)."""
    salt = body.get("cache_salt")
    if salt is None:
        return None
    if not isinstance(salt, str) or not salt:
        raise RequestError("cache_salt", f"expected a non-empty string, got {salt!r:.40}")
    if len(salt) > _MAX_CACHE_SALT_CHARS or not _CACHE_SALT_FORBIDDEN.isdisjoint(salt):
        raise RequestError(
            "cache_salt",
            f"must be at most {_MAX_CACHE_SALT_CHARS} characters without '@', '/', '\\' or NUL",
        )
    return salt
