"""Loading a tokenizer from a directory or the hub cache, and the accessors the router uses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest

from kvgate.tokens import ModelTokenizer, RequestError, TokenizerConfig, TokenizerLoadError
from tests.tokens.utils import TEMPLATE, write_tiny

BASE_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE}
HELLO = {"messages": [{"role": "user", "content": "hi"}]}


def test_local_directory(tmp_path: Path) -> None:
    tokenizer = ModelTokenizer.load(write_tiny(tmp_path / "m", BASE_CONFIG))
    assert tokenizer.render_chat(HELLO) == "<s><|user|>hi<|end|><|assistant|>"
    assert tokenizer.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    assert tokenizer.eos_token_id == tokenizer.token_to_id("</s>")
    assert tokenizer.path == tmp_path / "m"
    assert tokenizer.source == str(tmp_path / "m")
    tokenizer.tokenize_chat(HELLO)
    assert tokenizer.cache_stats().entries > 0
    tokenizer.clear_cache()
    assert tokenizer.cache_stats().entries == 0


def test_template_file_wins_over_config(tmp_path: Path) -> None:
    directory = write_tiny(tmp_path, BASE_CONFIG, files={"chat_template.jinja": "J{{ bos_token }}"})
    assert ModelTokenizer.load(directory).render_chat(HELLO) == "J<s>"


def test_legacy_json_template_file(tmp_path: Path) -> None:
    files = {"chat_template.json": json.dumps({"chat_template": "L{{ eos_token }}"})}
    directory = write_tiny(tmp_path, {"eos_token": "</s>"}, files=files)
    assert ModelTokenizer.load(directory).render_chat(HELLO) == "L</s>"


def test_named_templates_in_config(tmp_path: Path) -> None:
    config = {
        "chat_template": [
            {"name": "default", "template": "plain"},
            {"name": "tool_use", "template": "tools:{{ tools | length if tools else 0 }}"},
        ]
    }
    tokenizer = ModelTokenizer.load(write_tiny(tmp_path, config))
    assert tokenizer.render_chat(HELLO) == "plain"
    tool = {"type": "function", "function": {"name": "f"}}
    assert tokenizer.render_chat({**HELLO, "tools": [tool]}) == "tools:1"
    assert tokenizer.render_chat({**HELLO, "chat_template": "tool_use"}) == "tools:0"


def test_additional_template_directory(tmp_path: Path) -> None:
    files = {"additional_chat_templates/rag.jinja": "rag:{{ documents | length }}"}
    tokenizer = ModelTokenizer.load(write_tiny(tmp_path, BASE_CONFIG, files=files))
    assert tokenizer.render_chat(HELLO).startswith("<s><|user|>")
    body = {**HELLO, "chat_template": "rag", "documents": [{"text": "x"}]}
    assert tokenizer.render_chat(body) == "rag:1"


def test_several_templates_without_default(tmp_path: Path) -> None:
    config = {"chat_template": [{"name": "a", "template": "A"}, {"name": "b", "template": "B"}]}
    tokenizer = ModelTokenizer.load(write_tiny(tmp_path, config))
    with pytest.raises(RequestError, match=r"none is the default.*\['a', 'b'\]"):
        tokenizer.render_chat(HELLO)
    assert tokenizer.render_chat({**HELLO, "chat_template": "b"}) == "B"


def test_without_template_completions_still_work(tmp_path: Path) -> None:
    tokenizer = ModelTokenizer.load(write_tiny(tmp_path, None))
    with pytest.raises(RequestError) as caught:
        tokenizer.tokenize_chat(HELLO)
    assert caught.value.field == "chat_template"
    assert tokenizer.tokenize_completion({"prompt": "ab"}) == tokenizer.encode("ab")
    assert tokenizer.render_chat({**HELLO, "chat_template": "{{ messages[0].content }}"}) == "hi"


def test_server_side_template_and_kwargs(tmp_path: Path) -> None:
    config = TokenizerConfig(
        chat_template="{{ flavour }}/{{ add_generation_prompt }}",
        default_chat_template_kwargs={"flavour": "server", "add_generation_prompt": False},
    )
    tokenizer = ModelTokenizer.load(write_tiny(tmp_path, BASE_CONFIG), config=config)
    # The request's add_generation_prompt (default true) beats the server's kwargs.
    assert tokenizer.render_chat(HELLO) == "server/True"
    body = {**HELLO, "chat_template_kwargs": {"flavour": "request"}}
    assert tokenizer.render_chat(body) == "request/True"
    body = {**HELLO, "chat_template_kwargs": {"flavour": None}}  # null never overrides
    assert tokenizer.render_chat(body) == "server/True"
    assert tokenizer.render_chat({**HELLO, "chat_template": "own"}) == "own"


def test_post_processor_adds_special_tokens_to_completions(tmp_path: Path) -> None:
    tokenizer = ModelTokenizer.load(write_tiny(tmp_path, BASE_CONFIG, bos=True))
    bos = tokenizer.token_to_id("<s>")
    assert bos is not None
    assert tokenizer.tokenize_completion({"prompt": "ab"}) == [bos, *tokenizer.encode("ab")]
    assert tokenizer.tokenize_completion({"prompt": "ab", "add_special_tokens": False}) == (
        tokenizer.encode("ab")
    )
    # Chat prompts carry the template's own BOS only.
    assert tokenizer.tokenize_chat(HELLO).count(bos) == 1


def test_matches_transformers_on_config_quirks(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    config = {
        **BASE_CONFIG,
        "add_bos_token": False,  # ignored when tokenizer.json exists (transformers 5)
        "add_eos_token": True,
        "split_special_tokens": True,
        "added_tokens_decoder": {
            "200": {"content": "<extra>", "special": True, "normalized": False},
        },
    }
    directory = write_tiny(tmp_path, config, bos=True)
    ours = ModelTokenizer.load(directory)
    theirs = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    assert not ours.segment_cache_exact  # special tokens are split: piecewise would be unsafe
    for text in ("ab", "<s>x</s>", "<extra>y<|user|>"):
        for special in (True, False):
            expected = theirs(text, add_special_tokens=special)["input_ids"]
            assert ours.tokenize_completion({"prompt": text, "add_special_tokens": special}) == (
                expected
            )
    assert ours.token_to_id("<extra>") == theirs.convert_tokens_to_ids("<extra>")


def test_legacy_special_tokens_map(tmp_path: Path) -> None:
    files = {"special_tokens_map.json": json.dumps({"eos_token": {"content": "</s>"}})}
    tokenizer = ModelTokenizer.load(write_tiny(tmp_path, {"chat_template": "x"}, files=files))
    assert tokenizer.special_tokens == {"eos_token": "</s>"}


def test_model_specific_special_tokens_are_template_variables(tmp_path: Path) -> None:
    config = {**BASE_CONFIG, "extra_special_tokens": {"image_token": "<|user|>"}}
    tokenizer = ModelTokenizer.load(write_tiny(tmp_path, config))
    assert tokenizer.special_tokens["image_token"] == "<|user|>"


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        pytest.param(lambda d: d.mkdir(), "no tokenizer.json in", id="missing-tokenizer-json"),
        pytest.param(lambda d: d.write_text("x"), "is a file", id="path-is-a-file"),
        pytest.param(
            lambda d: write_tiny(d, None).joinpath("tokenizer.json").write_text("{bad"),
            "cannot load",
            id="corrupt-tokenizer-json",
        ),
        pytest.param(
            lambda d: write_tiny(d, None).joinpath("tokenizer_config.json").write_text("[]"),
            "expected a JSON object",
            id="config-not-an-object",
        ),
        pytest.param(
            lambda d: write_tiny(d, {"chat_template": "{% for %}"}),
            "not valid Jinja",
            id="broken-template",
        ),
        pytest.param(
            lambda d: write_tiny(d, {"chat_template": 3}), "not a string", id="template-not-text"
        ),
        pytest.param(
            lambda d: write_tiny(d, {"added_tokens_decoder": {"x": {"content": "a"}}}),
            "non-integer id",
            id="bad-added-token-id",
        ),
    ],
)
def test_load_errors_say_what_and_where(tmp_path: Path, setup: Any, needle: str) -> None:
    target = tmp_path / "model"
    setup(target)
    with pytest.raises(TokenizerLoadError) as caught:
        ModelTokenizer.load(target)
    assert needle in str(caught.value)
    assert str(target) in str(caught.value)


def test_not_a_directory_nor_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match=r"no directory .* not a hub model id"):
        ModelTokenizer.load(tmp_path / "absent" / "dir")


def test_revision_only_applies_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match="revision='v1' applies to hub model ids"):
        ModelTokenizer.load(write_tiny(tmp_path, None), revision="v1")


@pytest.fixture
def offline_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_offline_and_not_cached(offline_hub_cache: Path) -> None:
    with pytest.raises(TokenizerLoadError) as caught:
        ModelTokenizer.load("kvgate-test/absent-model", revision="main")
    message = str(caught.value)
    assert "tokenizer.json of 'kvgate-test/absent-model' (revision main)" in message
    assert "offline" in message


def test_hub_id_from_the_offline_cache(offline_hub_cache: Path) -> None:
    commit = "0" * 40
    repo = offline_hub_cache / "models--kvgate-test--tiny"
    snapshot = write_tiny(repo / "snapshots" / commit, BASE_CONFIG)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    tokenizer = ModelTokenizer.load("kvgate-test/tiny")
    assert tokenizer.path == snapshot
    assert tokenizer.source == "kvgate-test/tiny"
    assert tokenizer.render_chat(HELLO) == "<s><|user|>hi<|end|><|assistant|>"


def test_qwen3_accessors(qwen3: ModelTokenizer, hf_qwen3: Any, qwen3_dir: Path) -> None:
    assert qwen3.vocab_size == len(hf_qwen3) == 151669
    assert qwen3.eos_token_id == hf_qwen3.eos_token_id == 151645
    assert qwen3.special_tokens == hf_qwen3.special_tokens_map
    assert qwen3.path == qwen3_dir
    ids = qwen3.encode("<|im_start|>user\nhéllo 🙂<|im_end|>")
    assert qwen3.decode(ids) == hf_qwen3.decode(ids)
    assert qwen3.decode(ids, skip_special_tokens=True) == "user\nhéllo 🙂"
    assert qwen3.id_to_token(151644) == "<|im_start|>"
    assert qwen3.id_to_token(10**7) is None
    assert qwen3.token_to_id("<think>") == 151667
    assert "vocab_size=151669" in repr(qwen3)
