"""Requests with media (images, audio, video, embeddings) are routed on the prompt they are known
to start with: what precedes the content of the first message holding media. Whatever the
engine's processor turns the media into, those tokens come first in its prompt."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kvgate.tokens import ModelTokenizer, RequestError

SYSTEM = {"role": "system", "content": "You describe pictures for the test suite. " * 20}
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}


def user(*parts: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(parts)}


def text(value: str) -> dict[str, str]:
    return {"type": "text", "text": value}


CONVERSATIONS = {
    "image-then-text": [SYSTEM, user(IMAGE, text("What is this?"))],
    "text-then-image": [SYSTEM, user(text("Look at this:"), IMAGE)],
    "untyped-image": [SYSTEM, user({"image_url": {"url": "https://example.invalid/x.png"}})],
    "audio": [SYSTEM, user(text("Transcribe:"), AUDIO)],
    "second-turn": [
        SYSTEM,
        user(text("Hello")),
        {"role": "assistant", "content": "Hi!", "reasoning": "greet back"},
        user(IMAGE, text("And this?")),
        {"role": "assistant", "content": "A cat."},
        user(text("Again:"), IMAGE),
    ],
}
# What an engine's processor may put where a media part was: placeholder strings of various
# models, in front of the message's text (vLLM's default) or where the part is (interleaved).
PLACEHOLDERS = ("<|vision_start|><|image_pad|><|vision_end|>", "<image>", "<|audio_bos|>x")


def engine_variants(messages: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The conversation with every media part rendered as text placeholders, both ways."""
    out = []
    for placeholder in PLACEHOLDERS:
        for interleaved in (False, True):
            variant = copy.deepcopy(messages)
            for message in variant:
                content = message["content"]
                if not isinstance(content, list):
                    continue
                media = [
                    p for p in content if p.get("type") not in ("text", None) or "image_url" in p
                ]
                texts = [p["text"] for p in content if p.get("type") == "text"]
                if interleaved:
                    joined = "".join(
                        p["text"] if p.get("type") == "text" else placeholder for p in content
                    )
                else:
                    joined = "\n".join([placeholder] * len(media) + texts)
                message["content"] = joined
            out.append(variant)
    return out


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_media_requests_route_on_the_prompt_they_start_with(
    qwen3: ModelTokenizer, name: str
) -> None:
    messages = CONVERSATIONS[name]
    with pytest.raises(RequestError, match="multimodal"):
        qwen3.tokenize_chat({"messages": messages})  # the whole prompt cannot be known
    routed = qwen3.tokenize_for_routing({"messages": messages}, "chat")
    assert not routed.complete
    assert len(routed.tokens) > 150  # the system prompt and anything before the media message
    for variant in engine_variants(messages):
        engine = qwen3.tokenize_chat({"messages": variant})
        assert engine[: len(routed.tokens)] == routed.tokens
        assert len(engine) > len(routed.tokens)


def test_text_requests_are_complete_and_unchanged(qwen3: ModelTokenizer) -> None:
    body = {"messages": [SYSTEM, user(text("No pictures here."))], "truncate_prompt_tokens": 50}
    routed = qwen3.tokenize_for_routing(body, "chat")
    assert routed.complete
    assert routed.tokens == qwen3.tokenize_chat(body)


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ({"messages": [SYSTEM, user(IMAGE)], "truncate_prompt_tokens": 10}, "chat"),
        ({"model": "m", "prompt_embeds": "AAAA"}, "completions"),
    ],
    ids=["truncated-media-prompt", "prompt-embeddings"],
)
def test_nothing_known_is_still_routable(
    qwen3: ModelTokenizer, body: dict[str, Any], kind: Any
) -> None:
    """Which part of a truncated, partly known prompt the engine keeps is unknown; embeddings
    have no tokens: no prefix credit, but no refusal either."""
    routed = qwen3.tokenize_for_routing(body, kind)
    assert routed.tokens == [] and not routed.complete


def test_malformed_parts_are_still_refused(qwen3: ModelTokenizer) -> None:
    body = {"messages": [user(IMAGE), user({"type": "hologram"})]}
    with pytest.raises(RequestError, match="unsupported content part type"):
        qwen3.tokenize_for_routing(body, "chat")
