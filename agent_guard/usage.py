"""Token usage of one call and the money type.

Money is kept as integer nano-USD (1 USD = 10**9) everywhere it is stored or
summed, so that no float ever accumulates. Prices are exact ``Decimal`` per
token; the cost of one call is computed exactly and rounded *up* to the next
nano-USD once, so a ledger total is always >= the exact cost and never more
than one nano-USD per call above it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Any

NANO_PER_USD = 10**9

__all__ = [
    "NANO_PER_USD",
    "MalformedUsage",
    "Usage",
    "nano_to_usd",
    "usd_to_nano",
]


def usd_to_nano(amount: Decimal | float | int | str) -> int:
    """Convert a dollar amount to integer nano-USD, rounding up.

    Floats are converted through their shortest ``repr`` so ``0.1`` means
    exactly one tenth of a dollar.
    """
    if isinstance(amount, bool):
        raise TypeError("a dollar amount must be a number, not a bool")
    if isinstance(amount, float):
        if not math.isfinite(amount):
            raise ValueError(f"a dollar amount must be finite, got {amount!r}")
        amount = Decimal(repr(amount))
    value = Decimal(amount) * NANO_PER_USD
    if not value.is_finite():
        raise ValueError(f"a dollar amount must be finite, got {amount!r}")
    return int(value.to_integral_value(rounding=ROUND_CEILING))


def nano_to_usd(nanos: int) -> Decimal:
    """Integer nano-USD to an exact ``Decimal`` number of dollars."""
    return Decimal(int(nanos)) / NANO_PER_USD


class MalformedUsage(ValueError):
    """Usage reported by a provider could not be read (negative, NaN, not a number...)."""


def _count(raw: Mapping[str, Any] | None, key: str) -> int:
    if not raw:
        return 0
    value = raw.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedUsage(f"usage field {key!r} must be a number, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise MalformedUsage(f"usage field {key!r} must be a whole number, got {value!r}")
        value = int(value)
    if value < 0:
        raise MalformedUsage(f"usage field {key!r} must not be negative, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Usage:
    """Normalised token usage of one model call.

    The convention is LangChain's ``UsageMetadata``: ``input_tokens`` counts
    *every* prompt token, cache reads and cache writes included, and
    ``output_tokens`` counts every generated token, reasoning included. The
    detail fields say how many of those were of a special kind, so pricing
    can charge each token exactly once at its own rate.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0

    def __post_init__(self) -> None:
        i, o = self.input_tokens, self.output_tokens
        cr, cc, r = self.cache_read_tokens, self.cache_creation_tokens, self.reasoning_tokens
        # the common case in one expression (exact ints: bool and int subclasses, and
        # every refusal, take the checks below)
        if (type(i) is int and type(o) is int and type(cr) is int and type(cc) is int
                and type(r) is int and cr >= 0 and cc >= 0 and r >= 0
                and cr + cc <= i and r <= o):
            return
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise MalformedUsage(f"Usage.{name} must be an int, got {value!r}")
            if value < 0:
                raise MalformedUsage(f"Usage.{name} must not be negative, got {value}")
        if self.cache_read_tokens + self.cache_creation_tokens > self.input_tokens:
            raise MalformedUsage(
                "cache read + cache creation tokens exceed input_tokens "
                f"({self.cache_read_tokens} + {self.cache_creation_tokens} > {self.input_tokens}); "
                "input_tokens must include cached tokens (LangChain convention)"
            )
        if self.reasoning_tokens > self.output_tokens:
            raise MalformedUsage(
                f"reasoning_tokens ({self.reasoning_tokens}) exceed output_tokens "
                f"({self.output_tokens}); output_tokens must include reasoning"
            )

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def uncached_input_tokens(self) -> int:
        """Prompt tokens billed at the plain input rate."""
        return self.input_tokens - self.cache_read_tokens - self.cache_creation_tokens

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_read_tokens + other.cache_read_tokens,
            self.cache_creation_tokens + other.cache_creation_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
        )

    # -- constructors from the shapes providers and LangChain report -------------

    @classmethod
    def from_usage_metadata(cls, um: Mapping[str, Any]) -> Usage:
        """From LangChain's ``AIMessage.usage_metadata`` (totals include details)."""
        if not isinstance(um, Mapping):
            raise MalformedUsage(f"usage_metadata must be a mapping, got {type(um).__name__}")
        details_in = um.get("input_token_details") or {}
        details_out = um.get("output_token_details") or {}
        if not isinstance(details_in, Mapping) or not isinstance(details_out, Mapping):
            raise MalformedUsage("input_token_details/output_token_details must be mappings")
        return cls(
            input_tokens=_count(um, "input_tokens"),
            output_tokens=_count(um, "output_tokens"),
            cache_read_tokens=_count(details_in, "cache_read"),
            cache_creation_tokens=_count(details_in, "cache_creation"),
            reasoning_tokens=_count(details_out, "reasoning"),
        )

    @classmethod
    def from_openai(cls, raw: Mapping[str, Any]) -> Usage:
        """From OpenAI's raw ``usage`` object.

        OpenAI counts cached tokens *inside* ``prompt_tokens`` and reasoning
        tokens inside ``completion_tokens``.
        """
        prompt_details = raw.get("prompt_tokens_details") or {}
        completion_details = raw.get("completion_tokens_details") or {}
        return cls(
            input_tokens=_count(raw, "prompt_tokens"),
            output_tokens=_count(raw, "completion_tokens"),
            cache_read_tokens=_count(prompt_details, "cached_tokens"),
            reasoning_tokens=_count(completion_details, "reasoning_tokens"),
        )

    @classmethod
    def from_anthropic(cls, raw: Mapping[str, Any]) -> Usage:
        """From Anthropic's raw ``usage`` object.

        Anthropic reports cache reads and writes *beside* ``input_tokens``, so
        they are added here to follow the inclusive convention.
        """
        cache_read = _count(raw, "cache_read_input_tokens")
        cache_creation = _count(raw, "cache_creation_input_tokens")
        return cls(
            input_tokens=_count(raw, "input_tokens") + cache_read + cache_creation,
            output_tokens=_count(raw, "output_tokens"),
            cache_read_tokens=cache_read,
            cache_creation_tokens=cache_creation,
        )
