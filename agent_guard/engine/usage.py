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

from .._frozen import fast_init, fields_maker

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


#: Service tiers priced apart from the standard one, as usage reports them.
_TIERS = ("priority", "flex")


def _dearer_tier(a: str | None, b: str | None) -> str | None:
    """The tier to price a sum of two usages at: priority if either ran there, standard
    if either did, flex only if both did (flex is the cheapest)."""
    if a == b:
        return a
    if "priority" in (a, b):
        return "priority"
    return None


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


# usage_metadata details whose keys are all among these, with exact non-negative int
# values, read the same by the one-pass path of Usage.from_usage_metadata
_PLAIN_IN = frozenset({"audio", "cache_read", "cache_creation", "image"})
_PLAIN_OUT = frozenset({"audio", "reasoning", "image"})
_NO_DETAILS: dict[str, int] = {}


def _plain_details(details: Any, keys: frozenset[str]) -> bool:
    if not details:
        return True
    if not isinstance(details, dict):
        return False
    for key, value in details.items():
        if key not in keys or (value is not None and (type(value) is not int or value < 0)):
            return False
    return True


@fast_init
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
    #: the part of ``cache_creation_tokens`` written for one hour (Anthropic bills 2x
    #: the input rate for those, 1.25x for 5-minute writes)
    cache_creation_1h_tokens: int = 0
    #: audio and image tokens among ``input_tokens`` / ``output_tokens``
    audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    image_input_tokens: int = 0
    image_output_tokens: int = 0
    #: the service tier the provider billed (``"priority"``, ``"flex"``); None: standard
    service_tier: str | None = None

    def __post_init__(self) -> None:
        i, o = self.input_tokens, self.output_tokens
        cr, cc, r = self.cache_read_tokens, self.cache_creation_tokens, self.reasoning_tokens
        # the common case in one expression (exact ints: bool and int subclasses, and
        # every refusal, take the checks below)
        if (type(i) is int and type(o) is int and type(cr) is int and type(cc) is int
                and type(r) is int and cr >= 0 and cc >= 0 and r >= 0
                and cr + cc <= i and r <= o and not self.cache_creation_1h_tokens
                and not self.audio_input_tokens and not self.audio_output_tokens
                and not self.image_input_tokens and not self.image_output_tokens
                and self.service_tier is None):
            return
        if self.service_tier is not None and not isinstance(self.service_tier, str):
            raise MalformedUsage(f"Usage.service_tier must be a string or None, "
                                 f"got {self.service_tier!r}")
        for name in self.__slots__:
            if name == "service_tier":
                continue
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
        if self.cache_creation_1h_tokens > self.cache_creation_tokens:
            raise MalformedUsage(
                f"cache_creation_1h_tokens ({self.cache_creation_1h_tokens}) exceed "
                f"cache_creation_tokens ({self.cache_creation_tokens}); the 1-hour writes "
                "are a part of all cache writes")
        if self.audio_input_tokens + self.image_input_tokens > self.input_tokens:
            raise MalformedUsage("audio + image input tokens exceed input_tokens; "
                                 "input_tokens must include them")
        if (self.reasoning_tokens + self.audio_output_tokens + self.image_output_tokens
                > self.output_tokens):
            raise MalformedUsage("reasoning + audio + image output tokens exceed "
                                 "output_tokens; output_tokens must include them")

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
            self.cache_creation_1h_tokens + other.cache_creation_1h_tokens,
            self.audio_input_tokens + other.audio_input_tokens,
            self.audio_output_tokens + other.audio_output_tokens,
            self.image_input_tokens + other.image_input_tokens,
            self.image_output_tokens + other.image_output_tokens,
            _dearer_tier(self.service_tier, other.service_tier),
        )

    # -- constructors from the shapes providers and LangChain report -------------

    @classmethod
    def from_usage_metadata(cls, um: Mapping[str, Any]) -> Usage:
        """From LangChain's ``AIMessage.usage_metadata`` (totals include details)."""
        if isinstance(um, dict):  # the common shapes, read in one pass (same result)
            i, o = um.get("input_tokens"), um.get("output_tokens")
            if type(i) is int and type(o) is int and i >= 0 and o >= 0:
                din, dout = um.get("input_token_details"), um.get("output_token_details")
                if not din and not dout:
                    # two counts checked above and zero details: nothing left for
                    # __post_init__ to refuse, so the maker skips it
                    return _new_usage(i, o) if cls is Usage else cls(i, o)
                if _plain_details(din, _PLAIN_IN) and _plain_details(dout, _PLAIN_OUT):
                    din, dout = din or _NO_DETAILS, dout or _NO_DETAILS
                    return cls(i, o, din.get("cache_read") or 0,
                               din.get("cache_creation") or 0, dout.get("reasoning") or 0,
                               0, din.get("audio") or 0, dout.get("audio") or 0,
                               din.get("image") or 0, dout.get("image") or 0)
        return cls._from_usage_metadata(um)

    @classmethod
    def _from_usage_metadata(cls, um: Mapping[str, Any]) -> Usage:
        if not isinstance(um, Mapping):
            raise MalformedUsage(f"usage_metadata must be a mapping, got {type(um).__name__}")
        details_in = um.get("input_token_details") or {}
        details_out = um.get("output_token_details") or {}
        if not isinstance(details_in, Mapping) or not isinstance(details_out, Mapping):
            raise MalformedUsage("input_token_details/output_token_details must be mappings")
        # ChatOpenAI names the details of a priority or flex call "priority_cache_read",
        # "flex_reasoning"..., and adds "priority"/"flex" counts (the tokens of that tier)
        tier = next((t for t in _TIERS for d in (details_in, details_out)
                     for key in d if key == t or key.startswith(t + "_")), None)

        def detail(details: Mapping[str, Any], key: str) -> int:
            n = _count(details, key)
            return n if n or tier is None else _count(details, f"{tier}_{key}")

        # Anthropic (langchain-anthropic): writes by duration beside "cache_creation",
        # which may then be 0
        five_min = _count(details_in, "ephemeral_5m_input_tokens")
        one_hour = _count(details_in, "ephemeral_1h_input_tokens")
        return cls(
            input_tokens=_count(um, "input_tokens"),
            output_tokens=_count(um, "output_tokens"),
            cache_read_tokens=detail(details_in, "cache_read"),
            cache_creation_tokens=max(detail(details_in, "cache_creation"),
                                      five_min + one_hour),
            reasoning_tokens=detail(details_out, "reasoning"),
            cache_creation_1h_tokens=one_hour,
            audio_input_tokens=_count(details_in, "audio"),
            audio_output_tokens=_count(details_out, "audio"),
            image_input_tokens=_count(details_in, "image"),
            image_output_tokens=_count(details_out, "image"),
            service_tier=tier,
        )

    @classmethod
    def from_openai(cls, raw: Mapping[str, Any]) -> Usage:
        """From OpenAI's raw ``usage`` object.

        OpenAI counts cached tokens *inside* ``prompt_tokens`` and reasoning
        tokens inside ``completion_tokens``.
        """
        prompt_details = raw.get("prompt_tokens_details") or {}
        completion_details = raw.get("completion_tokens_details") or {}
        tier = raw.get("service_tier")  # not in OpenAI's usage; the response's, if merged
        return cls(
            input_tokens=_count(raw, "prompt_tokens"),
            output_tokens=_count(raw, "completion_tokens"),
            cache_read_tokens=_count(prompt_details, "cached_tokens"),
            cache_creation_tokens=_count(prompt_details, "cache_write_tokens"),
            reasoning_tokens=_count(completion_details, "reasoning_tokens"),
            audio_input_tokens=_count(prompt_details, "audio_tokens"),
            audio_output_tokens=_count(completion_details, "audio_tokens"),
            image_input_tokens=_count(prompt_details, "image_tokens"),
            image_output_tokens=_count(completion_details, "image_tokens"),
            service_tier=tier if tier in _TIERS else None,
        )

    @classmethod
    def from_anthropic(cls, raw: Mapping[str, Any]) -> Usage:
        """From Anthropic's raw ``usage`` object.

        Anthropic reports cache reads and writes *beside* ``input_tokens``, so
        they are added here to follow the inclusive convention.
        """
        cache_read = _count(raw, "cache_read_input_tokens")
        cache_creation = _count(raw, "cache_creation_input_tokens")
        by_ttl = raw.get("cache_creation") or {}
        one_hour = _count(by_ttl, "ephemeral_1h_input_tokens") if isinstance(
            by_ttl, Mapping) else 0
        cache_creation = max(cache_creation, one_hour + (_count(
            by_ttl, "ephemeral_5m_input_tokens") if isinstance(by_ttl, Mapping) else 0))
        tier = raw.get("service_tier")
        return cls(
            input_tokens=_count(raw, "input_tokens") + cache_read + cache_creation,
            output_tokens=_count(raw, "output_tokens"),
            cache_read_tokens=cache_read,
            cache_creation_tokens=cache_creation,
            cache_creation_1h_tokens=one_hour,
            service_tier=tier if tier in _TIERS else None,
        )


#: a Usage built from its fields without __post_init__ (fields_maker): for values valid
#: by construction
_new_usage = fields_maker(Usage)
