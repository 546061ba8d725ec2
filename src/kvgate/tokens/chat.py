"""A ``/v1/chat/completions`` body turned into the prompt text vLLM would render for it.

vLLM (0.33) does not hand the OpenAI messages to the chat template as they come; it first
normalises them, and every step changes the prompt:

- a message's content becomes one string: a list of parts is reduced to its text parts (``text``,
  ``input_text``, ``output_text``, ``refusal``, ``thinking``, ``tool_reference``), empty ones
  dropped, joined with ``"\\n"``; no content at all becomes ``""``. This is the "string" content
  format, the one text templates such as Qwen3's read. A template that loops over a message's
  content (see :func:`~kvgate.tokens.template.detect_content_format`) gets the "openai" format
  instead: a list of ``{"type": "text", "text": ...}`` parts, empty ones kept, and a tool
  message's text parts joined into a string;
- a system message's leading ``x-anthropic-billing-header`` line (a per-request nonce Claude Code
  sends) is dropped, so that it does not defeat prefix caching;
- an assistant message keeps ``tool_calls`` (an empty list is dropped), each call's
  ``function.arguments`` JSON string parsed into an object (``{}`` when empty, invalid or not an
  object), and its ``reasoning`` (or the older ``reasoning_content``) under both names;
- a tool message keeps ``tool_call_id``; any message keeps a string ``name`` and ``task``;
- ``tools`` are re-serialised by pydantic: ``{"type": "function", "function": {"name",
  "description", "parameters", ["strict"], ["defer_loading"]}, ["defer_loading"]}`` with a missing
  description or parameters rendered as ``null``, unknown keys dropped;
- if the template never mentions a ``developer`` role, developer messages become system messages
  and all system messages are merged, in order, into a first one (joined by a blank line).

The template variables are merged the way vLLM merges them (later wins, ``null`` and ``"auto"``
never override): the server's default ``chat_template_kwargs``, then ``tools``, then the request's
``chat_template_kwargs``, then its ``add_generation_prompt`` (default true),
``continue_final_message``, ``documents`` and ``reasoning_effort`` — which also sets
``enable_thinking`` unless the request set it. Then transformers adds the tokenizer's named special
tokens (``bos_token``, ``eos_token``, ...) under the request's variables.

Multimodal parts (images, audio, video, embeddings) cannot be rendered here: the placeholder tokens
the engine puts in their place depend on the model's processor and on the media themselves (an
image's size sets its token count), which kvgate neither loads nor downloads. Such a conversation
is still routed: :func:`render_chat_prefix` renders what precedes the *content* of the first
message holding a media part — identical in the engine's prompt whatever the media become, since
vLLM puts placeholders inside that content (in front of its text, or where the part is) — and the
router gives prefix credit for that much only. :func:`render_chat_body` refuses media, for callers
that need the whole prompt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kvgate.tokens.errors import RequestError, type_name
from kvgate.tokens.template import ContentFormat, detect_content_format, render_conversation

# The fields a content part's text is read from, by part type.
_TEXT_PART_FIELDS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
    "tool_reference": "name",
}
_MEDIA_PART_TYPES = frozenset(
    {
        "image_url",
        "input_image",
        "image_embeds",
        "image_pil",
        "audio_url",
        "input_audio",
        "audio_embeds",
        "video_url",
        "video_embeds",
        "prompt_embeds",
    }
)
# Every field of every content part type vLLM accepts; anything else is an extra field.
_KNOWN_PART_FIELDS = frozenset(
    {
        *_MEDIA_PART_TYPES,
        "type",
        "text",
        "refusal",
        "thinking",
        "closed",
        "name",
        "uuid",
        "data",
        "file",
        "detail",
    }
)
_BILLING_HEADER = "x-anthropic-billing-header"
# Arguments of apply_chat_template that it consumes itself: never template variables.
_CONSUMED_KWARGS = frozenset(
    {
        "tokenize",
        "return_dict",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "tokenizer_kwargs",
    }
)
# Arguments of apply_chat_template that only work when it tokenizes, which vLLM never asks for.
_TOKENIZE_ONLY_KWARGS = ("sanitize_control_tokens", "return_assistant_tokens_mask")
_CONVERSATION_KWARGS = ("conversation", "messages")


@dataclass(frozen=True, slots=True)
class ChatTemplates:
    """A model's chat templates: one unnamed, or several by name (``default``, ``tool_use``...)."""

    default: str | None = None
    named: Mapping[str, str] | None = None

    def resolve(self, requested: str | None, tools: list[dict[str, Any]] | None) -> str:
        """The template to render with, as transformers' ``get_chat_template`` chooses it.

        ``requested`` (a request's or the server's override) is a template name if the model has
        one by that name, else the template's text itself.
        """
        if self.named:
            if requested is not None:
                return self.named.get(requested, requested)
            if tools is not None and "tool_use" in self.named:
                return self.named["tool_use"]
            if "default" in self.named:
                return self.named["default"]
            raise RequestError(
                "chat_template",
                "the model has several chat templates and none is the default; name one of "
                f"{sorted(self.named)}",
            )
        if requested is not None:
            return requested
        if self.default is None:
            raise RequestError(
                "chat_template",
                "the model's tokenizer has no chat template; pass one in the request or configure "
                "kvgate with one",
            )
        return self.default


@dataclass(frozen=True, slots=True)
class ChatDefaults:
    """Server-side settings that shape every chat prompt (vLLM's flags of the same names)."""

    chat_template: str | None = None  # --chat-template: a template's text or name
    chat_template_kwargs: Mapping[str, Any] | None = None  # --default-chat-template-kwargs
    content_format: Literal["auto", "string", "openai"] = "auto"  # --chat-template-content-format


# Private-use characters: no prompt holds them, no chat template rewrites them.
_MEDIA_SENTINEL = "\ue000kvgate-media\ue001"


@dataclass(frozen=True, slots=True)
class RenderedChat:
    text: str
    complete: bool
    """False when the conversation holds media: ``text`` is then only what precedes the content
    of the first message with a media part."""


def render_chat_prefix(
    body: Mapping[str, Any],
    templates: ChatTemplates,
    special_tokens: Mapping[str, str],
    defaults: ChatDefaults,
) -> RenderedChat:
    """The prompt text vLLM renders for a chat body, or, when a message holds media, the part of
    it that precedes that message's content (see the module docstring)."""
    messages = body.get("messages")
    first = _first_media_message(messages) if isinstance(messages, list) else None
    if first is None:
        return RenderedChat(render_chat_body(body, templates, special_tokens, defaults), True)
    assert isinstance(messages, list)
    marked = [
        *messages[:first],
        {**messages[first], "content": [{"type": "text", "text": _MEDIA_SENTINEL}]},
        *(_without_media(message) for message in messages[first + 1 :]),
    ]
    text = render_chat_body({**body, "messages": marked}, templates, special_tokens, defaults)
    cut = text.find(_MEDIA_SENTINEL)
    # A template that drops the message's content leaves nothing known to be in the prompt.
    return RenderedChat(text[:cut] if cut >= 0 else "", False)


def _is_media_part(part: object) -> bool:
    if not isinstance(part, Mapping):
        return False
    kind = part.get("type")
    if kind is None:
        return any(key in part for key in _MEDIA_PART_TYPES)
    return kind in _MEDIA_PART_TYPES


def _first_media_message(messages: list[Any]) -> int | None:
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list) and any(_is_media_part(part) for part in content):
            return index
    return None


def _without_media(message: object) -> object:
    # Later messages only shape what comes after the cut; their media must not stop the render.
    if not isinstance(message, Mapping) or not isinstance(message.get("content"), list):
        return message
    return {**message, "content": [p for p in message["content"] if not _is_media_part(p)]}


def render_chat_body(
    body: Mapping[str, Any],
    templates: ChatTemplates,
    special_tokens: Mapping[str, str],
    defaults: ChatDefaults,
) -> str:
    """The prompt text vLLM renders for a chat completion request body."""
    tools = normalize_tools(body.get("tools"))
    kwargs = _template_kwargs(body, tools, defaults)

    tools = kwargs.pop("tools", None)
    requested = _optional_str(kwargs.pop("chat_template", None), "chat_template")
    template = templates.resolve(requested, tools)
    content_format = defaults.content_format
    if content_format == "auto":
        content_format = detect_content_format(template)
    conversation = normalize_messages(body.get("messages"), content_format)
    add_generation_prompt = _flag(
        kwargs.pop("add_generation_prompt", False), "add_generation_prompt"
    )
    continue_final_message = _flag(
        kwargs.pop("continue_final_message", False), "continue_final_message"
    )
    if continue_final_message and add_generation_prompt:
        raise RequestError(
            "continue_final_message",
            "cannot be combined with add_generation_prompt=true (its default); set "
            "add_generation_prompt to false to continue the final message",
        )
    documents = _documents(kwargs.pop("documents", None))
    for name in _TOKENIZE_ONLY_KWARGS:
        if kwargs.pop(name, False):
            raise RequestError(
                f"chat_template_kwargs.{name}",
                "only applies when the chat template's output is tokenized by transformers, "
                "which the engine never asks for",
            )
    for name in _CONVERSATION_KWARGS:
        if name in kwargs:
            raise RequestError(f"chat_template_kwargs.{name}", "cannot override the conversation")
    for name in _CONSUMED_KWARGS:
        kwargs.pop(name, None)

    # The conversation first: a search of the template's text costs more than a look at roles.
    if any(message["role"] == "developer" for message in conversation) and not (
        _mentions_developer_role(template)
    ):
        conversation = _merge_system_messages(_developer_to_system(conversation))

    return render_conversation(
        template,
        conversation,
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        variables={**special_tokens, **kwargs},
    )


def normalize_messages(
    raw: object, content_format: ContentFormat = "string"
) -> list[dict[str, Any]]:
    """The conversation vLLM builds from a request's ``messages`` (see the module docstring)."""
    if not isinstance(raw, list):
        raise RequestError("messages", f"expected a list of messages, got {type_name(raw)}")
    if not raw:
        raise RequestError("messages", "expected at least one message")
    return [
        _normalize_message(message, f"messages[{i}]", content_format)
        for i, message in enumerate(raw)
    ]


def _normalize_message(
    message: object, where: str, content_format: ContentFormat
) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise RequestError(where, f"expected a message object, got {type_name(message)}")
    role = message.get("role")
    if not isinstance(role, str):
        missing = "role" not in message
        raise RequestError(
            f"{where}.role",
            "is required" if missing else f"expected a string, got {type_name(role)}",
        )
    reasoning = message.get("reasoning")
    if reasoning is None:
        reasoning = message.get("reasoning_content")
    content: str | list[dict[str, Any]] | None = message.get("content")
    if not (
        # The common case, already in its final form.
        isinstance(content, str)
        and content_format == "string"
        and not (role == "system" and content.startswith(_BILLING_HEADER))
    ):
        content = _content(
            content, f"{where}.content", system=role == "system", form=content_format
        )
    out: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant":
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            if not isinstance(tool_calls, list):
                raise RequestError(
                    f"{where}.tool_calls", f"expected a list, got {type_name(tool_calls)}"
                )
            if tool_calls:
                out["tool_calls"] = [
                    _normalize_tool_call(call, f"{where}.tool_calls[{j}]")
                    for j, call in enumerate(tool_calls)
                ]
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise RequestError(
                    f"{where}.reasoning", f"expected a string, got {type_name(reasoning)}"
                )
            out["reasoning"] = reasoning
            out["reasoning_content"] = reasoning
    elif role == "tool":
        if "tool_call_id" in message:
            out["tool_call_id"] = message["tool_call_id"]
        if isinstance(content, list) and all(block["type"] == "text" for block in content):
            # Most templates only handle a tool result as a string.
            out["content"] = "\n".join(block["text"] or "" for block in content)
    for key in ("name", "task"):
        if isinstance(message.get(key), str):
            out[key] = message[key]
    if role == "developer":
        out["tools"] = message.get("tools")
    return out


def _content(
    content: object, where: str, *, system: bool, form: ContentFormat
) -> str | list[dict[str, Any]]:
    """A message's content in the template's format: the non-empty texts joined by newlines
    ("string"), or a list of text parts ("openai", where empty texts are kept)."""
    if content is None:
        parts: list[object] = []
    elif isinstance(content, str):
        parts = [content]
    elif isinstance(content, list):
        parts = content
    else:
        raise RequestError(
            where, f"expected a string or a list of content parts, got {type_name(content)}"
        )
    texts: list[str] = []
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        here = f"{where}[{j}]" if isinstance(content, list) else where
        kind, text = _part_text(part, here)
        if system and text and _is_plain_text(part) and text.startswith(_BILLING_HEADER):
            text = text.partition("\n")[2]
            if not text:
                continue
        if form == "string":
            if text:
                texts.append(text)
        elif kind == "tool_reference":
            blocks.append({"type": "tool_reference", "name": text})
        elif text is not None or kind not in ("text", "refusal"):
            blocks.append({"type": "text", "text": text, **_extra_fields(part)})
    return "\n".join(texts) if form == "string" else blocks


def _extra_fields(part: object) -> dict[str, Any]:
    # Fields no content part type defines (e.g. "cache_control") reach the template as given.
    if not isinstance(part, Mapping):
        return {}
    return {key: value for key, value in part.items() if key not in _KNOWN_PART_FIELDS}


def _is_plain_text(part: object) -> bool:
    return isinstance(part, str) or (isinstance(part, Mapping) and part.get("type") == "text")


def _part_text(part: object, where: str) -> tuple[str, str | None]:
    """A part's type and text; a plain string is a text part."""
    if isinstance(part, str):
        return "text", part
    if not isinstance(part, Mapping):
        raise RequestError(
            where, f"expected a string or a content part object, got {type_name(part)}"
        )
    kind = part.get("type")
    if kind is None:
        if any(key in part for key in _MEDIA_PART_TYPES):
            raise _multimodal(where)
        if "tool_reference" in part:
            kind = "tool_reference"
        else:
            raise RequestError(f"{where}.type", "is required")
    if not isinstance(kind, str):
        raise RequestError(f"{where}.type", f"expected a string, got {type_name(kind)}")
    field = _TEXT_PART_FIELDS.get(kind)
    if field is None:
        if kind in _MEDIA_PART_TYPES:
            raise _multimodal(where)
        supported = ", ".join(sorted(_TEXT_PART_FIELDS))
        raise RequestError(
            f"{where}.type", f"unsupported content part type {kind!r} (supported: {supported})"
        )
    text = part.get(field)
    if text is not None and not isinstance(text, str):
        raise RequestError(f"{where}.{field}", f"expected a string, got {type_name(text)}")
    return kind, text


def _multimodal(where: str) -> RequestError:
    return RequestError(
        where,
        "multimodal content is not supported: its placeholder tokens depend on the model's "
        "processor; kvgate tokenizes text-only requests",
    )


def _normalize_tool_call(call: object, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise RequestError(where, f"expected a tool call object, got {type_name(call)}")
    function = call.get("function")
    if call.get("type", "function") != "function" or not isinstance(function, Mapping):
        raise RequestError(where, "only tool calls of type 'function' with a 'function' object")
    name = function.get("name")
    if not isinstance(name, str):
        raise RequestError(f"{where}.function.name", f"expected a string, got {type_name(name)}")
    arguments = function.get("arguments")
    parsed: object = arguments
    if isinstance(arguments, str) and arguments:
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            # vLLM keeps such a conversation going rather than failing every later turn.
            parsed = None
    if not isinstance(parsed, dict):
        parsed = {}
    # A copy: the caller's body must not change under it.
    return {**call, "function": {**function, "arguments": parsed}}


def normalize_tools(raw: object) -> list[dict[str, Any]] | None:
    """``tools`` as vLLM's pydantic models dump them (see the module docstring)."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise RequestError("tools", f"expected a list of tools, got {type_name(raw)}")
    if not raw:
        raise RequestError("tools", "must not be an empty list (omit it instead)")
    return [_normalize_tool(tool, f"tools[{i}]") for i, tool in enumerate(raw)]


def _normalize_tool(tool: object, where: str) -> dict[str, Any]:
    if not isinstance(tool, Mapping):
        raise RequestError(where, f"expected a tool object, got {type_name(tool)}")
    if tool.get("type", "function") != "function":
        raise RequestError(f"{where}.type", f"expected 'function', got {tool.get('type')!r}")
    function = tool.get("function")
    if not isinstance(function, Mapping):
        raise RequestError(f"{where}.function", f"expected an object, got {type_name(function)}")
    name = function.get("name")
    if not isinstance(name, str):
        raise RequestError(f"{where}.function.name", f"expected a string, got {type_name(name)}")
    description = _optional_str(function.get("description"), f"{where}.function.description")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, Mapping):
        raise RequestError(
            f"{where}.function.parameters", f"expected an object, got {type_name(parameters)}"
        )
    dumped: dict[str, Any] = {
        "name": name,
        "description": description,
        "parameters": dict(parameters) if parameters is not None else None,
    }
    strict = _optional_bool(function.get("strict"), f"{where}.function.strict")
    if strict is not None:
        dumped["strict"] = strict
    outer_defer = _optional_bool(tool.get("defer_loading"), f"{where}.defer_loading")
    inner_defer = _optional_bool(function.get("defer_loading"), f"{where}.function.defer_loading")
    if inner_defer is None:
        inner_defer = outer_defer
    if inner_defer is not None:
        dumped["defer_loading"] = inner_defer
    out: dict[str, Any] = {"type": "function", "function": dumped}
    if outer_defer is not None:
        out["defer_loading"] = outer_defer
    return out


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    # vLLM's merge_kwargs: an override of null or "auto" means "not set" and keeps the base.
    return {
        **base,
        **{key: value for key, value in overrides.items() if value is not None and value != "auto"},
    }


def _template_kwargs(
    body: Mapping[str, Any], tools: list[dict[str, Any]] | None, defaults: ChatDefaults
) -> dict[str, Any]:
    user = body.get("chat_template_kwargs")
    if user is None:
        user = {}
    elif not isinstance(user, Mapping) or not all(isinstance(key, str) for key in user):
        raise RequestError("chat_template_kwargs", f"expected an object, got {type_name(user)}")
    effort = _optional_str(body.get("reasoning_effort"), "reasoning_effort")
    request: dict[str, Any] = {
        "add_generation_prompt": _flag(
            body.get("add_generation_prompt", True), "add_generation_prompt"
        ),
        "continue_final_message": _flag(
            body.get("continue_final_message", False), "continue_final_message"
        ),
        "documents": body.get("documents"),
        "reasoning_effort": effort,
    }
    if effort is not None and "enable_thinking" not in user:
        request["enable_thinking"] = effort != "none"
    server = _merge(defaults.chat_template_kwargs or {}, {"tools": tools})
    merged = _merge(server, _merge(user, request))
    template = _optional_str(body.get("chat_template"), "chat_template") or defaults.chat_template
    return _merge(merged, {"chat_template": template})


def _documents(raw: object) -> list[dict[str, Any]] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise RequestError("documents", f"expected a list of objects, got {type_name(raw)}")
    for i, document in enumerate(raw):
        if not isinstance(document, Mapping):
            raise RequestError(f"documents[{i}]", f"expected an object, got {type_name(document)}")
        for key, value in document.items():
            if not isinstance(value, str):
                raise RequestError(
                    f"documents[{i}].{key}", f"expected a string, got {type_name(value)}"
                )
    return [dict(document) for document in raw]


def _mentions_developer_role(template: str) -> bool:
    return '"developer"' in template or "'developer'" in template


def _developer_to_system(conversation: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {**{key: value for key, value in message.items() if key != "tools"}, "role": "system"}
        if message["role"] == "developer"
        else message
        for message in conversation
    ]


def _merge_system_messages(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One system message first, holding every system message's text (templates such as
    Qwen 3.6's accept a system message in first position only)."""
    system_texts: list[str] = []
    others: list[dict[str, Any]] = []
    scattered = False
    for index, message in enumerate(conversation):
        if message["role"] == "system":
            scattered = scattered or index > 0 or bool(system_texts)
            content = message["content"]
            if isinstance(content, list):
                content = "\n".join(block["text"] or "" for block in content if "text" in block)
            if content:
                system_texts.append(content)
        else:
            others.append(message)
    if not scattered:
        return conversation
    return [{"role": "system", "content": "\n\n".join(system_texts)}, *others]


def _flag(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(field, f"expected a boolean, got {type_name(value)}")
    return value


def _optional_bool(value: object, field: str) -> bool | None:
    if value is None:
        return None
    return _flag(value, field)


def _optional_str(value: object, field: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise RequestError(field, f"expected a string, got {type_name(value)}")
    return value
