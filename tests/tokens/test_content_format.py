"""Templates that loop over a message's content get it as a list of parts ("openai" format)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvgate.tokens import ModelTokenizer, TokenizerConfig
from kvgate.tokens.template import detect_content_format
from tests.tokens import vllm_reference
from tests.tokens.utils import write_tiny

PARTS_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>"
    "{% if m.content is string %}S:{{ m.content }}"
    "{% else %}{% for c in m.content %}[{{ c.type }}|{{ c.text }}|{{ c.cache_control }}]"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        pytest.param("{{ messages[0].content }}", "string", id="reads-content-as-a-whole"),
        pytest.param(
            "{% for m in messages %}{% if m.content is string %}{{ m.content }}{% endif %}"
            "{% endfor %}",
            "string",
            id="only-tests-for-string",
        ),
        pytest.param(PARTS_TEMPLATE, "openai", id="loop-over-message-content"),
        pytest.param(
            "{% for m in messages %}{% for c in m['content'] | selectattr('type', 'equalto', "
            "'text') %}{{ c.text }}{% endfor %}{% endfor %}",
            "openai",
            id="filtered-subscript",
        ),
        pytest.param(
            "{% set rest = messages[1:] %}{% for m in rest %}{% for c in m.content %}{% endfor %}"
            "{% endfor %}",
            "openai",
            id="alias-of-messages",
        ),
        pytest.param(
            "{% set ns = namespace(rest=messages) %}{% for m in ns.rest %}"
            "{% for c in m.content %}{% endfor %}{% endfor %}",
            "openai",
            id="namespace-alias",
        ),
        pytest.param(
            "{% macro parts(items) %}{% for c in items %}{{ c.text }}{% endfor %}{% endmacro %}"
            "{% for m in messages %}{{ parts(m.content) }}{% endfor %}",
            "openai",
            id="macro-parameter",
        ),
        pytest.param(
            "{% macro parts(items) %}{% for c in items %}{{ c }}{% endfor %}{% endmacro %}"
            "{% for m in messages %}{{ parts(m.role) }}{% endfor %}",
            "string",
            id="macro-loop-over-something-else",
        ),
        pytest.param(
            "{% for m in messages %}{% set content = m.content %}{% for c in content %}{% endfor %}"
            "{% endfor %}",
            "openai",
            id="loop-over-a-variable-named-content",
        ),
        pytest.param("{% for %}", "string", id="unparsable"),
    ],
)
def test_detect_content_format(template: str, expected: str) -> None:
    assert detect_content_format(template) == expected


def test_qwen3_template_is_string_format(qwen3: ModelTokenizer, hf_qwen3: Any) -> None:
    assert detect_content_format(hf_qwen3.chat_template) == "string"


OPENAI_CASES = [
    pytest.param({"messages": [{"role": "user", "content": "plain"}]}, id="string-content"),
    pytest.param({"messages": [{"role": "user", "content": ""}]}, id="empty-string-is-a-part"),
    pytest.param({"messages": [{"role": "user", "content": None}]}, id="null-is-no-parts"),
    pytest.param(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
                        {"type": "text", "text": ""},
                        "b",
                        {"type": "refusal", "refusal": "no"},
                    ],
                }
            ]
        },
        id="parts-kept-with-extra-fields",
    ),
    pytest.param(
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "tool", "content": [{"type": "text", "text": "r1"}, "r2"]},
            ]
        },
        id="tool-result-parts-joined",
    ),
    pytest.param(
        {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "s1"}]},
                {"role": "user", "content": "q"},
                {"role": "developer", "content": [{"type": "text", "text": "d1"}]},
            ]
        },
        id="developer-merged-from-parts",
    ),
    pytest.param(
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": [{"type": "text", "text": "Sure, "}]},
            ],
            "add_generation_prompt": False,
            "continue_final_message": True,
        },
        id="continue-final-part",
    ),
]


@pytest.mark.parametrize("body", OPENAI_CASES)
def test_openai_format_matches_transformers(
    qwen3: ModelTokenizer, hf_qwen3: Any, body: dict[str, Any]
) -> None:
    body = {**body, "chat_template": PARTS_TEMPLATE}
    expected = vllm_reference.render(hf_qwen3, body, content_format="openai")
    assert qwen3.render_chat(body) == expected


def test_content_format_can_be_forced(tmp_path: Path) -> None:
    forced = ModelTokenizer.load(
        write_tiny(tmp_path, None), config=TokenizerConfig(chat_template_content_format="openai")
    )
    body = {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ messages }}"}
    assert (
        forced.render_chat(body) == "[{'role': 'user', 'content': [{'type': 'text', 'text': 'x'}]}]"
    )
    with pytest.raises(ValueError, match="chat_template_content_format"):
        TokenizerConfig(chat_template_content_format="html")  # type: ignore[arg-type]
