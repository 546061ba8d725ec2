"""Request bodies to the token ids the engine will see, and the hashes of their blocks.

The router must see the same tokens as the engine: a chat request is rendered with the model's
chat template exactly as vLLM renders it, a completion's prompt is tokenized without one. Encoding
goes through a segment cache that reuses the pieces between added tokens, so a conversation that
extends one seen before costs a fraction of a cold tokenization.
"""

from kvgate.tokens.errors import RequestError, TokenizerLoadError, TokensError
from kvgate.tokens.request import RequestKind, request_kind_for_path
from kvgate.tokens.segments import SegmentCacheStats
from kvgate.tokens.tokenizer import ModelTokenizer, TokenizerConfig

__all__ = [
    "ModelTokenizer",
    "RequestError",
    "RequestKind",
    "SegmentCacheStats",
    "TokenizerConfig",
    "TokenizerLoadError",
    "TokensError",
    "request_kind_for_path",
]
