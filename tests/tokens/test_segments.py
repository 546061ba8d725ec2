"""The segment cache, the added-token splitter, and when piecewise encoding must be refused."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, processors

from kvgate.tokens import ModelTokenizer, TokenizerConfig
from kvgate.tokens.segments import AddedTokenSplitter, SegmentCache, SegmentEncoder

CHARS = "abcdxy<|>"


def char_tokenizer(
    *added: AddedToken, pre_tokenizer: pre_tokenizers.PreTokenizer | None = None
) -> Tokenizer:
    """One token per character, so that the ids spell out exactly where text was cut."""
    vocab = {"[UNK]": 0, "▁": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    vocab.update({f"▁{c}": len(vocab) + i for i, c in enumerate(CHARS)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizer or pre_tokenizers.Split(Regex("."), "isolated")
    tokenizer.add_tokens(list(added))
    return tokenizer


def encoder_for(tokenizer: Tokenizer) -> SegmentEncoder:
    return SegmentEncoder(tokenizer, SegmentCache(), tokenizer.get_vocab_size())


OVERLAPPING = [AddedToken(t, normalized=False) for t in ("ab", "abc", "bcd", "c", "<|x|>", "<|")]


# -- the cache ------------------------------------------------------------------------------


def ids(*values: int) -> tuple[int, ...]:
    return values


def test_hits_misses_and_lru_eviction() -> None:
    probe = SegmentCache(max_bytes=10**6)
    probe.put_many([("aaaa", ids(1))])
    entry_cost = probe.stats().cached_bytes
    cache = SegmentCache(max_bytes=2 * entry_cost)
    cache.put_many([("aaaa", ids(1)), ("bbbb", ids(2))])
    assert cache.get_many(["aaaa", "cccc"]) == [ids(1), None]  # "aaaa" is now the most recent
    cache.put_many([("cccc", ids(3))])  # over budget: the least recent, "bbbb", goes
    assert cache.get_many(["bbbb", "aaaa", "cccc"]) == [None, ids(1), ids(3)]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.entries) == (3, 2, 1, 2)
    assert stats.cached_bytes == 2 * entry_cost


def test_long_pieces_bypass_the_cache() -> None:
    cache = SegmentCache(max_piece_chars=3)
    cache.put_many([("long", ids(1)), ("abc", ids(2))])
    assert cache.get_many(["long", "abc"]) == [None, ids(2)]
    stats = cache.stats()
    assert (stats.bypassed, stats.hits, stats.misses, stats.entries) == (1, 1, 0, 1)


def test_zero_bytes_disables_storing() -> None:
    cache = SegmentCache(max_bytes=0)
    cache.put_many([("a", ids(1))])
    assert cache.get_many(["a"]) == [None]
    assert cache.stats().entries == 0


def test_storing_again_replaces_and_clear_empties() -> None:
    cache = SegmentCache()
    cache.put_many([("a", ids(1))])
    before = cache.stats().cached_bytes
    cache.put_many([("a", ids(1))])
    assert cache.stats().cached_bytes == before
    cache.clear()
    assert cache.stats().entries == cache.stats().cached_bytes == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_bytes": -1}, "max_bytes"), ({"max_piece_chars": 0}, "max_piece_chars")],
)
def test_cache_refuses_bad_sizes(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SegmentCache(**kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"cache_max_bytes": -1}, {"cache_max_piece_chars": 0}], ids=["bytes", "chars"]
)
def test_config_refuses_bad_sizes(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        TokenizerConfig(**kwargs)


# -- the splitter -----------------------------------------------------------------------------


def test_splitter_is_leftmost_then_longest() -> None:
    splitter = AddedTokenSplitter({"ab": 1, "abc": 2, "bcd": 3, "c": 4})
    # "bcd" would start later than "abc": leftmost wins, then the longest at that position.
    assert splitter.split("xabcdy") == (["x", "dy"], [2])
    assert splitter.split("abab") == (["", "", ""], [1, 1])
    assert splitter.split("") == ([""], [])
    assert AddedTokenSplitter({}).split("plain") == (["plain"], [])


@pytest.fixture(scope="module")
def overlapping() -> tuple[Tokenizer, SegmentEncoder]:
    tokenizer = char_tokenizer(*OVERLAPPING)
    return tokenizer, encoder_for(tokenizer)


@settings(max_examples=300)
@given(text=st.text(alphabet=CHARS, max_size=40))
def test_splitter_cuts_where_the_rust_tokenizer_does(
    overlapping: tuple[Tokenizer, SegmentEncoder], text: str
) -> None:
    tokenizer, encoder = overlapping
    assert encoder.exact
    cold = tokenizer.encode(text, add_special_tokens=False).ids
    assert encoder.encode(text) == cold
    assert encoder.encode(text) == cold


# -- refusing inexact tokenizers ----------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        AddedToken("<|x|>", lstrip=True, normalized=False),
        AddedToken("<|x|>", rstrip=True, normalized=False),
        AddedToken("ab", single_word=True, normalized=False),
        AddedToken("ab", normalized=True),
    ],
    ids=["lstrip", "rstrip", "single-word", "normalized"],
)
def test_flags_that_couple_pieces_turn_the_cache_off(token: AddedToken) -> None:
    tokenizer = char_tokenizer(token)
    encoder = encoder_for(tokenizer)
    assert not encoder.exact
    text = "a b  <|x|>  ab abc"
    assert encoder.encode(text) == tokenizer.encode(text, add_special_tokens=False).ids
    assert encoder.cache.stats().misses == 0  # never consulted


def test_split_special_tokens_turns_the_cache_off() -> None:
    tokenizer = char_tokenizer()
    tokenizer.add_special_tokens([AddedToken("<|x|>", normalized=False)])
    tokenizer.encode_special_tokens = True
    assert not encoder_for(tokenizer).exact


def test_position_dependent_pre_tokenizer_is_caught_by_the_probes() -> None:
    # Metaspace "first" prepends "▁" to the start of the input only: a piece encoded alone
    # would get one it does not get in place.
    first = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer = char_tokenizer(AddedToken("<|x|>", normalized=False), pre_tokenizer=first)
    apart = tokenizer.encode("y").ids
    assert tokenizer.encode("y<|x|>y").ids != [*apart, tokenizer.token_to_id("<|x|>"), *apart]
    encoder = encoder_for(tokenizer)
    assert not encoder.exact
    assert encoder.encode("y<|x|>y") == tokenizer.encode("y<|x|>y").ids

    always = pre_tokenizers.Metaspace(prepend_scheme="always")
    assert encoder_for(char_tokenizer(pre_tokenizer=always)).exact


def test_special_tokens_wrap_is_learnt_from_the_post_processor() -> None:
    tokenizer = char_tokenizer()
    tokenizer.add_special_tokens([AddedToken("[BOS]"), AddedToken("[EOS]")])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]",
        special_tokens=[
            ("[BOS]", tokenizer.token_to_id("[BOS]")),
            ("[EOS]", tokenizer.token_to_id("[EOS]")),
        ],
    )
    encoder = encoder_for(tokenizer)
    for text in ("ab", "", "x[BOS]y"):
        expected = tokenizer.encode(text, add_special_tokens=True).ids
        assert encoder.encode(text, add_special_tokens=True) == expected
    assert encoder.cache.stats().hits + encoder.cache.stats().misses > 0


def test_qwen3_uses_the_cache(qwen3: ModelTokenizer) -> None:
    assert qwen3.segment_cache_exact
    text = "<|im_start|>segment cache probe 7f3a<|im_end|>and 9b1c"
    before = qwen3.cache_stats()
    qwen3.encode(text)
    qwen3.encode(text)
    after = qwen3.cache_stats()
    assert after.hits - before.hits == after.misses - before.misses == 2
    assert after.cached_bytes > before.cached_bytes


def test_shared_between_threads(qwen3: ModelTokenizer) -> None:
    texts = [
        f"<|im_start|>user\nthread {i % 7} says {'hello ' * (i % 5)}<|im_end|>\n<think>{i}</think>"
        for i in range(200)
    ]
    expected = [qwen3.encode_cold(text) for text in texts]
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(qwen3.encode, texts)) == expected


# -- plans: the cheap half on the event loop, the encoding in a thread ----------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=CHARS, max_size=12), max_size=6), st.booleans())
def test_a_plan_finishes_with_the_ids_of_plain_encoding(texts: list[str], special: bool) -> None:
    tokenizer = char_tokenizer(*OVERLAPPING)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[UNK] $A [UNK]", special_tokens=[("[UNK]", 0)]
    )
    encoder = encoder_for(tokenizer)
    for text in texts:
        plan = encoder.plan(text, add_special_tokens=special)
        pieces, _ = AddedTokenSplitter(
            {t.content: tokenizer.token_to_id(t.content) for t in OVERLAPPING}
        ).split(text)
        uncached = {p for p in pieces if p and encoder.cache.get_many([p]) == [None]}
        if not special:  # (this post-processor's wrap is ambiguous: encoded whole, uncached)
            assert plan.missing_chars == sum(len(p) for p in pieces if p in uncached)
        assert plan.finish() == tokenizer.encode(text, add_special_tokens=special).ids
        if not special:
            # Finished, the plan's pieces are cached: the same text again leaves nothing.
            assert encoder.plan(text, add_special_tokens=special).missing_chars == 0


def test_without_the_cache_a_plan_encodes_the_whole_text() -> None:
    tokenizer = char_tokenizer(AddedToken("ab", lstrip=True))
    encoder = encoder_for(tokenizer)
    plan = encoder.plan("xabab", add_special_tokens=False)
    assert plan.missing_chars == 5
    assert plan.finish() == tokenizer.encode("xabab", add_special_tokens=False).ids


def test_routing_plans_match_tokenize_request(qwen3: ModelTokenizer) -> None:
    system = "You route requests to the worker that caches their prefix. " * 20
    chat = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]}
    bodies: list[tuple[dict[str, Any], Any]] = [
        (chat, "chat"),
        ({"prompt": "plan a completion " * 30, "truncate_prompt_tokens": 20}, "completions"),
        ({"prompt": [1, 2, 3, 4]}, "completions"),
    ]
    for body, kind in bodies:
        routed = qwen3.plan_for_routing(body, kind).finish()
        assert routed.complete and routed.tokens == qwen3.tokenize_request(body, kind)
    # The system prompt is cached now: a new question leaves only itself to encode.
    follow_up = {"messages": [*chat["messages"][:1], {"role": "user", "content": "a new one"}]}
    plan = qwen3.plan_for_routing(follow_up, "chat")
    assert 0 < plan.missing_chars < 40
    assert plan.finish().tokens == qwen3.tokenize_request(follow_up, "chat")
    assert qwen3.plan_for_routing({"prompt": [5, 6]}, "completions").missing_chars == 0
    embeds = qwen3.plan_for_routing({"prompt_embeds": "AAAA"}, "completions")
    assert embeds.missing_chars == 0 and not embeds.finish().complete
    with pytest.raises(ValueError, match="unknown request kind"):
        qwen3.plan_for_routing(chat, "embeddings")  # type: ignore[arg-type]


# -- long pieces cut at line starts -------------------------------------------------------


def test_a_long_message_reuses_the_lines_it_opens_with(qwen3: ModelTokenizer) -> None:
    # A RAG-style message: a shared document pasted before each question, all in one piece.
    document = "".join(
        f"Section {i}: the router keeps {i * 7} blocks warm.\nIt says why, twice.\n\n"
        for i in range(120)
    )
    first = {"messages": [{"role": "user", "content": document + "What is cached?"}]}
    second = {"messages": [{"role": "user", "content": document + "Which worker, then?"}]}
    assert qwen3.tokenize_chat(first) == qwen3.tokenize_chat(first, cached=False)
    plan = qwen3.plan_for_routing(second, "chat")
    # Only the last chunk (the document's tail and the new question) is left to encode.
    assert 0 < plan.missing_chars < 2 * 1024 + 100 < len(document) // 3
    assert plan.finish().tokens == qwen3.tokenize_chat(second, cached=False)


def test_qwen3_cuts_lines_and_a_joining_tokenizer_does_not(qwen3: ModelTokenizer) -> None:
    assert qwen3._encoder.cuts_lines
    # No pre-tokenizer: the whole piece is one word, so cutting it would change its ids.
    whole = Tokenizer(models.WordLevel({"[UNK]": 0, "a\nb": 1}, unk_token="[UNK]"))
    encoder = SegmentEncoder(whole, SegmentCache(), 2, line_chunk_chars=1)
    assert encoder.exact and not encoder.cuts_lines
    assert encoder.encode("a\nb") == whole.encode("a\nb", add_special_tokens=False).ids == [1]
    # One token per character: cuts are exact, and the lines a text opens with are reused.
    chars = SegmentEncoder(char_tokenizer(), SegmentCache(), 20, line_chunk_chars=2)
    assert chars.cuts_lines
    chars.encode("aaaa\nbbbb\ncccc")
    assert chars.plan("aaaa\nbbbb\ndddd").missing_chars == len("dddd")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text(alphabet=CHARS + "\n ", max_size=30), max_size=5),
    st.integers(1, 6),
)
def test_cut_plans_finish_with_the_ids_of_plain_encoding(texts: list[str], chunk: int) -> None:
    tokenizer = char_tokenizer(*OVERLAPPING)
    encoder = SegmentEncoder(tokenizer, SegmentCache(), tokenizer.get_vocab_size(),
                             line_chunk_chars=chunk)  # fmt: skip
    assert encoder.cuts_lines
    for text in texts:
        assert encoder.plan(text).finish() == tokenizer.encode(text, add_special_tokens=False).ids
        assert encoder.plan(text).missing_chars == 0  # every cut piece was cached
