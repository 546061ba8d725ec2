"""Malformed chat bodies fail with a RequestError that names the offending field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvgate.tokens import ModelTokenizer, RequestError

USER = {"role": "user", "content": "q"}
RAISING_TEMPLATE = (
    "{% if messages | length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
)


def _assistant_call(call: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [call]}


BAD_BODIES = [
    pytest.param({}, "messages", "expected a list of messages, got null", id="no-messages"),
    pytest.param({"messages": "hi"}, "messages", "got str", id="messages-is-a-string"),
    pytest.param({"messages": []}, "messages", "at least one", id="no-message"),
    pytest.param({"messages": [USER, "hi"]}, "messages[1]", "message object, got str",
                 id="message-not-an-object"),
    pytest.param({"messages": [{"content": "x"}]}, "messages[0].role", "is required",
                 id="missing-role"),
    pytest.param({"messages": [{"role": 3, "content": "x"}]}, "messages[0].role",
                 "expected a string, got int", id="role-not-a-string"),
    pytest.param({"messages": [USER, USER, {"role": "user", "content": 5}]}, "messages[2].content",
                 "expected a string or a list of content parts, got int", id="content-int"),
    pytest.param({"messages": [{"role": "user", "content": {"text": "x"}}]}, "messages[0].content",
                 "got dict", id="content-object"),
    pytest.param({"messages": [{"role": "user", "content": [1]}]}, "messages[0].content[0]",
                 "got int", id="content-part-int"),
    pytest.param({"messages": [{"role": "user", "content": [{"text": "x"}]}]},
                 "messages[0].content[0].type", "is required", id="part-without-type"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": 1}]}]},
                 "messages[0].content[0].type", "got int", id="part-type-int"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}]},
                 "messages[0].content[0].text", "got int", id="part-text-int"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "hologram"}]}]},
                 "messages[0].content[0].type", "unsupported content part type 'hologram'",
                 id="unknown-part-type"),
    pytest.param({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
                 "messages[0].content[0]", "multimodal", id="image-part"),
    pytest.param({"messages": [{"role": "user", "content": [{"image_url": "http://x"}]}]},
                 "messages[0].content[0]", "multimodal", id="untyped-image-part"),
    pytest.param({"messages": [USER, {"role": "assistant", "tool_calls": "x"}]},
                 "messages[1].tool_calls", "expected a list", id="tool-calls-not-a-list"),
    pytest.param({"messages": [USER, _assistant_call("x")]}, "messages[1].tool_calls[0]",
                 "tool call object", id="tool-call-not-an-object"),
    pytest.param({"messages": [USER, _assistant_call({"type": "code", "function": {"name": "f"}})]},
                 "messages[1].tool_calls[0]", "type 'function'", id="tool-call-wrong-type"),
    pytest.param({"messages": [USER, _assistant_call({"function": {"arguments": "{}"}})]},
                 "messages[1].tool_calls[0].function.name", "got null", id="tool-call-no-name"),
    pytest.param({"messages": [USER, {"role": "assistant", "content": "a", "reasoning": 1}]},
                 "messages[1].reasoning", "got int", id="reasoning-not-a-string"),
    pytest.param({"messages": [USER], "tools": {}}, "tools", "got dict", id="tools-object"),
    pytest.param({"messages": [USER], "tools": []}, "tools", "empty", id="tools-empty"),
    pytest.param({"messages": [USER], "tools": [{"type": "retrieval"}]}, "tools[0].type",
                 "expected 'function'", id="tool-wrong-type"),
    pytest.param({"messages": [USER], "tools": [{"type": "function"}]}, "tools[0].function",
                 "got null", id="tool-without-function"),
    pytest.param({"messages": [USER], "tools": [{"function": {"description": "d"}}]},
                 "tools[0].function.name", "got null", id="tool-without-name"),
    pytest.param({"messages": [USER], "tools": [{"function": {"name": "f", "parameters": []}}]},
                 "tools[0].function.parameters", "got list", id="tool-parameters-list"),
    pytest.param({"messages": [USER], "add_generation_prompt": "yes"}, "add_generation_prompt",
                 "expected a boolean", id="generation-prompt-not-bool"),
    pytest.param({"messages": [USER], "continue_final_message": True}, "continue_final_message",
                 "add_generation_prompt", id="continue-with-generation-prompt"),
    pytest.param({"messages": [USER], "chat_template_kwargs": ["x"]}, "chat_template_kwargs",
                 "expected an object", id="kwargs-not-an-object"),
    pytest.param({"messages": [USER], "chat_template_kwargs": {"messages": []}},
                 "chat_template_kwargs.messages", "conversation", id="kwargs-override-messages"),
    pytest.param({"messages": [USER], "chat_template_kwargs": {"sanitize_control_tokens": True}},
                 "chat_template_kwargs.sanitize_control_tokens", "tokenized",
                 id="kwargs-tokenize-only-option"),
    pytest.param({"messages": [USER], "documents": "doc"}, "documents", "got str",
                 id="documents-not-a-list"),
    pytest.param({"messages": [USER], "documents": [{"text": 1}]}, "documents[0].text",
                 "got int", id="document-value-not-a-string"),
    pytest.param({"messages": [USER], "reasoning_effort": 2}, "reasoning_effort", "got int",
                 id="reasoning-effort-not-a-string"),
    pytest.param({"messages": [USER], "chat_template": 1}, "chat_template", "got int",
                 id="template-not-a-string"),
    pytest.param({"messages": [USER], "chat_template": "{% if %}"}, "chat_template",
                 "not a valid Jinja template", id="template-syntax-error"),
    pytest.param({"messages": [USER, USER], "chat_template": RAISING_TEMPLATE}, "messages",
                 "one message only", id="template-raise-exception"),
    pytest.param({"messages": [USER], "chat_template": "{{ messages[0].content.nope() }}"},
                 "messages", "rejected", id="template-type-error"),
    pytest.param({"messages": [USER], "chat_template": "{{ ().__class__.__base__ }}"},
                 "messages", "rejected", id="template-sandbox-escape"),
    pytest.param({"messages": [USER], "chat_template": "{% set ns = namespace(_x=1) %}"},
                 "messages", "underscore", id="template-namespace-underscore"),
    pytest.param({"messages": [{"role": "user", "content": "hello world"}],
                  "add_generation_prompt": False, "continue_final_message": True,
                  "chat_template": "{{ messages[0].content[:5] }}"},
                 "continue_final_message", "verbatim", id="continue-template-drops-content"),
    pytest.param({"messages": [USER], "add_generation_prompt": False,
                  "continue_final_message": True, "chat_template": "{{ messages | length }}"},
                 "continue_final_message", "never reads", id="continue-template-without-content"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "field", "needle"), BAD_BODIES)
def test_malformed_chat_bodies(
    qwen3: ModelTokenizer, body: dict[str, Any], field: str, needle: str
) -> None:
    with pytest.raises(RequestError) as caught:
        qwen3.tokenize_chat(body)
    assert caught.value.field == field
    assert needle in caught.value.reason
    assert str(caught.value) == f"{field}: {caught.value.reason}"


def test_request_error_is_a_value_error(qwen3: ModelTokenizer) -> None:
    with pytest.raises(ValueError, match="messages"):
        qwen3.tokenize_chat({"messages": None})


@pytest.mark.parametrize("body", [None, [], "text", 3], ids=["null", "list", "string", "int"])
def test_body_must_be_an_object(qwen3: ModelTokenizer, body: Any) -> None:
    with pytest.raises(RequestError) as caught:
        qwen3.tokenize_request(body, "chat")
    assert caught.value.field == "body"


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_a_lone_surrogate_is_a_request_error(qwen3: ModelTokenizer, kind: str) -> None:
    # Found by the ext_proc fuzzer: JSON's "\ud800" decodes to a str no tokenizer takes, and the
    # tokenizers library's TypeError became the picker's 500.
    text = json.loads('"tell me \\ud800 more"')
    body = {"messages": [{"role": "user", "content": text}]} if kind == "chat" else {"prompt": text}
    for tokenize in (qwen3.tokenize_request, qwen3.tokenize_for_routing):
        with pytest.raises(RequestError) as caught:
            tokenize(body, kind)  # type: ignore[arg-type]
        assert caught.value.field == ("messages" if kind == "chat" else "prompt")
        assert "lone surrogate" in caught.value.reason
