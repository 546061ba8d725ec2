"""Property tests: the segment cache never changes a token, cold or warm, for any text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvgate.tokens import ModelTokenizer, TokenizerConfig
from tests.tokens import vllm_reference

QWEN3_ADDED = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|box_end|>",
    "<|vision_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>",
]  # fmt: skip
FRAGMENTS = [
    "<|", "|>", "<|im_", "im_end|>", "<", ">", "</", "think", "<think", "tool_", " ", "  ",
    "\n", "\n\n", "\r\n", "\t", "\u0301", "\u200b", "e\u0301", "A\u030a", "\u212b", "🙂",
    "👩‍👩‍👧", "日本", "'s", "'re", "123", "x",
]  # fmt: skip

chunks = st.one_of(
    st.text(max_size=12),
    st.sampled_from(QWEN3_ADDED),
    st.sampled_from(FRAGMENTS),
)
texts = st.lists(chunks, max_size=24).map("".join)


@pytest.fixture(scope="module")
def small_cache(qwen3_dir: Path) -> ModelTokenizer:
    """A cache a few entries big, so that examples also run through evictions and bypasses, and
    cuts at every line start of a piece longer than 4 characters."""
    return ModelTokenizer.load(
        qwen3_dir,
        config=TokenizerConfig(cache_max_bytes=2048, cache_max_piece_chars=24, line_chunk_chars=2),
    )


@settings(max_examples=400, deadline=None)
@given(text=texts, add_special_tokens=st.booleans())
def test_cached_encode_equals_cold(
    qwen3: ModelTokenizer, small_cache: ModelTokenizer, text: str, add_special_tokens: bool
) -> None:
    cold = qwen3.encode_cold(text, add_special_tokens=add_special_tokens)
    for tokenizer in (qwen3, small_cache):
        assert tokenizer.encode(text, add_special_tokens=add_special_tokens) == cold
        assert tokenizer.encode(text, add_special_tokens=add_special_tokens) == cold  # warm
    assert small_cache.cache_stats().cached_bytes <= 2048


@settings(max_examples=100, deadline=None)
@given(prefix=texts, suffix=texts)
def test_extending_a_cached_text_equals_cold(
    qwen3: ModelTokenizer, prefix: str, suffix: str
) -> None:
    qwen3.encode(prefix)
    extended = prefix + suffix
    assert qwen3.encode(extended) == qwen3.encode_cold(extended)


contents = st.one_of(st.none(), texts, st.lists(texts, max_size=3))
arguments = st.one_of(
    st.just("{}"),
    st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), texts), max_size=3),
    st.just("not json"),
)


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    role = draw(st.sampled_from(["user", "assistant", "tool", "system"]))
    content: Any = draw(contents)
    if isinstance(content, list):
        content = [{"type": "text", "text": text} for text in content]
    message: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant":
        if draw(st.booleans()):
            message["reasoning_content"] = draw(texts)
        if draw(st.booleans()):
            message["tool_calls"] = [
                {"id": "c", "type": "function", "function": {"name": draw(texts), "arguments": a}}
                for a in draw(st.lists(arguments, min_size=1, max_size=2))
            ]
    return message


@st.composite
def chat_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": draw(st.lists(messages(), min_size=1, max_size=6))}
    if draw(st.booleans()):
        body["chat_template_kwargs"] = {"enable_thinking": draw(st.booleans())}
    if draw(st.booleans()):
        body["add_generation_prompt"] = False
    if draw(st.booleans()):
        body["tools"] = [{"type": "function", "function": {"name": draw(texts)}}]
    return body


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=chat_bodies())
def test_chat_cached_equals_cold_equals_transformers(
    qwen3: ModelTokenizer, hf_qwen3: Any, body: dict[str, Any]
) -> None:
    expected = vllm_reference.token_ids(hf_qwen3, body)
    assert qwen3.tokenize_chat(body, cached=False) == expected
    assert qwen3.tokenize_chat(body) == expected
    assert qwen3.tokenize_chat(body) == expected
