"""The pieces of a local Dynamo fleet that need no process: the model directory, settings, the
workers' request counters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvgate.dynamo.processes import FleetSettings, requests_served, write_model_dir
from kvgate.tokens import ModelTokenizer


def test_model_dir_is_the_qwen3_tokenizer_and_config(qwen3_dir: Path, tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model", qwen3_dir)
    config = json.loads((model / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"]) == (
        "qwen3",
        28,
        151936,
    )
    assert (model / "tokenizer.json").read_bytes() == (qwen3_dir / "tokenizer.json").read_bytes()
    # kvgate tokenizes from the same files as the Dynamo frontend does.
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert ModelTokenizer.load(str(model)).tokenize_request(body, "chat") == ModelTokenizer.load(
        str(qwen3_dir)
    ).tokenize_request(body, "chat")


def test_requests_served_reads_the_generate_endpoint_per_worker() -> None:
    text = (
        'dynamo_component_requests_total{dynamo_component="backend",dynamo_endpoint="generate",'
        'dynamo_namespace="dynamo",worker_id="74c82a1312f4650e"} 3\n'
        'dynamo_component_requests_total{dynamo_component="backend",dynamo_endpoint='
        '"worker_kv_query_source_1d61995c1b143c",dynamo_namespace="dynamo",'
        'worker_id="74c82a1312f4650e"} 9\n'
    )
    assert requests_served(text) == {0x74C82A1312F4650E: 3}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"workers": 0},
        {"router_modes": ()},
        {"router_modes": ("kv", "kv")},
        {"router_modes": ("x",)},
    ],
)
def test_bad_fleet_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        FleetSettings(**kwargs)  # type: ignore[arg-type]
