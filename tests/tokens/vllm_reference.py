"""What vLLM 0.33 hands to ``transformers.apply_chat_template`` for a chat body.

Written for the parity tests from vLLM's source (``renderers/chat_utils/chat_message.py``,
``renderers/hf.py``, ``chat_completion/protocol.py``), separately from kvgate's implementation:
transformers then renders and tokenizes, so the expected ids never come from kvgate's code.
Covers the request shapes the parity cases use, not every corner.
"""

from __future__ import annotations

import json
from typing import Any

TEXT_KEYS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}


def _text_of(content: Any, role: str) -> str:
    if content is None:
        return ""
    parts = [content] if isinstance(content, str) else content
    texts = []
    for part in parts:
        if isinstance(part, str):
            text, plain = part, True
        else:
            text, plain = part.get(TEXT_KEYS[part["type"]]), part["type"] == "text"
        if role == "system" and plain and text and text.startswith("x-anthropic-billing-header"):
            text = text.split("\n", 1)[1] if "\n" in text else ""
        if text:
            texts.append(text)
    return "\n".join(texts)


def _parts_of(content: Any) -> list[dict[str, Any]]:
    """The "openai" content format: text parts as dicts, empty ones kept, extra keys passed on."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
        else:
            extra = {k: v for k, v in part.items() if k not in ("type", *TEXT_KEYS.values())}
            parts.append({"type": "text", "text": part.get(TEXT_KEYS[part["type"]]), **extra})
    return parts


def _arguments(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    try:
        parsed = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def conversation(
    body: dict[str, Any], template: str, content_format: str = "string"
) -> list[dict[str, Any]]:
    out = []
    for message in body["messages"]:
        role = message["role"]
        content: Any = _text_of(message.get("content"), role)
        if content_format == "openai":
            content = _parts_of(message.get("content"))
            if role == "tool":
                content = "\n".join(part["text"] for part in content)
        new: dict[str, Any] = {"role": role, "content": content}
        reasoning = message.get("reasoning", message.get("reasoning_content"))
        if role == "assistant":
            if message.get("tool_calls"):
                new["tool_calls"] = [
                    {
                        **call,
                        "function": {
                            **call["function"],
                            "arguments": _arguments(call["function"].get("arguments")),
                        },
                    }
                    for call in message["tool_calls"]
                ]
            if reasoning is not None:
                new["reasoning"] = new["reasoning_content"] = reasoning
        if role == "tool" and "tool_call_id" in message:
            new["tool_call_id"] = message["tool_call_id"]
        if isinstance(message.get("name"), str):
            new["name"] = message["name"]
        out.append(new)
    if any(m["role"] == "developer" for m in out) and "developer" not in template:
        for m in out:
            if m["role"] == "developer":
                m["role"] = "system"
        systems = [i for i, m in enumerate(out) if m["role"] == "system"]
        if systems and systems != [0]:
            texts = [
                "\n".join(p["text"] for p in c) if isinstance(c, list) else c
                for c in (out[i]["content"] for i in systems)
            ]
            merged = "\n\n".join(text for text in texts if text)
            out = [{"role": "system", "content": merged}] + [
                m for m in out if m["role"] != "system"
            ]
    return out


def tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    if body.get("tools") is None:
        return None
    return [
        {
            "type": "function",
            "function": {
                "name": tool["function"]["name"],
                "description": tool["function"].get("description"),
                "parameters": tool["function"].get("parameters"),
            },
        }
        for tool in body["tools"]
    ]


def template_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(body.get("chat_template_kwargs") or {})
    effort = body.get("reasoning_effort")
    if effort is not None:
        kwargs["reasoning_effort"] = effort
        kwargs.setdefault("enable_thinking", effort != "none")
    kwargs["add_generation_prompt"] = body.get("add_generation_prompt", True)
    kwargs["continue_final_message"] = body.get("continue_final_message", False)
    if body.get("documents") is not None:
        kwargs["documents"] = body["documents"]
    if body.get("chat_template") is not None:
        kwargs["chat_template"] = body["chat_template"]
    return kwargs


def render(hf_tokenizer: Any, body: dict[str, Any], content_format: str = "string") -> str:
    """The prompt text transformers renders for what vLLM passes it."""
    template = body.get("chat_template") or hf_tokenizer.chat_template
    text: str = hf_tokenizer.apply_chat_template(
        conversation(body, template, content_format),
        tools=tools(body),
        tokenize=False,
        **template_kwargs(body),
    )
    return text


def token_ids(hf_tokenizer: Any, body: dict[str, Any]) -> list[int]:
    """vLLM's prompt ids: the rendered text, encoded without special tokens."""
    add_special = body.get("add_special_tokens", False)
    ids: list[int] = hf_tokenizer(render(hf_tokenizer, body), add_special_tokens=add_special)[
        "input_ids"
    ]
    return ids
