"""/v1/completions prompts: text tokenized without a template, token ids passed through."""

from __future__ import annotations

from typing import Any

import pytest

from kvgate.tokens import ModelTokenizer, RequestError
from tests.tokens.chat_cases import LONG_TEXT

PROMPTS = [
    pytest.param("Hello, world!", id="plain"),
    pytest.param("", id="empty"),
    pytest.param(" leading space", id="leading-space"),
    pytest.param("<|im_start|>user\nraw chat markup<|im_end|>\n", id="chat-markup-typed"),
    pytest.param("<think>a</think><tool_call>", id="non-special-added-tokens"),
    pytest.param("cafe\u0301 日本語 🙂 مرحبا", id="unicode"),
    pytest.param("def f(x):\n    return x ** 2\n\n\n", id="code"),
    pytest.param(LONG_TEXT, id="very-long"),
]


@pytest.mark.parametrize("add_special_tokens", [True, False], ids=["special", "no-special"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_text_prompt_matches_transformers(
    qwen3: ModelTokenizer, hf_qwen3: Any, prompt: str, add_special_tokens: bool
) -> None:
    expected = hf_qwen3(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    body = {"prompt": prompt, "add_special_tokens": add_special_tokens}
    assert qwen3.tokenize_completion(body, cached=False) == expected
    assert qwen3.tokenize_completion(body) == expected
    assert qwen3.tokenize_completion(body) == expected


def test_add_special_tokens_defaults_to_true(qwen3: ModelTokenizer, hf_qwen3: Any) -> None:
    assert qwen3.tokenize_completion({"prompt": "hi"}) == hf_qwen3("hi")["input_ids"]


def test_token_ids_pass_through(qwen3: ModelTokenizer) -> None:
    ids = [151644, 872, 198, 0, qwen3.vocab_size - 1]
    assert qwen3.tokenize_completion({"prompt": ids}) == ids
    assert qwen3.tokenize_completion({"prompt": ids, "add_special_tokens": True}) == ids


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        pytest.param(["only"], "only", id="one-string-in-a-list"),
        pytest.param(["first", "second"], "first", id="batch-of-strings-routes-on-first"),
        pytest.param([[1, 2, 3]], [1, 2, 3], id="one-id-list-in-a-list"),
        pytest.param([[4, 5], [6]], [4, 5], id="batch-of-id-lists-routes-on-first"),
    ],
)
def test_list_prompts(qwen3: ModelTokenizer, prompt: Any, expected: Any) -> None:
    if isinstance(expected, str):
        expected = qwen3.encode(expected)
    assert qwen3.tokenize_completion({"prompt": prompt, "add_special_tokens": False}) == expected


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param({"truncate_prompt_tokens": 2}, [3, 4], id="keeps-last-n-by-default"),
        pytest.param(
            {"truncate_prompt_tokens": 2, "truncation_side": "right"},
            [1, 2],
            id="right-keeps-first",
        ),
        pytest.param({"truncate_prompt_tokens": 9}, [1, 2, 3, 4], id="longer-than-prompt"),
        pytest.param({"truncate_prompt_tokens": 0}, [], id="zero"),
        pytest.param({"truncate_prompt_tokens": -1}, [1, 2, 3, 4], id="minus-one-left-to-engine"),
    ],
)
def test_truncate_prompt_tokens(
    qwen3: ModelTokenizer, extra: dict[str, Any], expected: list[int]
) -> None:
    assert qwen3.tokenize_completion({"prompt": [1, 2, 3, 4], **extra}) == expected


def test_truncation_applies_to_chat(qwen3: ModelTokenizer) -> None:
    body = {"messages": [{"role": "user", "content": "hello there"}]}
    full = qwen3.tokenize_chat(body)
    assert qwen3.tokenize_chat({**body, "truncate_prompt_tokens": 3}) == full[-3:]


@pytest.mark.parametrize(
    ("body", "field", "needle"),
    [
        pytest.param({}, "prompt", "required", id="missing"),
        pytest.param({"prompt": None, "prompt_embeds": "abc"}, "prompt_embeds", "embeddings",
                     id="embeds-only"),
        pytest.param({"prompt": 12}, "prompt", "got int", id="bare-int"),
        pytest.param({"prompt": {"text": "x"}}, "prompt", "got dict", id="object"),
        pytest.param({"prompt": []}, "prompt", "non-empty", id="empty-list"),
        pytest.param({"prompt": [[]]}, "prompt[0]", "non-empty", id="empty-inner-list"),
        pytest.param({"prompt": [1, "a"]}, "prompt[1]", "got str", id="mixed-ids-and-text"),
        pytest.param({"prompt": [1, True]}, "prompt[1]", "got boolean", id="bool-is-not-an-id"),
        pytest.param({"prompt": [1.5]}, "prompt[0]", "got float", id="float-id"),
        pytest.param({"prompt": ["a", 1]}, "prompt[1]", "got int", id="mixed-batch"),
        pytest.param({"prompt": [[1], "a"]}, "prompt[1]", "got str", id="mixed-id-batch"),
        pytest.param({"prompt": [[1, "x"]]}, "prompt[0][1]", "got str", id="text-in-id-list"),
        pytest.param({"prompt": [None]}, "prompt[0]", "got null", id="null-item"),
        pytest.param({"prompt": [-1]}, "prompt[0]", "outside the vocabulary", id="negative-id"),
        pytest.param({"prompt": [151669]}, "prompt[0]", "outside the vocabulary", id="id-too-big"),
        pytest.param({"prompt": [[0, 10**9]]}, "prompt[0][1]", "outside", id="id-too-big-batch"),
        pytest.param({"prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens",
                     "boolean", id="add-special-tokens-not-bool"),
        pytest.param({"prompt": "x", "truncate_prompt_tokens": -2}, "truncate_prompt_tokens",
                     ">= -1", id="truncate-below-minus-one"),
        pytest.param({"prompt": "x", "truncate_prompt_tokens": "3"}, "truncate_prompt_tokens",
                     "integer", id="truncate-not-int"),
        pytest.param({"prompt": "x", "truncate_prompt_tokens": 1, "truncation_side": "middle"},
                     "truncation_side", "'left' or 'right'", id="bad-truncation-side"),
    ],
)  # fmt: skip
def test_malformed_completion_bodies(
    qwen3: ModelTokenizer, body: dict[str, Any], field: str, needle: str
) -> None:
    with pytest.raises(RequestError) as caught:
        qwen3.tokenize_completion(body)
    assert caught.value.field == field
    assert needle in str(caught.value)
    assert str(caught.value).startswith(f"{field}: ")
