from __future__ import annotations

from pathlib import Path

import pytest

from kvgate.bench.prompts import WORDS, TextSynth
from kvgate.bench.traces import TraceRequest
from kvgate.tokens import ModelTokenizer


@pytest.fixture(scope="module")
def qwen3(qwen3_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.load(str(qwen3_dir))


def encode(tok: ModelTokenizer, text: str) -> list[int]:
    return tok.tokenize_request({"prompt": text}, "completions")


def test_every_word_is_one_token_with_and_without_its_space(qwen3: ModelTokenizer) -> None:
    assert len(set(WORDS)) == 256
    for word in WORDS:
        assert len(encode(qwen3, word)) == 1, word
        assert len(encode(qwen3, " " + word)) == 1, word


def test_a_block_is_512_tokens_and_cut_blocks_have_the_length_asked(
    qwen3: ModelTokenizer,
) -> None:
    synth = TextSynth(seed=4)
    for h in (0, 1, 77, 10**9):
        assert len(encode(qwen3, synth.block(h))) == 512
    for n in (1, 2, 100, 511):
        assert len(encode(qwen3, synth.block(5, n))) == n
    assert synth.block(5) == TextSynth(seed=4).block(5)
    assert synth.block(5) != TextSynth(seed=5).block(5)
    assert synth.block(5) != synth.block(6)
    assert synth.block(5, 100) != synth.block(5)[: len(synth.block(5, 100))]


def test_prompts_tokenize_to_the_trace_length_and_share_prefixes_by_hash_id(
    qwen3: ModelTokenizer,
) -> None:
    synth = TextSynth()
    a = TraceRequest(0.0, 1300, 1, (7, 3, 9))
    b = TraceRequest(0.0, 2048, 1, (7, 3, 11, 12))
    c = TraceRequest(0.0, 1024, 1, (3, 7))
    ta, tb, tc = (encode(qwen3, synth.prompt(r)) for r in (a, b, c))
    assert (len(ta), len(tb), len(tc)) == (1300, 2048, 1024)
    # Position independence: a block's tokens are the same wherever it sits.
    assert ta[:1024] == tb[:1024]
    assert tc[:512] == ta[512:1024] and tc[512:] == ta[:512]
    assert ta[1024:1030] != tb[1024:1030]
