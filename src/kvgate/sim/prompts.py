"""The one seam between the simulated engine's HTTP layer and the tokenizer.

Prompts are rendered and tokenized by `kvgate.tokens` — the very code the router uses — so the
prefix cache the simulator builds is keyed by the token ids a real vLLM would compute, and any
routing mistake shows up as a cache miss, not as a tokenizer disagreement.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Protocol

from kvgate.tokens import ModelTokenizer, RequestKind

_WORD = re.compile(r" [a-z]{3,9}")


class PromptCodec(Protocol):
    """What the server needs from a tokenizer. Errors in the request raise ValueError, with the
    offending field in an optional ``field`` attribute (`kvgate.tokens.RequestError`)."""

    @property
    def vocab_size(self) -> int: ...

    def tokenize(self, body: Mapping[str, Any], kind: RequestKind) -> list[int]: ...

    def render_chat(self, body: Mapping[str, Any]) -> str: ...

    def decode(self, token_ids: list[int]) -> str: ...


class TokensCodec:
    """`PromptCodec` over `kvgate.tokens.ModelTokenizer` (vLLM-exact chat rendering)."""

    def __init__(self, tokenizer: ModelTokenizer) -> None:
        self._tok = tokenizer

    @classmethod
    def load(cls, path_or_hub_id: str) -> TokensCodec:
        """Raises `kvgate.tokens.TokenizerLoadError` if the tokenizer cannot be loaded."""
        return cls(ModelTokenizer.load(path_or_hub_id))

    @property
    def vocab_size(self) -> int:
        return self._tok.vocab_size

    def tokenize(self, body: Mapping[str, Any], kind: RequestKind) -> list[int]:
        return self._tok.tokenize_request(body, kind)

    def render_chat(self, body: Mapping[str, Any]) -> str:
        return self._tok.render_chat(body)

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids)


def output_vocabulary(codec: PromptCodec, size: int = 512) -> dict[int, str]:
    """Token ids that decode to a space and a short lowercase word, with their text.

    Generated output is drawn from these so streamed text reads as words and every token decodes
    on its own (no split UTF-8 sequences). Scans ids in order: deterministic for a tokenizer.
    """
    words: dict[int, str] = {}
    for token_id in range(codec.vocab_size):
        text = codec.decode([token_id])
        if _WORD.fullmatch(text):
            words[token_id] = text
            if len(words) == size:
                break
    if not words:
        raise ValueError("the tokenizer has no plain word tokens to generate output from")
    return words
