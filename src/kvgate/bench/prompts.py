"""Text for trace prompts: what `kvgate bench` sends, so that routers that read text can route.

A Mooncake hash id stands for 512 tokens of content. `TextSynth` renders each id as a fixed
paragraph of English words: the same text for the same id every time, derived from (seed, id)
alone. Each paragraph is built so that the Qwen3 tokenizer (and any byte-level BPE that splits
words the same way) gives ~512 tokens and tokenizes it the same wherever it sits:

- every word in `WORDS` is one token with its leading space, and one without it;
- a paragraph is a word, then 510 space-prefixed words, then ``".\\n"`` (one token);
- the pre-tokenizer always splits after ``".\\n"`` and before a word, so a paragraph's tokens do
  not depend on what came before it, and a prompt's tokens are the concatenation of its
  paragraphs' (the tests hold this against the real tokenizer).

The last block of a prompt is cut as `TokenSynth` cuts token blocks: ``n`` tokens of the
paragraph are its first ``n - 1`` words and the closing ``".\\n"``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from kvgate.bench.traces import MOONCAKE_BLOCK_TOKENS, TraceRequest, mix64

# 256 common English words, each a single Qwen3 token with and without a leading space.
_WORD_LIST = """
    time year people way day man thing woman life child world school state family student group
    country problem hand part place case week company system program question work government
    number night point home water room mother area money story fact month lot right study book
    eye job word business issue side kind head house service friend father power hour game line
    end member law car city community name team minute idea kid body information back parent
    face others level office door health person art war history party result change reason
    research girl moment air teacher force education foot boy age policy process music market
    sense nation plan college interest death experience effect use class control care field
    development role rate heart drug show leader light voice wife mind price report decision son
    view relationship town road arm difference value building action model season tax director
    position player record paper space ground form event official matter center site project
    activity star table need court oil cost industry figure street image phone data picture
    practice piece land product doctor wall patient worker news test movie north love support
    technology step baby computer type attention film tree source organization hair window
    population truth river stone bridge forest summer winter spring green blue red yellow black
    white small large early late quick slow bright dark warm cold open close simple clear strong
    quiet modern local global public private final single common special major minor basic
    central general social natural physical human national recent similar political economic
    personal medical legal financial
"""
WORDS: tuple[str, ...] = tuple(_WORD_LIST.split())
_END = ".\n"


class TextSynth:
    """Prompt text of trace requests; a pure function of (seed, hash ids, length)."""

    def __init__(self, seed: int = 0, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> None:
        if block_tokens < 2:
            raise ValueError("a block needs >= 2 tokens (a word and the end of the paragraph)")
        self.seed = seed
        self.block_tokens = block_tokens
        self._salt = mix64(np.array([seed & (2**64 - 1)], dtype=np.uint64))[0]
        self._words = lru_cache(maxsize=4096)(self._block_words)

    def _block_words(self, hash_id: int) -> tuple[str, ...]:
        n = self.block_tokens - 1
        positions = np.arange(n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            keys = (np.uint64(hash_id) * np.uint64(n) + positions) ^ self._salt
            picks = (mix64(keys) % np.uint64(len(WORDS))).tolist()
        return tuple(WORDS[i] for i in picks)

    def block(self, hash_id: int, tokens: int | None = None) -> str:
        """The paragraph of ``hash_id``, cut to ``tokens`` (default: the whole block)."""
        n = self.block_tokens if tokens is None else tokens
        if not 1 <= n <= self.block_tokens:
            raise ValueError(f"a block has 1..{self.block_tokens} tokens, not {n}")
        words = self._words(hash_id)[: n - 1]
        if not words:
            return _END
        return words[0] + "".join(" " + w for w in words[1:]) + _END

    def blocks(self, request: TraceRequest) -> list[str]:
        """The paragraphs of the request's hash ids, the last one cut to ``input_length``."""
        bt = self.block_tokens
        n = request.input_length
        ids = request.hash_ids[: -(-n // bt)]
        last = n - (len(ids) - 1) * bt
        parts = [self.block(h) for h in ids[:-1]]
        parts.append(self.block(ids[-1], last))
        return parts

    def prompt(self, request: TraceRequest) -> str:
        return "".join(self.blocks(request))
