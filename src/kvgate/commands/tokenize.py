"""`kvgate tokenize`: what the router sees for one request — token ids and block hashes.

Compare its ``token_ids`` with the engine's own (vLLM: ``POST /tokenize``) to check parity; a
mismatch means the router matches prefixes the engine never cached. A request's ``cache_salt``
changes the hashes from the first block on, as it changes the engine's. ``complete`` is false
when the request holds media (or prompt embeddings): the tokens are then the known prefix the
router matches, not the engine's whole prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvgate.tokens import RequestKind

from kvgate.commands.support import USAGE_ERROR, UsageError, fail
from kvgate.errors import ConfigError
from kvgate.scheduling.router_config import validate_block_size

PROG = "kvgate tokenize"


def _read_body(source: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as err:
        raise UsageError(f"cannot read request {source!r}: {err.strerror or err}") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(
            f"request is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    if not isinstance(body, dict):
        raise UsageError(f"request must be a JSON object, got {type(body).__name__}")
    return body


def run(args: argparse.Namespace) -> dict[str, Sequence[int] | bool]:
    from kvgate.tokens import ModelTokenizer, RequestError, TokenizerLoadError
    from kvgate.tokens.hashing import block_hashes
    from kvgate.tokens.request import cache_salt

    try:
        block_size = validate_block_size(args.block_size, "--block-size")
    except ConfigError as err:
        raise UsageError(str(err)) from None
    body = _read_body(args.request)
    kind: RequestKind
    if "messages" in body:
        kind = "chat"
    elif "prompt" in body:
        kind = "completions"
    else:
        raise UsageError("request has neither 'messages' (chat) nor 'prompt' (completions)")
    try:
        tokenizer = ModelTokenizer.load(args.tokenizer)
    except TokenizerLoadError as err:
        raise UsageError(str(err)) from None
    try:
        routed = tokenizer.tokenize_for_routing(body, kind)
        salt = cache_salt(body)
    except RequestError as err:
        raise UsageError(f"invalid request: {err}") from None
    local, sequence = block_hashes(routed.tokens, block_size, args.lora_name, salt)
    return {
        "token_ids": routed.tokens,
        "local_hashes": local,
        "sequence_hashes": sequence,
        "complete": routed.complete,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Print the token ids and KV block hashes kvgate computes for one OpenAI "
        "request body (chat: 'messages', completions: 'prompt').",
    )
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory or hub model id")
    parser.add_argument(
        "--block-size", type=int, required=True, help="KV block size (the engines')"
    )
    parser.add_argument("--lora-name", help="LoRA adapter name (changes the hash seed)")
    parser.add_argument(
        "--request", default="-", help="file with the JSON request body, or - for stdin"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except UsageError as err:
        return fail(PROG, err, USAGE_ERROR)
    print(json.dumps(result))
    return 0
