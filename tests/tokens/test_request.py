"""Request kinds by HTTP path, dispatch by kind, and the package's public names."""

from __future__ import annotations

import pytest

import kvgate.tokens
from kvgate.tokens import ModelTokenizer, RequestKind, request_kind_for_path


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/v1/chat/completions", "chat"),
        ("/v1/chat/completions?stream=true&x=1", "chat"),
        ("/v1/completions", "completions"),
        ("/v1/completions?", "completions"),
        ("/v1/completions/", None),
        ("/v1/chat/completions/render", None),
        ("/v1/embeddings", None),
        ("/V1/COMPLETIONS", None),
        ("", None),
    ],
)
def test_request_kind_for_path(path: str, kind: RequestKind | None) -> None:
    assert request_kind_for_path(path) == kind


def test_tokenize_request_dispatches_by_kind(qwen3: ModelTokenizer) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    completion = {"prompt": "hi"}
    assert qwen3.tokenize_request(chat, "chat") == qwen3.tokenize_chat(chat)
    assert qwen3.tokenize_request(completion, "completions") == qwen3.tokenize_completion(
        completion
    )
    with pytest.raises(ValueError, match="unknown request kind 'embeddings'"):
        qwen3.tokenize_request(completion, "embeddings")  # type: ignore[arg-type]


def test_public_names_are_pinned() -> None:
    assert sorted(kvgate.tokens.__all__) == [
        "ModelTokenizer",
        "RequestError",
        "RequestKind",
        "SegmentCacheStats",
        "TokenizerConfig",
        "TokenizerLoadError",
        "TokensError",
        "request_kind_for_path",
    ]
    for name in kvgate.tokens.__all__:
        assert getattr(kvgate.tokens, name) is not None
