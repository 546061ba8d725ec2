"""kvgate: a KV-cache-aware Endpoint Picker for LLM inference gateways."""

__version__ = "0.1.0"
