"""A tiny character-level tokenizer written to disk, for fast loading tests."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, processors

SPECIALS = ("<s>", "</s>", "<|user|>", "<|end|>")
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(*, bos: bool = False) -> Tokenizer:
    vocab = {"[UNK]": 0}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tokenizer.add_special_tokens([AddedToken(token, normalized=False) for token in SPECIALS])
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
        )
    return tokenizer


def write_tiny(
    directory: Path,
    config: dict[str, Any] | None = None,
    *,
    bos: bool = False,
    files: dict[str, str] | None = None,
) -> Path:
    """A model directory: tokenizer.json, tokenizer_config.json (unless ``config`` is None) and
    any extra ``files`` (relative path → text)."""
    directory.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer(bos=bos).save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    for name, text in (files or {}).items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text, encoding="utf-8")
    return directory
