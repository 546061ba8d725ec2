"""Errors raised while loading a tokenizer or tokenizing a request.

    TokensError
    ├── TokenizerLoadError   the model's tokenizer files are missing, unreadable or inconsistent
    └── RequestError         a request body that cannot be tokenized (also a ``ValueError``);
                             ``.field`` names the offending field, e.g. ``messages[2].content``

A ``RequestError`` is the client's fault (the engine would answer 400 too); a ``TokenizerLoadError``
is the operator's, raised at start-up.
"""

from __future__ import annotations


class TokensError(Exception):
    """Base class of every error raised by :mod:`kvgate.tokens`."""


class TokenizerLoadError(TokensError):
    """The tokenizer could not be loaded; the message says what was missing and where it looked."""


class RequestError(TokensError, ValueError):
    """A request body kvgate cannot tokenize the way the engine would.

    ``field`` is a path into the body (``messages[2].content``, ``prompt[0][5]``), ``reason`` the
    explanation without it; ``str(error)`` joins the two.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def type_name(value: object) -> str:
    """The JSON-ish name of ``value``'s type, for messages like ``expected a string, got int``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return type(value).__name__
