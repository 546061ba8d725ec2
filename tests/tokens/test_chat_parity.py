"""kvgate's chat prompts against transformers rendering what vLLM hands it (the engine's path)."""

from __future__ import annotations

from typing import Any

import pytest

from kvgate.tokens import ModelTokenizer
from tests.tokens import vllm_reference
from tests.tokens.chat_cases import CASES


@pytest.mark.parametrize("body", CASES)
def test_render_matches_transformers(
    qwen3: ModelTokenizer, hf_qwen3: Any, body: dict[str, Any]
) -> None:
    assert qwen3.render_chat(body) == vllm_reference.render(hf_qwen3, body)


@pytest.mark.parametrize("body", CASES)
def test_token_ids_match_transformers(
    qwen3: ModelTokenizer, hf_qwen3: Any, body: dict[str, Any]
) -> None:
    expected = vllm_reference.token_ids(hf_qwen3, body)
    assert qwen3.tokenize_chat(body, cached=False) == expected
    assert qwen3.tokenize_chat(body) == expected  # cold cache
    assert qwen3.tokenize_chat(body) == expected  # warm cache


def test_case_count() -> None:
    assert len(CASES) >= 50


def test_apply_chat_template_tokenize_true_agrees(hf_qwen3: Any) -> None:
    # vLLM renders to text and encodes it itself; transformers' own tokenize=True path is the
    # same (it also encodes without special tokens), so either is a valid reference.
    body = {"messages": [{"role": "user", "content": "hi <|im_start|> <think>"}]}
    messages = vllm_reference.conversation(body, hf_qwen3.chat_template)
    direct = hf_qwen3.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=True
    )
    assert direct == vllm_reference.token_ids(hf_qwen3, body)


def test_request_body_is_not_modified(qwen3: ModelTokenizer) -> None:
    body = {
        "messages": [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
                "reasoning_content": "r",
            },
        ],
        "chat_template_kwargs": {"enable_thinking": False},
    }
    snapshot = repr(body)
    qwen3.tokenize_chat(body)
    assert repr(body) == snapshot
