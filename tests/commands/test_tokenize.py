"""`kvgate tokenize` as a user runs it: a subprocess, a request on stdin or in a file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dynamo.llm import compute_block_hash_for_seq

# Every test runs `kvgate tokenize` in a subprocess that loads the tokenizer afresh.
pytestmark = pytest.mark.slow


def run(args: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvgate", "tokenize", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


CHAT = {
    "model": "Qwen/Qwen3-0.6B",
    "messages": [
        {"role": "system", "content": "You are terse. " * 20},
        {"role": "user", "content": "Explain prefix caching in one line."},
    ],
}


def test_chat_request_prints_tokens_and_dynamo_hashes(qwen3_dir: Path) -> None:
    done = run(["--tokenizer", str(qwen3_dir), "--block-size", "16"], json.dumps(CHAT))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    tokens = out["token_ids"]
    assert tokens[0] == 151644  # <|im_start|>: the chat template was applied
    assert out["local_hashes"] == compute_block_hash_for_seq(tokens, 16)
    assert len(out["sequence_hashes"]) == len(tokens) // 16
    assert out["sequence_hashes"][0] == out["local_hashes"][0]


def test_completion_from_file_with_lora(qwen3_dir: Path, tmp_path: Path) -> None:
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"model": "m", "prompt": "word " * 40}))
    args = ["--tokenizer", str(qwen3_dir), "--block-size", "16", "--request", str(request)]
    base = json.loads(run(args).stdout)
    lora = json.loads(run([*args, "--lora-name", "my-adapter"]).stdout)
    assert base["token_ids"] == lora["token_ids"]
    assert lora["local_hashes"] == compute_block_hash_for_seq(
        base["token_ids"], 16, lora_name="my-adapter"
    )
    assert lora["local_hashes"] != base["local_hashes"]


def test_cache_salt_keys_every_prefix_as_the_engine_does(qwen3_dir: Path) -> None:
    """vLLM salts the first block: a salted prompt shares no prefix with the unsalted one or
    another salt, and all of it with the same salt (tests/events/test_vllm_block_keys.py holds
    this against vLLM's own hashing)."""
    args = ["--tokenizer", str(qwen3_dir), "--block-size", "16"]
    outputs = {
        salt: json.loads(run(args, json.dumps({**CHAT, "cache_salt": salt})).stdout)
        for salt in ("tenant-a", "tenant-b")
    }
    plain = json.loads(run(args, json.dumps(CHAT)).stdout)
    a, b = outputs["tenant-a"], outputs["tenant-b"]
    assert a["token_ids"] == b["token_ids"] == plain["token_ids"]
    assert a["local_hashes"][1:] == plain["local_hashes"][1:]
    for other in (b, plain):
        assert all(
            x != y for x, y in zip(a["sequence_hashes"], other["sequence_hashes"], strict=True)
        )
    again = json.loads(run(args, json.dumps({**CHAT, "cache_salt": "tenant-a"})).stdout)
    assert again == a


@pytest.mark.parametrize(
    ("args", "stdin", "needle"),
    [
        (["--block-size", "16"], "{bad", "not valid JSON"),
        (["--block-size", "16"], "[1]", "JSON object"),
        (["--block-size", "16"], "{}", "neither 'messages'"),
        (["--block-size", "24"], json.dumps(CHAT), "power of two"),
        (["--block-size", "16"], json.dumps({"model": "m", "messages": 3}), "messages"),
        (["--block-size", "16"], json.dumps({**CHAT, "cache_salt": "a/b"}), "cache_salt"),
    ],
    ids=[
        "malformed-json",
        "not-object",
        "no-prompt",
        "bad-block-size",
        "bad-messages",
        "salt-vllm-refuses",
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    qwen3_dir: Path, args: list[str], stdin: str, needle: str
) -> None:
    done = run(["--tokenizer", str(qwen3_dir), *args], stdin)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr


def test_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    done = run(["--tokenizer", str(tmp_path / "nothing"), "--block-size", "16"], json.dumps(CHAT))
    assert done.returncode == 2
    assert "tokenizer" in done.stderr.lower()
