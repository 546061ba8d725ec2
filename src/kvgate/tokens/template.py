"""Chat templates rendered the way ``transformers``' ``apply_chat_template`` renders them.

Engines (vLLM, SGLang) render through transformers, so kvgate must reproduce its Jinja dialect to
the character: a sandboxed, immutable environment with ``trim_blocks`` and ``lstrip_blocks``, loop
controls, the ``{% generation %}`` block some templates use to mark assistant turns, and these
additions to Jinja's globals and filters:

- ``tojson``: ``json.dumps`` with ``ensure_ascii=False`` and no HTML escaping (Jinja's own escapes
  ``<``, ``>``, ``&`` and ``'``, which would change the prompt), taking ``indent``, ``separators``
  and ``sort_keys``;
- ``raise_exception(message)``: a template's way to reject its input;
- ``strftime_now(format)``: the local date and time (Llama 3's templates print today's date);
- ``dict`` and a ``namespace`` that refuses underscore-prefixed attribute names.

The message preparation transformers does before rendering is here too: keys whose value is null
are dropped, a message's reasoning is copied under ``thinking`` and ``reasoning_content``, and
``continue_final_message`` leaves the last message open.

Thread-safety: compiled templates are cached in a bounded ``lru_cache`` and are safe to render
from several threads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from kvgate.tokens.errors import RequestError

# Requests may carry their own template; bound how many compiled ones are kept.
_COMPILED_TEMPLATES = 32
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body (the span is only used for
    training masks). Kept as a call block, as transformers does, so that variables set inside
    stay inside."""

    tags = {"generation"}  # noqa: RUF012 - Jinja reads this class attribute

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_body")
        return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> Any:
        return caller()


class _Namespace(Namespace):
    """Jinja's ``namespace``, refusing names that could reach CPython internals."""

    # No named `self`, as in Jinja's own, so that a template may call namespace(self=...).
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        Namespace.__setitem__(self, name, value)


def _check_namespace_name(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}"
        )


class _DictFactory:
    """``dict(...)`` and ``dict.fromkeys(...)`` without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(date_format: str) -> str:
    return datetime.now().strftime(date_format)


# A dict instance has no attributes of its own: `getattr` fails for any name but these.
_DICT_ATTRIBUTES = frozenset(dir(dict))
# str methods the sandbox allows as they are (it wraps format and format_map).
_STR_METHODS = frozenset(
    name for name in dir(str) if not name.startswith("_") and name not in ("format", "format_map")
)


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, with fast paths for the attribute reads chat templates are made of.

    ``message.content`` on a dict, ``content.startswith`` on a str, ``loop.last`` and
    ``ns.flag`` account for nearly all attribute reads; the sandbox's generic checks (an
    ``AttributeError`` raised and caught, isinstance tests against the mutable ABCs) made them
    most of a render's cost. Each path returns exactly what the sandbox would for these exact
    types: a dict key when the name is no dict attribute; a str method that neither starts with
    ``_`` nor needs the sandbox's ``format`` wrapper; any public attribute of a loop or namespace
    (neither is a mutable container nor a callable, the sandbox's only other concerns).
    """

    def getattr(self, obj: Any, attribute: str) -> Any:
        kind = type(obj)
        if kind is dict and attribute not in _DICT_ATTRIBUTES:
            if attribute in obj:
                return obj[attribute]
            return self.undefined(obj=obj, name=attribute)
        if kind is str and attribute in _STR_METHODS:
            return getattr(obj, attribute)
        if (kind is LoopContext or kind is _Namespace) and not attribute.startswith("_"):
            try:
                value = getattr(obj, attribute)
            except AttributeError:
                return self.undefined(obj=obj, name=attribute)
            wrapped = self.wrap_str_format(value)
            return value if wrapped is None else wrapped
        return super().getattr(obj, attribute)


def _environment() -> ImmutableSandboxedEnvironment:
    env = _Environment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictFactory()
    env.globals["namespace"] = _Namespace
    return env


_ENV = _environment()


@lru_cache(maxsize=_COMPILED_TEMPLATES)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template (raises ``jinja2.TemplateSyntaxError``)."""
    return _ENV.from_string(source)


ContentFormat = Literal["string", "openai"]


@lru_cache(maxsize=_COMPILED_TEMPLATES)
def detect_content_format(source: str) -> ContentFormat:
    """How a template wants message content, guessed from its syntax tree as vLLM guesses it.

    ``"openai"`` if it loops over a message's content (``{% for part in message.content %}``,
    directly, through a macro parameter, or as a loop over a variable named ``content``): it
    expects a list of ``{"type": "text", "text": ...}`` parts. ``"string"`` otherwise: the parts'
    texts joined into one string. Messages are found as loop variables over ``messages`` or over
    anything assigned from it (``{% set rest = messages[1:] %}``, ``namespace(rest=messages)``).
    """
    try:
        tree = _ENV.parse(source)
    except jinja2.TemplateSyntaxError:
        return "string"
    sources = _aliases_of(tree, "messages")
    message_names = {
        loop.target.name
        for loop in tree.find_all(nodes.For)
        if isinstance(loop.target, nodes.Name) and _reads(loop.iter, sources)
    }
    content_params: dict[int, set[str]] = {}  # id of a loop in a macro -> its content params
    loops_in_macros: set[int] = set()
    for macro in tree.find_all(nodes.Macro):
        params = [arg.name for arg in macro.args]
        receiving: set[str] = set()
        for call in tree.find_all(nodes.Call):
            if not (isinstance(call.node, nodes.Name) and call.node.name == macro.name):
                continue
            for param, arg in zip(params, call.args, strict=False):
                if _reads_content(arg, message_names):
                    receiving.add(param)
            for keyword in call.kwargs:
                if keyword.key in params and _reads_content(keyword.value, message_names):
                    receiving.add(keyword.key)
        for loop in macro.find_all(nodes.For):
            loops_in_macros.add(id(loop))
            content_params[id(loop)] = receiving
    for loop in tree.find_all(nodes.For):
        if _reads_content(loop.iter, message_names):
            return "openai"
        if isinstance(loop.iter, nodes.Name) and (
            loop.iter.name in content_params.get(id(loop), ())
            or (id(loop) not in loops_in_macros and loop.iter.name == "content")
        ):
            return "openai"
    return "string"


def _aliases_of(tree: nodes.Template, name: str) -> set[str]:
    """``name`` and every variable (or ``ns.attr``) assigned from it, transitively."""
    found = {name}
    grew = True
    while grew:
        grew = False
        for assign in tree.find_all(nodes.Assign):
            target, value = assign.target, assign.node
            new: list[str] = []
            if isinstance(target, nodes.Name) and _reads(value, found):
                new.append(target.name)
            elif isinstance(target, nodes.NSRef) and _reads(value, found):
                new.append(f"{target.name}.{target.attr}")
            if (
                isinstance(target, nodes.Name)
                and isinstance(value, nodes.Call)
                and isinstance(value.node, nodes.Name)
                and value.node.name == "namespace"
            ):
                new += [f"{target.name}.{kw.key}" for kw in value.kwargs if _reads(kw.value, found)]
            for alias in new:
                if alias not in found:
                    found.add(alias)
                    grew = True
    return found


def _unwrap(node: nodes.Node) -> nodes.Node:
    # `x | filter`, `x is test` and `x[a:b]` still read x's elements.
    while True:
        sliced = isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice)
        wraps = sliced or isinstance(node, (nodes.Filter, nodes.Test))
        inner = getattr(node, "node", None) if wraps else None
        if not isinstance(inner, nodes.Node):
            return node
        node = inner


def _dotted(node: nodes.Node) -> str | None:
    if isinstance(node, nodes.Name):
        return node.name if node.ctx == "load" else None
    if isinstance(node, nodes.Getattr):
        base = _dotted(node.node)
        return f"{base}.{node.attr}" if base is not None else None
    return None


def _reads(node: nodes.Node, names: set[str]) -> bool:
    return _dotted(_unwrap(node)) in names


def _reads_content(node: nodes.Node, message_names: set[str]) -> bool:
    node = _unwrap(node)
    if isinstance(node, nodes.Getattr) and node.attr == "content":
        return _dotted(node.node) in message_names
    if (
        isinstance(node, nodes.Getitem)
        and isinstance(node.arg, nodes.Const)
        and node.arg.value == "content"
    ):
        return _dotted(node.node) in message_names
    return False


def render_conversation(
    source: str,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None,
    documents: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
    continue_final_message: bool,
    variables: Mapping[str, Any],
) -> str:
    """Render one conversation with ``source`` as ``apply_chat_template(tokenize=False)`` does.

    ``variables`` are the extra template variables (special tokens, then the request's
    ``chat_template_kwargs``), none of them named like the arguments. Raises
    :class:`RequestError` when the template rejects the conversation or the conversation cannot
    be continued.
    """
    template = _compile_for_request(source)
    chat = [_alias_reasoning(_drop_nulls(message)) for message in messages]
    final_text = ""
    if continue_final_message:
        final_text = _tag_final_message(chat, source)
    try:
        rendered = template.render(
            messages=chat,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except Exception as exc:
        # A template rejects bad input in many ways besides raise_exception (indexing a missing
        # key, calling a string method on a list, ...); the engine answers 400 for all of them.
        raise RequestError("messages", f"the chat template rejected the request: {exc}") from exc
    if continue_final_message:
        rendered = _cut_at_continue_tag(rendered, final_text)
    return rendered


def _tag_final_message(chat: list[dict[str, Any]], source: str) -> str:
    """Append the continuation tag to the last message's text; return that text."""
    final = chat[-1].get("content") if chat else None
    if final is None:
        raise RequestError("continue_final_message", "the final message has no content to continue")
    if "content" not in source:
        raise RequestError(
            "continue_final_message",
            "the chat template never reads a message's content, so it cannot be continued",
        )
    if isinstance(final, list):
        # The last text part is the one continued.
        for block in reversed(final):
            if isinstance(block, dict) and "text" in block:
                text = str(block["text"])
                block["text"] = text + _CONTINUE_TAG
                return text
        raise RequestError("continue_final_message", "the final message has no text to continue")
    chat[-1]["content"] = f"{final}{_CONTINUE_TAG}"
    return str(final)


def _compile_for_request(source: str) -> jinja2.Template:
    try:
        return compile_template(source)
    except jinja2.TemplateSyntaxError as exc:
        raise RequestError("chat_template", f"not a valid Jinja template: {exc}") from exc


def _drop_nulls(message: Mapping[str, Any]) -> dict[str, Any]:
    # Templates handle a missing key but often crash or print "None" on an explicit null.
    return {key: value for key, value in message.items() if value is not None}


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next(
        (message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None
    )
    if reasoning is None:
        return message
    # Same key order as transformers, in case a template iterates over a message's items.
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _cut_at_continue_tag(rendered: str, final_text: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final_text.strip() not in rendered or tag not in rendered:
        raise RequestError(
            "continue_final_message",
            "the chat template does not render the final message verbatim, so it cannot be "
            "continued",
        )
    at = rendered.rindex(tag)
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    # The template trimmed the message's trailing whitespace, and the tag's space with it.
    return rendered[:at].rstrip()
