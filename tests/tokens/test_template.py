"""kvgate's Jinja dialect against transformers' on templates that lean on its particulars."""

from __future__ import annotations

from typing import Any

import pytest

from kvgate.tokens import ModelTokenizer, RequestError
from tests.tokens import vllm_reference

MESSAGES = [
    {"role": "system", "content": "  sys  "},
    {"role": "user", "content": "a,b,c"},
    {"role": "assistant", "content": "ok", "reasoning_content": "why"},
]

TEMPLATES = [
    pytest.param("{{ strftime_now('%Y') }}", id="strftime-now"),
    pytest.param("{{ dict.fromkeys(['a', 'b'], 0) | tojson }}", id="dict-fromkeys"),
    pytest.param(
        "{{ {'b': 1, 'a': [1, 2]} | tojson(sort_keys=true, separators=(',', ':')) }}",
        id="tojson-options",
    ),
    pytest.param("{{ 'é<>&' | tojson(ensure_ascii=true) }}", id="tojson-ensure-ascii"),
    pytest.param(
        "{{ messages[0].missing }}|{{ nothing }}|{{ nothing is defined }}", id="undefined"
    ),
    pytest.param(
        "{% for m in messages %}{{ m.content.split(',') | join('+') }}{{ m.content.strip() }}"
        "{% if not loop.last %}/{% endif %}{% endfor %}",
        id="string-methods",
    ),
    pytest.param(
        "{% for m in messages %}{% if loop.previtem %}{{ loop.previtem.role }}>{% endif %}"
        "{% if loop.index0 == 1 %}{% continue %}{% endif %}{{ m.role }};{% endfor %}",
        id="loop-previtem-continue",
    ),
    pytest.param(
        "{% set x = 'outer' %}{% generation %}{% set x = 'inner' %}{{ x }}{% endgeneration %}"
        "{{ x }}",
        id="generation-block-scope",
    ),
    pytest.param(
        "{% macro show(m) %}[{{ m.role }}:{{ m.reasoning_content }}:{{ m.thinking }}]{% endmacro %}"
        "{% for m in messages %}{{ show(m) }}{% endfor %}",
        id="reasoning-aliases-and-macro",
    ),
    pytest.param(
        "  {% if true %}\n    trimmed\n  {% endif %}\n{%- for m in messages -%}\n {{ m.role }}\n"
        "{%- endfor %}",
        id="trim-and-lstrip-blocks",
    ),
    pytest.param("{{ messages[2] | tojson }}", id="message-key-order"),
    pytest.param("{{ messages | map(attribute='role') | list | tojson }}", id="filters"),
]


@pytest.mark.parametrize("template", TEMPLATES)
def test_template_renders_like_transformers(
    qwen3: ModelTokenizer, hf_qwen3: Any, template: str
) -> None:
    body = {"messages": MESSAGES, "chat_template": template}
    assert qwen3.render_chat(body) == vllm_reference.render(hf_qwen3, body)


@pytest.mark.parametrize(
    "template",
    [
        pytest.param("{% set l = [] %}{{ l.append(1) }}", id="mutating-a-list"),
        pytest.param("{{ raise_exception('nope') }}", id="raise-exception"),
        pytest.param("{{ ''.__class__.__mro__ }}", id="dunder-access"),
        pytest.param("{{ messages[99].content.upper() }}", id="undefined-call"),
    ],
)
def test_template_errors_are_request_errors(
    qwen3: ModelTokenizer, hf_qwen3: Any, template: str
) -> None:
    body = {"messages": MESSAGES, "chat_template": template}
    with pytest.raises(Exception):  # noqa: B017 - transformers raises several types
        vllm_reference.render(hf_qwen3, body)
    with pytest.raises(RequestError) as caught:
        qwen3.render_chat(body)
    assert caught.value.field == "messages"
