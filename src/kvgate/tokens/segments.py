"""Segment-cached encoding: the same token ids as ``Tokenizer.encode``, at a fraction of the cost.

Why this is exact. The ``tokenizers`` library first cuts the input at its *added tokens* (special or
not: ``<|im_start|>``, ``<think>``, ...), matched leftmost-longest on the raw text, and only then
normalises, pre-tokenises and runs the model on each piece in between, independently. Encoding
every piece on its own and splicing the added tokens' ids between them therefore gives the very
same ids — provided nothing couples a piece to its neighbours. Four things can: an added token with
``lstrip``/``rstrip`` (it eats the whitespace around it), ``single_word`` (whether it matches
depends on its neighbours), ``normalized`` (it is matched after normalisation, in a second pass),
or a pre-tokenizer that treats the first piece of the input differently (``Metaspace`` with
``prepend_scheme="first"``). A tokenizer with any of these falls back to plain encoding; the last
one is caught by comparing both paths on probe strings when the encoder is built.

Why it pays. A chat template puts added tokens around every message, so a conversation that
extends one seen before — or a request that reuses a popular system prompt — is made of pieces
already encoded: a dictionary lookup each instead of ~3.5 µs per token.

Long pieces are cut further, at line starts. A user message that pastes a shared document
before its question is one piece, new every time; cut after a newline that a word character
follows, its document's lines are pieces seen before. No pre-token of a GPT-2-style split
pattern (Qwen, Llama 3, GPT-2) spans such a place: a newline ends every alternative that can
contain it, and none can continue into a word. A tokenizer whose probes disagree encodes its
pieces whole. The cuts fall at the first line start at least ``line_chunk_chars`` after the
previous one, so two messages that open alike are cut alike until they differ.

Memory. The cache is an LRU bounded by the bytes it holds: each entry is charged its text, its ids
and ``_ENTRY_OVERHEAD_BYTES`` of bookkeeping. Ids are kept as tuples of *shared* ``int`` objects,
one per vocabulary entry (~36 bytes each: 5 MiB for a 150k vocabulary, allocated once), so an id
costs 8 bytes in the cache and copying a cached piece into a result only bumps reference counts —
``array('I')`` would halve that but cost ~20 ns a token to turn back into a list on every hit. At
the default 64 MiB and ~4 characters a token of English text, an entry costs ~3 bytes a
character, so the cache holds ~20 M characters (~5 M tokens) of distinct text.

Thread-safety: the cache takes a lock around each batch of lookups or stores, so one
``SegmentEncoder`` may be shared by threads; the Rust tokenizer itself is safe to share.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_CACHE_MAX_BYTES = 64 * 1024 * 1024
# A piece this long is rarely repeated verbatim, and would evict hundreds of useful ones.
DEFAULT_MAX_PIECE_CHARS = 256 * 1024
# OrderedDict node + hash-table slot, per entry, on 64-bit CPython (measured ~100-120 bytes).
_ENTRY_OVERHEAD_BYTES = 128
# Pieces longer than twice this are cut at line starts into chunks at least this long.
DEFAULT_LINE_CHUNK_CHARS = 1024
_LINE_START = re.compile(r"\n(?=\w)")
# In an `EncodePlan`'s token ids: no added token between these two pieces (a line cut).
_NO_TOKEN = -1

TokenIds = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SegmentCacheStats:
    """Counters of a :class:`SegmentCache`, for metrics. All but the last two only grow."""

    hits: int
    misses: int
    bypassed: int  # pieces longer than ``max_piece_chars``, encoded without the cache
    evictions: int
    entries: int
    cached_bytes: int


class SegmentCache:
    """LRU map from a piece of text to its token ids, bounded by the bytes it holds."""

    def __init__(
        self,
        max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
        max_piece_chars: int = DEFAULT_MAX_PIECE_CHARS,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 (0 disables the cache), got {max_bytes}")
        if max_piece_chars < 1:
            raise ValueError(f"max_piece_chars must be >= 1, got {max_piece_chars}")
        self.max_bytes = max_bytes
        self.max_piece_chars = max_piece_chars
        self._entries: OrderedDict[str, tuple[TokenIds, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._bypassed = 0
        self._evictions = 0

    def get_many(self, pieces: Sequence[str]) -> list[TokenIds | None]:
        """The cached ids of each piece, or None (a miss, or a piece too long to cache).

        An empty piece (two adjacent added tokens) has no ids and is not counted.
        """
        found: list[TokenIds | None] = []
        limit = self.max_piece_chars
        with self._lock:
            entries = self._entries
            for piece in pieces:
                if not piece:
                    found.append(())
                    continue
                if len(piece) > limit:
                    self._bypassed += 1
                    found.append(None)
                    continue
                entry = entries.get(piece)
                if entry is None:
                    self._misses += 1
                    found.append(None)
                else:
                    self._hits += 1
                    entries.move_to_end(piece)
                    found.append(entry[0])
        return found

    def put_many(self, encoded: Iterable[tuple[str, TokenIds]]) -> None:
        """Remember freshly encoded pieces, evicting the least recently used beyond the budget."""
        if self.max_bytes == 0:
            return
        limit = self.max_piece_chars
        with self._lock:
            entries = self._entries
            for piece, ids in encoded:
                if len(piece) > limit:
                    continue
                cost = sys.getsizeof(piece) + sys.getsizeof(ids) + _ENTRY_OVERHEAD_BYTES
                if cost > self.max_bytes:
                    continue
                previous = entries.pop(piece, None)
                if previous is not None:
                    self._bytes -= previous[1]
                entries[piece] = (ids, cost)
                self._bytes += cost
            while self._bytes > self.max_bytes:
                _, (_, cost) = entries.popitem(last=False)
                self._bytes -= cost
                self._evictions += 1

    def stats(self) -> SegmentCacheStats:
        with self._lock:
            return SegmentCacheStats(
                hits=self._hits,
                misses=self._misses,
                bypassed=self._bypassed,
                evictions=self._evictions,
                entries=len(self._entries),
                cached_bytes=self._bytes,
            )

    def clear(self) -> None:
        """Drop every entry (the counters keep counting)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0


class AddedTokenSplitter:
    """Cuts text at added tokens the way the ``tokenizers`` library does: leftmost, then longest.

    The tokens are compiled into one regex shaped like a trie (``<(?:/think>|think>|...)``):
    alternatives at a trie node start with distinct characters and a shorter token is an optional
    tail, so the first match found at a position is the longest, and ``re`` can skip ahead to the
    tokens' common first characters.
    """

    def __init__(self, token_ids: Mapping[str, int]) -> None:
        self._ids = dict(token_ids)
        pattern = _trie_pattern(sorted(self._ids))
        self._regex = re.compile(f"({pattern})") if pattern else None

    def split(self, text: str) -> tuple[list[str], list[int]]:
        """The text pieces and the added-token ids between them: piece 0, token 0, piece 1, ...,
        piece n (one piece more than tokens; a piece may be empty)."""
        if self._regex is None:
            return [text], []
        parts = self._regex.split(text)
        return parts[::2], list(map(self._ids.__getitem__, parts[1::2]))


def _trie_pattern(words: Sequence[str]) -> str:
    trie: dict[str, dict[str, object]] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})  # type: ignore[assignment]
        node[""] = {}

    def emit(node: dict[str, dict[str, object]]) -> str:
        branches = [
            re.escape(char) + emit(child)  # type: ignore[arg-type]
            for char, child in sorted(node.items())
            if char
        ]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # A token ending here is the shorter alternative: tried only once the longer ones fail.
        return f"(?:{body})?" if "" in node else body

    return emit(trie)


class SegmentEncoder:
    """Encodes text through a :class:`SegmentCache`, falling back to plain encoding when unsafe."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        cache: SegmentCache,
        vocab_size: int,
        *,
        line_chunk_chars: int = DEFAULT_LINE_CHUNK_CHARS,
    ) -> None:
        """``vocab_size``: one more than the largest token id; ``line_chunk_chars``: the
        shortest chunk a long piece is cut into at line starts (0: never cut)."""
        self._tokenizer = tokenizer
        self._encode_ids = _ids_encoder(tokenizer)
        self.cache = cache
        self._splitter = _exact_splitter(tokenizer)
        self._wrap = _special_token_wrap(tokenizer) if self._splitter is not None else None
        self._ids = list(range(vocab_size)) if self._splitter is not None else []
        exact_cuts = self._splitter is not None and line_chunk_chars > 0
        self._line_chunk = line_chunk_chars if exact_cuts and _line_cuts_exact(tokenizer) else 0

    @property
    def cuts_lines(self) -> bool:
        """Whether long pieces are cut at line starts (False: this tokenizer might join
        tokens across them, or cutting is off)."""
        return self._line_chunk > 0

    @property
    def exact(self) -> bool:
        """Whether encoding goes through the cache (False: this tokenizer always encodes cold)."""
        return self._splitter is not None

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """``Tokenizer.encode(text, add_special_tokens).ids``, reusing cached pieces."""
        return self.plan(text, add_special_tokens=add_special_tokens).finish()

    def plan(self, text: str, *, add_special_tokens: bool = False) -> EncodePlan:
        """Split ``text`` and look its pieces up in the cache, encoding nothing yet: what is left
        to encode (``missing_chars``) tells whether `EncodePlan.finish` is worth a thread."""
        splitter = self._splitter
        if splitter is None or (add_special_tokens and self._wrap is None):
            return EncodePlan(self, text, add_special_tokens, pieces=None, token_ids=[], cached=[])
        pieces, token_ids = splitter.split(text)
        if self._line_chunk:
            pieces, token_ids = _cut_lines(pieces, token_ids, self._line_chunk)
        cached = self.cache.get_many(pieces)
        return EncodePlan(
            self, text, add_special_tokens, pieces=pieces, token_ids=token_ids, cached=cached
        )

    def encode_cold(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Plain ``Tokenizer.encode``: the reference the cached path must equal."""
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return ids


def _ids_encoder(tokenizer: Tokenizer) -> Callable[[str, bool], list[int]]:
    """``tokenizer.encode(text, add_special_tokens).ids`` without the character offsets that
    ``encode`` computes and nobody here reads (a byte-to-char hash map per call: ~15% of
    encoding a short ASCII piece). ``encode_batch_fast`` (tokenizers >= 0.21) skips them; a
    batch of one runs on the calling thread."""
    batch_fast = getattr(tokenizer, "encode_batch_fast", None)
    if batch_fast is None:
        return lambda text, special: tokenizer.encode(text, add_special_tokens=special).ids
    return lambda text, special: batch_fast([text], add_special_tokens=special)[0].ids


def _exact_splitter(tokenizer: Tokenizer) -> AddedTokenSplitter | None:
    if tokenizer.encode_special_tokens:
        # Special tokens are then skipped mid-scan, which can hide an overlapping added token.
        logger.debug("segment cache off: the tokenizer encodes special tokens as text")
        return None
    token_ids: dict[str, int] = {}
    for token in tokenizer.get_added_tokens_decoder().values():
        if token.lstrip or token.rstrip or token.single_word or token.normalized:
            logger.debug(
                "segment cache off: added token %r has lstrip/rstrip/single_word/normalized set",
                token.content,
            )
            return None
        if token.content:
            token_id = tokenizer.token_to_id(token.content)
            assert token_id is not None, token.content
            token_ids[token.content] = token_id
    splitter = AddedTokenSplitter(token_ids)
    for probe in _probes(list(token_ids)):
        segmented = _encode_split(tokenizer, splitter, probe)
        if segmented != tokenizer.encode(probe, add_special_tokens=False).ids:
            logger.debug(
                "segment cache off: encoding pieces apart changes the ids of %r "
                "(a pre-tokenizer that depends on the position, e.g. Metaspace 'first'?)",
                probe[:200],
            )
            return None
    return splitter


def _cut_lines(pieces: list[str], token_ids: list[int], chunk: int) -> tuple[list[str], list[int]]:
    """``pieces`` and ``token_ids`` with every piece longer than ``2 * chunk`` cut at line
    starts into chunks of at least ``chunk`` characters (`_NO_TOKEN` between them)."""
    longest = 2 * chunk
    if all(len(piece) <= longest for piece in pieces):
        return pieces, token_ids
    cut_pieces: list[str] = []
    cut_ids: list[int] = []
    search = _LINE_START.search
    for index, piece in enumerate(pieces):
        start = 0
        if len(piece) > longest:
            # One search per chunk, not one step per line: this runs on the event loop, and a
            # pasted file may have a line every few characters.
            while (line := search(piece, start + chunk - 1)) is not None:
                end = line.end()
                cut_pieces.append(piece[start:end])
                cut_ids.append(_NO_TOKEN)
                start = end
        cut_pieces.append(piece[start:] if start else piece)
        if index < len(token_ids):
            cut_ids.append(token_ids[index])
    return cut_pieces, cut_ids


# Lines that end in every way a split pattern treats differently (punctuation, spaces, CR, blank
# lines) and start with every kind of word character (letters, digits, underscore, CJK, accents).
_LINE_PROBES = (
    "Hello world.\nNext line\n\nThird 123\n4th\r\nfifth  \nsixth?!\nseventh\t\nlast",
    "a\nb\n\n\nc.\n\nd,\ne:\n1\n22\n333x\n_under\n__init__\n",
    "Übung\nétude\n中文\n字\nкириллица\nαβγ\n٣٤\nx\u0301y\nend",
    " lead\n trailing \nword\n  two spaces\n'quote\n's\n'll\nit's\ndone",
)


def _line_cuts_exact(tokenizer: Tokenizer) -> bool:
    """Whether cutting at every line start leaves this tokenizer's ids unchanged (probed)."""
    for probe in _LINE_PROBES:
        whole = tokenizer.encode(probe, add_special_tokens=False).ids
        cut: list[int] = []
        start = 0
        for line in _LINE_START.finditer(probe):
            cut.extend(tokenizer.encode(probe[start : line.end()], add_special_tokens=False).ids)
            start = line.end()
        cut.extend(tokenizer.encode(probe[start:], add_special_tokens=False).ids)
        if cut != whole:
            logger.debug("line cuts off: encoding lines apart changes the ids of %r", probe)
            return False
    return True


def _probes(tokens: list[str]) -> list[str]:
    sample = sorted(tokens)[:64]
    joined = "".join(f"a{token} b\n{token}{token}  c" for token in sample)
    return ["hello world", " leading space", *(f"x{token}y" for token in sample[:8]), joined]


def _encode_split(tokenizer: Tokenizer, splitter: AddedTokenSplitter, text: str) -> list[int]:
    pieces, token_ids = splitter.split(text)
    ids: list[int] = []
    for piece, token_id in zip(pieces, [*token_ids, None], strict=True):
        ids.extend(tokenizer.encode(piece, add_special_tokens=False).ids)
        if token_id is not None:
            ids.append(token_id)
    return ids


def _special_token_wrap(tokenizer: Tokenizer) -> tuple[TokenIds, TokenIds] | None:
    """The ids the post-processor puts before and after a single sequence, if it is that simple.

    Learnt from probes rather than read from the post-processor's JSON, so that every processor
    type (template, BERT, RoBERTa, sequences of them) is handled alike; None if the probes disagree.
    """
    wraps: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    for probe in ("hello world", "x", "1 2 3"):
        plain = tokenizer.encode(probe, add_special_tokens=False).ids
        full = tokenizer.encode(probe, add_special_tokens=True).ids
        n = len(plain)
        starts = [i for i in range(len(full) - n + 1) if full[i : i + n] == plain]
        if len(starts) != 1:
            logger.debug("segment cache off with special tokens: ambiguous post-processor")
            return None
        start = starts[0]
        wraps.add((tuple(full[:start]), tuple(full[start + n :])))
    if len(wraps) != 1:
        logger.debug("segment cache off with special tokens: the post-processor varies by input")
        return None
    return wraps.pop()


class EncodePlan:
    """A text cut at its added tokens, with the cached ids of its pieces; `finish` encodes the
    pieces the cache missed and splices everything together.

    Planning costs a regex split and dictionary lookups, so it runs where blocking matters (the
    event loop); `finish` does the tokenizer's work and may run in another thread (the Rust
    tokenizer releases the GIL while it encodes).
    """

    __slots__ = ("_add_special", "_cached", "_encoder", "_pieces", "_text", "_token_ids")

    def __init__(
        self,
        encoder: SegmentEncoder,
        text: str,
        add_special_tokens: bool,
        *,
        pieces: list[str] | None,
        token_ids: list[int],
        cached: list[TokenIds | None],
    ) -> None:
        """``pieces`` None: encode ``text`` whole, without the cache."""
        self._encoder = encoder
        self._text = text
        self._add_special = add_special_tokens
        self._pieces = pieces
        self._token_ids = token_ids
        self._cached = cached

    @property
    def missing_chars(self) -> int:
        """Characters the tokenizer still has to encode."""
        pieces = self._pieces
        if pieces is None:
            return len(self._text)
        return sum(len(pieces[i]) for i, ids in enumerate(self._cached) if ids is None)

    def finish(self) -> list[int]:
        encoder = self._encoder
        pieces = self._pieces
        if pieces is None:
            return encoder._encode_ids(self._text, self._add_special)
        token_ids = self._token_ids
        wrap = encoder._wrap
        out: list[int] = []
        if self._add_special:
            assert wrap is not None
            out.extend(wrap[0])
        fresh: dict[str, TokenIds] = {}
        encode = encoder._encode_ids
        shared = encoder._ids.__getitem__
        for index, cached in enumerate(self._cached):
            ids = cached
            if ids is None:
                piece = pieces[index]
                ids = fresh.get(piece)
                if ids is None:
                    ids = tuple(map(shared, encode(piece, False)))
                    fresh[piece] = ids
            out.extend(ids)
            if index < len(token_ids) and token_ids[index] != _NO_TOKEN:
                out.append(token_ids[index])
        if self._add_special:
            assert wrap is not None
            out.extend(wrap[1])
        if fresh:
            encoder.cache.put_many(fresh.items())
        return out
