"""Structure from bytes: every fuzz target builds its case from a `Choices` over one byte string.

So one target runs under any engine that produces bytes: atheris (libFuzzer, coverage-guided)
for the long campaigns, hypothesis (``st.binary()``: reproducible, shrinks a failure towards
zero bytes, that is towards the first option of every choice) in the test suite, or a seeded
``random`` stream. When the bytes run out every choice takes its first or smallest option, so any
byte string, even empty, is a case.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

INTERESTING_INTS = (0, 1, -1, 2, 15, 16, 17, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                    2**53, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1)  # fmt: skip
INTERESTING_FLOATS = (0.0, -0.0, 0.5, 1.0, 1.5, -1.0, 1e-300, 1e308, math.inf, -math.inf, math.nan)


class Choices:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def exhausted(self) -> bool:
        return self._pos >= len(self._data)

    def _take(self, count: int) -> int:
        if count == 1:
            pos = self._pos
            self._pos = pos + 1
            return self._data[pos] if pos < len(self._data) else 0
        chunk = self._data[self._pos : self._pos + count]
        self._pos += count
        return int.from_bytes(chunk.ljust(count, b"\0"), "big")

    def integer(self, low: int, high: int) -> int:
        """Uniform-ish in [low, high] (bytes modulo the span)."""
        span = high - low
        if span <= 0:
            return low
        return low + self._take((span.bit_length() + 7) // 8) % (span + 1)

    def boolean(self) -> bool:
        return self._take(1) & 1 == 1

    def percent(self, chance: int) -> bool:
        """True with probability about ``chance`` / 100 (never when the bytes ran out)."""
        return self._take(1) % 100 >= 100 - chance

    def pick(self, options: Sequence[T]) -> T:
        return options[self.integer(0, len(options) - 1)]

    def raw(self, max_len: int) -> bytes:
        """Up to ``max_len`` bytes taken verbatim from the input."""
        length = self.integer(0, max_len)
        chunk = self._data[self._pos : self._pos + length]
        self._pos += length
        return chunk

    def text(self, max_len: int) -> str:
        return self.raw(max_len).decode("utf-8", "replace")

    def any_int(self) -> int:
        if self.boolean():
            return self.pick(INTERESTING_INTS)
        return self._take(9) - (1 << 71)

    def any_float(self) -> float:
        if self.boolean():
            return self.pick(INTERESTING_FLOATS)
        value: float = struct.unpack(">d", self._take(8).to_bytes(8, "big"))[0]
        return value
