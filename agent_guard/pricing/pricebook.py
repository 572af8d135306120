"""Model prices with LiteLLM's field names and semantics, exact to the token.

A price is per token, as an exact ``Decimal``. The cost of one call follows LiteLLM's
``generic_cost_per_token`` (the reference it is tested against, see
``docs/price-conformance.md``), for every dimension a chat call bills:

- uncached text prompt tokens at ``input_cost_per_token``; cache reads at
  ``cache_read_input_token_cost``; cache writes at ``cache_creation_input_token_cost``,
  1-hour writes at ``cache_creation_input_token_cost_above_1hr`` (a missing cache rate
  is the input rate; Fireworks AI's missing read rate is half of it, as it bills);
- audio and image tokens at their own rates (``input_cost_per_audio_token``,
  ``output_cost_per_audio_token``, ``input_cost_per_image_token``...) when the model has
  them, else as text;
- output tokens at ``output_cost_per_token``, reasoning tokens (a part of the output)
  at ``output_cost_per_reasoning_token`` when set: each token once;
- a service tier (``priority``, ``flex``...) reads the ``_<tier>`` variant of each rate
  when there is one;
- when the prompt (all input tokens, cached included) is above a threshold
  (``*_above_128k_tokens``...), that threshold's rates apply to the whole request; at
  the threshold too for providers that bill so (xAI);
- a ``tiered_pricing`` range table picks one range by the prompt size
  (``start < prompt <= end``; beyond the last range, the last) for the whole request.

Time-of-day ``off_peak_pricing`` applies when the caller says when the call ran
(``during``) and all of it was off-peak; the worst case always uses the standard rates.
Not priced (documented in ``docs/pricing.md``): batch rates, regional uplifts.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

from ..engine.usage import Usage, usd_to_nano
from ..errors import UnknownModelPrice
from .tools import ToolPrice, tool_price_from_data

__all__ = ["CostBreakdown", "ModelPrice", "PriceBook", "PriceTier", "Rates"]

ENV_VAR = "AGENT_GUARD_PRICES"
TOOLS_KEY = "tools"  # the overrides file's table of tool prices
_ZERO = Decimal(0)
_NANO = Decimal(10**9)
_TIER_FIELD = re.compile(
    r"^(input_cost_per_token|output_cost_per_token|cache_read_input_token_cost|"
    r"cache_creation_input_token_cost)_above_(\d+)k_tokens$"
)
_TIER_ATTR = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cache_read",
    "cache_creation_input_token_cost": "cache_creation",
}
# LiteLLM's service tiers and the suffix of their rates ("fast" bills as priority)
_SERVICE_TIER_SUFFIX = {"flex": "flex", "balanced": "balanced", "priority": "priority",
                        "fast": "priority", "ultrafast": "ultrafast"}
_SUFFIXES = ("_ultrafast", "_priority", "_balanced", "_flex", "_fast", "_auto")
_NON_STANDARD = (*_SUFFIXES, "_batches")
_THRESHOLD_PREFIXES = tuple(f"{p}_above_" for p in _TIER_ATTR)
_THRESHOLD = re.compile(r"_above_(\d+(?:\.\d+)?)(k?)_tokens")
#: providers whose long-context rates apply from the threshold on (LiteLLM's rule)
INCLUSIVE_THRESHOLD_PROVIDERS = frozenset({"xai"})
#: providers that bill cache reads at a share of the input rate when no read rate is set
DEFAULT_CACHE_READ_SHARE = {"fireworks_ai": Decimal("0.5")}
_ONE_HOUR_WRITE = "cache_creation_input_token_cost_above_1hr"
_DATE_SUFFIXES = (
    re.compile(r"-\d{4}-\d{2}-\d{2}$"),  # gpt-4o-mini-2025-01-01
    re.compile(r"-\d{8}$"),  # claude-3-5-sonnet-20241022
    re.compile(r"@\d{8}$"),  # vertex: claude-3-5-sonnet@20241022
    re.compile(r"-v\d+(:\d+)?$"),  # bedrock: ...-v1:0
    re.compile(r":latest$"),
)


def _price(model: str, field: str, value: Any) -> Decimal:
    if isinstance(value, bool):
        raise ValueError(f"price of {model!r}: {field} must be a number, got {value!r}")
    try:
        d = value if isinstance(value, Decimal) else Decimal(str(value))
    except (InvalidOperation, ValueError) as exc:
        raise ValueError(
            f"price of {model!r}: {field} must be a number of USD per token, got {value!r}"
        ) from exc
    if not d.is_finite() or d < 0:
        raise ValueError(
            f"price of {model!r}: {field} must be a finite USD amount >= 0, got {value!r}"
        )
    return d


def _is_rate_field(key: str) -> bool:
    return "cost" in key and not key.startswith("search_context")


@dataclass(frozen=True, slots=True)
class PriceTier:
    """Rates that apply to the whole request when the prompt exceeds ``threshold_tokens``."""

    threshold_tokens: int
    input: Decimal
    output: Decimal
    cache_read: Decimal | None
    cache_creation: Decimal | None


@dataclass(frozen=True, slots=True)
class RangeTier:
    """One range of a ``tiered_pricing`` table: ``start < prompt tokens <= end``."""

    start: Decimal
    end: Decimal
    rates: Mapping[str, Decimal]


@dataclass(frozen=True, slots=True)
class Rates:
    """The per-token rates one request bills at (after tiers, thresholds, ranges)."""

    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write: Decimal
    cache_write_1h: Decimal
    reasoning: Decimal
    audio_input: Decimal
    audio_output: Decimal
    image_input: Decimal
    image_output: Decimal
    threshold: int | None = None
    #: the rates as integers at a common scale (see :func:`_integer_rates`), set once
    ints: Any = field(default=None, compare=False, repr=False)


# ModelPrice._memo key of the one set of rates of a model without prompt-size
# thresholds or ranges at the standard tier
_FLAT = ("flat",)
# ModelPrice._memo key of _integer_rates of the _FLAT rates, set with them: a cost at the
# standard tier then reads its integer rates in one lookup
_FLAT_INTS = ("flat ints",)
# ModelPrice._memo key of (usage, its integer parts) of the last usage priced (a frozen
# Usage: the same object is priced again for its prompt/completion split)
_LAST_PARTS = ("last parts",)
_INT_FIELDS = ("input", "output", "cache_read", "cache_write", "cache_write_1h", "reasoning",
               "audio_input", "audio_output", "image_input", "image_output")
# the most decimal digits below a nano-USD a rate may have to be priced with integers
_MAX_INT_SCALE = 12
_NO_INTS = (0, None)
# 10**scale for every scale of integer rates (an index costs less than the power)
_POW10 = tuple(10**s for s in range(_MAX_INT_SCALE + 1))


def _integer_rates(r: Rates) -> tuple[int, tuple[int, ...] | None]:
    """``(s, rates)``: every rate times 10**(9 + s) is the integer in ``rates`` (in
    ``_INT_FIELDS`` order), for the smallest such ``s``; ``rates`` is None when a rate
    has more than ``_MAX_INT_SCALE`` digits below a nano-USD. Kept on the Rates.

    Sums of token counts times these integers are exact, as the Decimal sums are while
    they stay within Decimal's 28 digits: the same cost to the nano-USD, without
    Decimal arithmetic on every call (property-tested against the Decimal path)."""
    if r.ints is not None:
        return r.ints  # type: ignore[no-any-return]
    scale = 0
    values = [getattr(r, name) * _NANO for name in _INT_FIELDS]
    for v in values:
        exponent = v.normalize().as_tuple().exponent
        if not isinstance(exponent, int) or v < 0:
            scale = _MAX_INT_SCALE + 1
            break
        scale = max(scale, -exponent)
    ints: tuple[int, tuple[int, ...] | None] = _NO_INTS
    if scale <= _MAX_INT_SCALE:
        ints = (scale, tuple(int(v.scaleb(scale)) for v in values))
    object.__setattr__(r, "ints", ints)
    return ints


@dataclass(frozen=True, slots=True)
class CostBreakdown:
    """The exact cost of one call, by kind of token, and its ledger amount.

    Audio and image tokens are in ``input_usd`` / ``output_usd``."""

    model: str
    input_usd: Decimal
    cache_read_usd: Decimal
    cache_creation_usd: Decimal
    output_usd: Decimal
    reasoning_usd: Decimal
    tier_threshold: int | None = None
    service_tier: str | None = None

    @property
    def prompt_usd(self) -> Decimal:
        return self.input_usd + self.cache_read_usd + self.cache_creation_usd

    @property
    def completion_usd(self) -> Decimal:
        return self.output_usd + self.reasoning_usd

    @property
    def total_usd(self) -> Decimal:
        return self.prompt_usd + self.completion_usd

    @property
    def total_nano(self) -> int:
        """The ledger amount: the exact total rounded up to the next nano-USD."""
        return usd_to_nano(self.total_usd)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Per-token prices of one model.

    ``input`` ... ``tiers`` are the standard rates (kept for readers); ``fields`` holds
    every rate of the LiteLLM entry (service tiers, audio, images, thresholds) and
    ``ranges`` its ``tiered_pricing`` table, which :meth:`rates` resolves per request.
    """

    model: str
    provider: str | None
    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_creation: Decimal | None = None
    reasoning: Decimal | None = None
    tiers: tuple[PriceTier, ...] = ()
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    fields: Mapping[str, Decimal] = field(default_factory=dict, compare=False, repr=False)
    ranges: tuple[RangeTier, ...] = ()
    inclusive_thresholds: bool = False
    #: LiteLLM's ``off_peak_pricing``: rates that replace the standard ones while one of
    #: its time windows is open
    off_peak: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    #: LiteLLM's ``supports_reasoning``: the model may bill hidden reasoning tokens that
    #: no stream shows, so a call that reports no usage is settled at its reserved output.
    supports_reasoning: bool = False
    _memo: dict[tuple[Any, ...], Any] = field(
        default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_litellm(cls, name: str, entry: Mapping[str, Any]) -> ModelPrice:
        if not isinstance(entry, Mapping):
            raise ValueError(f"price of {name!r} must be a mapping of LiteLLM fields")
        ranges = _ranges(name, entry.get("tiered_pricing"))
        for required in ("input_cost_per_token", "output_cost_per_token"):
            if required not in entry and not (ranges and required in ranges[0].rates):
                raise ValueError(
                    f"price of {name!r} needs {required!r} (USD per token), e.g. "
                    "{'input_cost_per_token': 2.5e-06, 'output_cost_per_token': 1e-05}"
                )
        fields: dict[str, Decimal] = {}
        for key, value in entry.items():
            if not isinstance(key, str) or not _is_rate_field(key) or value is None:
                continue
            if isinstance(value, Mapping | list | tuple):
                continue  # off_peak_pricing, search_context_cost_per_query...: not per token
            fields[key] = _price(name, key, value)
        first = ranges[0].rates if ranges else {}
        base_in = fields.get("input_cost_per_token", first.get("input_cost_per_token"))
        base_out = fields.get("output_cost_per_token", first.get("output_cost_per_token"))
        if base_in is None or base_out is None:  # a range table without text rates
            raise ValueError(f"price of {name!r} needs input_cost_per_token and "
                             "output_cost_per_token (flat or in its first range)")
        thresholds: dict[int, dict[str, Decimal]] = {}
        for key, value in fields.items():
            m = _TIER_FIELD.match(key)
            if m:
                thresholds.setdefault(int(m.group(2)) * 1000, {})[_TIER_ATTR[m.group(1)]] = value
        cache_read = fields.get("cache_read_input_token_cost")
        cache_creation = fields.get("cache_creation_input_token_cost")
        tiers = tuple(
            PriceTier(
                threshold_tokens=t,
                input=r.get("input", base_in),
                output=r.get("output", base_out),
                cache_read=r.get("cache_read", cache_read),
                cache_creation=r.get("cache_creation", cache_creation),
            )
            for t, r in sorted(thresholds.items())
        )
        provider = entry.get("litellm_provider")
        provider = provider if isinstance(provider, str) else None
        if (cache_read is None and provider in DEFAULT_CACHE_READ_SHARE
                and "input_cost_per_token" in fields):
            cache_read = fields["cache_read_input_token_cost"] = (
                fields["input_cost_per_token"] * DEFAULT_CACHE_READ_SHARE[provider])
        return cls(
            model=name,
            provider=provider,
            input=base_in,
            output=base_out,
            cache_read=cache_read,
            cache_creation=cache_creation,
            reasoning=fields.get("output_cost_per_reasoning_token"),
            tiers=tiers,
            max_input_tokens=_int_or_none(entry.get("max_input_tokens")),
            max_output_tokens=_int_or_none(entry.get("max_output_tokens")),
            fields=fields,
            ranges=ranges,
            inclusive_thresholds=provider in INCLUSIVE_THRESHOLD_PROVIDERS,
            off_peak=_off_peak(name, entry.get("off_peak_pricing"), provider),
            supports_reasoning=entry.get("supports_reasoning") is True,
        )

    # -- rates ------------------------------------------------------------------------

    def _get(self, key: str, default: Decimal | None) -> Decimal | None:
        """A rate by LiteLLM key; a service-tier key falls back to its standard key."""
        value = self.fields.get(key)
        if value is not None:
            return value
        for suffix in _SUFFIXES:
            if suffix in key:
                value = self.fields.get(key.replace(suffix, ""))
                return default if value is None else value
        return default

    def _range_for(self, input_tokens: int) -> RangeTier | None:
        if not self.ranges or input_tokens <= 0:
            return None
        for r in self.ranges:  # sorted by start
            if r.start < input_tokens <= r.end:
                return r if "input_cost_per_token" in r.rates else None
        last = self.ranges[-1]
        return last if "input_cost_per_token" in last.rates else None

    def rates(self, input_tokens: int, service_tier: str | None = None) -> Rates:
        """The rates a request with ``input_tokens`` prompt tokens bills at."""
        if not service_tier and not self.ranges:
            flat = self._memo.get(_FLAT)  # set once: no thresholds at the standard tier
            if flat is not None:
                return flat  # type: ignore[no-any-return]
        suffix = _SERVICE_TIER_SUFFIX.get(service_tier.lower()) if service_tier else None
        rng = self._range_for(input_tokens)
        if rng is not None:
            key: tuple[Any, ...] = (suffix, "range", rng.start)
        else:
            key = (suffix, "above", self._crossed(input_tokens, suffix))
        hit = self._memo.get(key)
        if hit is None:
            hit = self._range_rates(rng, suffix) if rng is not None else self._flat_rates(
                key[2], suffix)
            if len(self._memo) < 256:
                self._memo[key] = hit
            if key == (None, "above", None) and not self.ranges and not self._thresholds(None):
                self._memo[_FLAT_INTS] = _integer_rates(hit)
                self._memo[_FLAT] = hit  # every standard-tier request bills at these
        return hit  # type: ignore[no-any-return]

    def floored_by_threshold(self) -> bool:
        """Whether a rate above a prompt-size threshold was raised to the same rate under
        it (the table prices that token cheaper for a longer prompt)."""
        for suffix in (None, *sorted(set(_SERVICE_TIER_SUFFIX.values()))):
            for value, _ in self._thresholds(suffix):
                if self._flat_rates(int(value), suffix) != self._flat_rates(
                        int(value), suffix, floor=False):
                    return True
        return False

    def _thresholds(self, suffix: str | None) -> tuple[tuple[Decimal, str], ...]:
        """(tokens, text) of the ``_above_<text>_tokens`` thresholds that apply to a
        request of this service tier, ascending (memoised)."""
        memo_key = (suffix, "thresholds")
        hit = self._memo.get(memo_key)
        if hit is not None:
            return hit  # type: ignore[no-any-return]
        out = set()
        for key in self.fields:
            if not key.startswith(_THRESHOLD_PREFIXES) or "_tokens" not in key:
                continue
            if key.endswith(_NON_STANDARD) and not (suffix and key.endswith("_" + suffix)):
                continue
            text = key.rsplit("_above_", 1)[1].split("_tokens")[0]
            try:
                value = Decimal(text.replace("k", "")) * (1000 if "k" in text else 1)
            except InvalidOperation:
                continue
            out.add((value, text))
        result = tuple(sorted(out))
        self._memo[memo_key] = result  # type: ignore[assignment]
        return result

    def _crossed(self, input_tokens: int, suffix: str | None) -> int | None:
        crossed = None
        for value, _ in self._thresholds(suffix):
            if input_tokens > value or (self.inclusive_thresholds and input_tokens == value):
                crossed = int(value)
        return crossed

    def _key(self, base: str, suffix: str | None) -> str:
        return f"{base}_{suffix}" if suffix else base

    def _flat_rates(self, threshold: int | None, suffix: str | None, *,
                    floor: bool = True) -> Rates:
        get = self._get
        inp = get(self._key("input_cost_per_token", suffix), _ZERO) or _ZERO
        out = get(self._key("output_cost_per_token", suffix), _ZERO) or _ZERO
        if out == 0:
            out = self.fields.get("output_cost_per_image_token", out)
        write = get(self._key("cache_creation_input_token_cost", suffix), None)
        read = get(self._key("cache_read_input_token_cost", suffix), None)
        one_hour_keys = [self._key(_ONE_HOUR_WRITE, suffix)]
        audio_above: Decimal | None = None
        if threshold is not None:
            for value, text in self._thresholds(suffix):
                if value > threshold:
                    break
                inp = get(self._key(f"input_cost_per_token_above_{text}_tokens", suffix),
                          inp) or _ZERO
                out = get(self._key(f"output_cost_per_token_above_{text}_tokens", suffix),
                          out) or _ZERO
                write = get(self._key(
                    f"cache_creation_input_token_cost_above_{text}_tokens", suffix), write)
                read = get(self._key(f"cache_read_input_token_cost_above_{text}_tokens",
                                     suffix), read)
                preferred = [self._key(f"{_ONE_HOUR_WRITE}_above_{text}_tokens", suffix),
                             f"{_ONE_HOUR_WRITE}_above_{text}_tokens"]
                one_hour_keys = [k for k in preferred if k in self.fields] or one_hour_keys
                audio_above = get(self._key(f"input_cost_per_audio_token_above_{text}_tokens",
                                            suffix), audio_above)
        read = inp if read is None else read
        explicit = get(self._key("explicit_cache_read_input_token_cost", suffix), None)
        if explicit is not None and explicit > read:  # explicit (Gemini) caches: dearer
            read = explicit
        write = inp if write is None else write
        write_1h = next((v for v in (get(k, None) for k in one_hour_keys) if v is not None),
                        write)
        if threshold is not None and floor:
            # A longer prompt never makes a token cheaper: a rate above a threshold that is
            # below the same rate under it (LiteLLM's gemini-2.5-pro prices cache writes
            # above 200k at 2.5e-7, and under it at the input rate) would price a bigger
            # prompt below a smaller one, and a reservation made from an estimate above the
            # real prompt below the bill.
            base = self._flat_rates(None, suffix)
            read, write, write_1h = (max(read, base.cache_read),
                                     max(write, base.cache_write),
                                     max(write_1h, base.cache_write_1h))
            inp, out = max(inp, base.input), max(out, base.output)
        return Rates(
            input=inp, output=out, cache_read=read, cache_write=write,
            cache_write_1h=write_1h,
            reasoning=self._reasoning(suffix, out),
            # a long-prompt audio rate (Gemini): the dearer of it and the base audio rate,
            # as LiteLLM's generic and Vertex calculators read one or the other
            audio_input=max(self._modality("input_cost_per_audio_token", suffix, inp),
                            audio_above if audio_above is not None else _ZERO),
            audio_output=self.fields.get("output_cost_per_audio_token", out),
            image_input=self._modality("input_cost_per_image_token", suffix, inp),
            image_output=self.fields.get("output_cost_per_image_token", out),
            threshold=threshold,
        )

    def _range_rates(self, rng: RangeTier, suffix: str | None) -> Rates:
        r = rng.rates
        inp = r["input_cost_per_token"]
        out = r.get("output_cost_per_token", self.fields.get("output_cost_per_token", _ZERO))
        write = r.get("cache_creation_input_token_cost", inp)
        if "output_cost_per_reasoning_token" in r or "output_cost_per_token" in r:
            reasoning = r.get("output_cost_per_reasoning_token", r.get("output_cost_per_token",
                                                                       _ZERO))
        else:
            reasoning = self._reasoning(suffix, out)
        return Rates(
            input=inp, output=out,
            cache_read=r.get("cache_read_input_token_cost", inp),
            cache_write=write,
            cache_write_1h=r.get(_ONE_HOUR_WRITE, write),
            reasoning=reasoning,
            audio_input=self._modality("input_cost_per_audio_token", suffix, inp),
            audio_output=self.fields.get("output_cost_per_audio_token", out),
            image_input=self._modality("input_cost_per_image_token", suffix, inp),
            image_output=self.fields.get("output_cost_per_image_token", out),
            threshold=None,
        )

    def _reasoning(self, suffix: str | None, out: Decimal) -> Decimal:
        tier_key = self._key("output_cost_per_reasoning_token", suffix)
        if tier_key in self.fields:
            return self.fields[tier_key]
        if suffix and self._key("output_cost_per_token", suffix) in self.fields:
            return out
        return self.fields.get("output_cost_per_reasoning_token", out)

    def _modality(self, base: str, suffix: str | None, text_rate: Decimal) -> Decimal:
        tiered = self._key(base, suffix)
        if tiered in self.fields:
            return self.fields[tiered]
        return self.fields.get(base, text_rate)

    # -- costs ------------------------------------------------------------------------

    def _at(self, r: Rates, during: tuple[float, float] | None) -> Rates:
        """Off-peak rates when the whole call (``during``: its start and end, epoch
        seconds) ran inside one of the model's off-peak windows."""
        op = self.off_peak
        if op is None or during is None or not _all_off_peak(op, during):
            return r
        rates = op["rates"]
        inp = rates.get("input_cost_per_token", r.input)
        out = rates.get("output_cost_per_token", r.output)
        return Rates(
            input=inp, output=out,
            cache_read=rates.get("cache_read_input_token_cost",
                                 inp if r.cache_read == r.input else r.cache_read),
            cache_write=rates.get("cache_creation_input_token_cost",
                                  inp if r.cache_write == r.input else r.cache_write),
            cache_write_1h=r.cache_write_1h,
            reasoning=rates.get("output_cost_per_reasoning_token",
                                out if r.reasoning == r.output else r.reasoning),
            audio_input=r.audio_input, audio_output=r.audio_output,
            image_input=r.image_input, image_output=r.image_output, threshold=r.threshold)

    def _parts(self, usage: Usage, during: tuple[float, float] | None = None
               ) -> tuple[Decimal, Decimal, Decimal, Decimal, Decimal, Rates]:
        r = self._at(self.rates(usage.input_tokens, usage.service_tier), during)
        cached = usage.cache_read_tokens + usage.cache_creation_tokens
        uncached = max(usage.input_tokens - cached, 0)
        audio_in = min(usage.audio_input_tokens, uncached)
        image_in = min(usage.image_input_tokens, uncached - audio_in)
        text_in = uncached - audio_in - image_in
        input_usd = text_in * r.input + audio_in * r.audio_input + image_in * r.image_input
        write_1h = min(usage.cache_creation_1h_tokens, usage.cache_creation_tokens)
        write_usd = ((usage.cache_creation_tokens - write_1h) * r.cache_write
                     + write_1h * r.cache_write_1h)
        read_usd = usage.cache_read_tokens * r.cache_read
        special = usage.reasoning_tokens + usage.audio_output_tokens + usage.image_output_tokens
        if not special:
            return input_usd, read_usd, write_usd, usage.output_tokens * r.output, _ZERO, r
        text_out = max(usage.output_tokens - special, 0)
        output_usd = (text_out * r.output + usage.audio_output_tokens * r.audio_output
                      + usage.image_output_tokens * r.image_output)
        return input_usd, read_usd, write_usd, output_usd, usage.reasoning_tokens * r.reasoning, r

    def _int_parts(self, usage: Usage, during: tuple[float, float] | None
                   ) -> tuple[int, int, int] | None:
        """``(scale, prompt side, completion side)``: the cost times 10**(9 + scale) as
        exact integers; None when the rates are not integers at any small scale."""
        kept = self.off_peak is None  # the last usage's parts (a settle, then its split)
        if kept:
            last = self._memo.get(_LAST_PARTS)
            if last is not None and last[0] is usage:
                return last[1]  # type: ignore[no-any-return]
            during = None  # no off-peak rates: the standard ones whenever it ran
        # the standard tier's rates of a model without thresholds or ranges (see rates),
        # not off-peak (_at keeps the rates without ``during``)
        flat = None if during is not None or usage.service_tier else self._memo.get(_FLAT_INTS)
        if flat is None:
            flat = _integer_rates(self._at(self.rates(usage.input_tokens, usage.service_tier),
                                           during))
        scale, ints = flat
        parts: tuple[int, int, int] | None = None
        if ints is not None:
            (inp, out, read_rate, write_rate, write_1h_rate, reasoning_rate, audio_in_rate,
             audio_out_rate, image_in_rate, image_out_rate) = ints
            # min/max as comparisons: the builtins parse keywords on every call
            read, writes = usage.cache_read_tokens, usage.cache_creation_tokens
            uncached = usage.input_tokens - read - writes
            if uncached < 0:
                uncached = 0
            audio_in, image_in = usage.audio_input_tokens, usage.image_input_tokens
            if audio_in > uncached:
                audio_in = uncached
            if image_in > uncached - audio_in:
                image_in = uncached - audio_in
            write_1h = usage.cache_creation_1h_tokens
            if write_1h > writes:
                write_1h = writes
            prompt = ((uncached - audio_in - image_in) * inp + audio_in * audio_in_rate
                      + image_in * image_in_rate + read * read_rate
                      + (writes - write_1h) * write_rate + write_1h * write_1h_rate)
            special = (usage.reasoning_tokens + usage.audio_output_tokens
                       + usage.image_output_tokens)
            if not special:
                parts = scale, prompt, usage.output_tokens * out
            else:
                parts = scale, prompt, (max(usage.output_tokens - special, 0) * out
                                        + usage.audio_output_tokens * audio_out_rate
                                        + usage.image_output_tokens * image_out_rate
                                        + usage.reasoning_tokens * reasoning_rate)
        if kept:
            self._memo[_LAST_PARTS] = (usage, parts)  # one tuple: read whole by any thread
        return parts

    def cost_nano(self, usage: Usage, during: tuple[float, float] | None = None) -> int:
        """``cost(usage).total_nano`` (the ledger amount) without building the breakdown:
        the exact cost rounded up to the next nano-USD (in integers when the rates allow,
        else the same Decimal sums in the same order).

        ``during`` (start, end) in epoch seconds: a call that ran wholly inside an
        off-peak window of the model is priced at its off-peak rates; without it, or
        when any part of the call was at peak, at the standard (dearer) rates."""
        parts = self._int_parts(usage, during)
        if parts is not None:
            scale, prompt, completion = parts
            return -(-(prompt + completion) // _POW10[scale])
        return self.decimal_cost_nano(usage, during)

    def prompt_completion_usd(self, usage: Usage) -> tuple[float, float]:
        """``(cost(usage).prompt_usd, .completion_usd)`` as floats (what LangSmith shows),
        from the integer sums when the rates allow."""
        parts = self._int_parts(usage, None)
        if parts is None:
            cost = self.cost(usage)
            return float(cost.prompt_usd), float(cost.completion_usd)
        scale, prompt, completion = parts
        unit = 10 ** (9 + scale)
        return prompt / unit, completion / unit

    def decimal_cost_nano(self, usage: Usage, during: tuple[float, float] | None = None
                          ) -> int:
        """:meth:`cost_nano` in Decimal arithmetic (the reference the integers match)."""
        inp, read, write, out, reasoning, _ = self._parts(usage, during)
        total = (inp + read + write) + (out + reasoning)
        return int((total * _NANO).to_integral_value(rounding=ROUND_CEILING))

    def cost(self, usage: Usage, during: tuple[float, float] | None = None) -> CostBreakdown:
        """The exact cost of ``usage`` at these prices (``during``: see :meth:`cost_nano`)."""
        inp, read, write, out, reasoning, r = self._parts(usage, during)
        return CostBreakdown(
            model=self.model,
            input_usd=inp,
            cache_read_usd=read,
            cache_creation_usd=write,
            output_usd=out,
            reasoning_usd=reasoning,
            tier_threshold=r.threshold,
            service_tier=usage.service_tier,
        )

    def worst_cost_nano(self, input_tokens: int, output_tokens: int, *,
                        service_tier: str | None = None, cache_write: str | None = None,
                        audio_input: bool = False, image_input: bool = False,
                        audio_output: bool = False) -> int:
        """The most a call with up to ``input_tokens`` prompt and ``output_tokens``
        output tokens can cost: every prompt token at the dearest input-side rate it could
        bill at (a cache write when ``cache_write`` is ``"5m"``/``"1h"``, audio or image
        rates when the prompt has them), every output token at the dearest of the output,
        reasoning (and audio) rates. A requested tier is priced at the dearer of its
        rates and the standard ones (a provider may serve it at either)."""
        standard = not (service_tier and service_tier.lower() in _SERVICE_TIER_SUFFIX)
        if standard and not (cache_write or audio_input or image_input or audio_output
                             or "output_cost_per_image_token" in self.fields):
            # the standard rates without thresholds in one lookup (see rates), else by size
            flat = self._memo.get(_FLAT_INTS)
            scale, ints = flat if flat is not None else _integer_rates(
                self.rates(input_tokens, None))
            if ints is not None:  # input and output rates (and reasoning) as integers
                out_rate = ints[1] if ints[1] >= ints[5] else ints[5]  # max, without its call
                return -(-(input_tokens * ints[0] + output_tokens * out_rate) // _POW10[scale])
        tiers: list[str | None] = [None] if standard else [None, service_tier]
        in_rate = out_rate = _ZERO
        for tier in tiers:
            r = self.rates(input_tokens, tier)
            candidates = [r.input]
            if cache_write:
                candidates.append(r.cache_write)
                if cache_write == "1h":
                    candidates.append(r.cache_write_1h)
            if audio_input:
                candidates.append(r.audio_input)
            if image_input:
                candidates.append(r.image_input)
            in_rate = max(in_rate, *candidates)
            outs = [r.output, r.reasoning]
            if audio_output:
                outs.append(r.audio_output)
            if "output_cost_per_image_token" in self.fields:
                outs.append(r.image_output)
            out_rate = max(out_rate, *outs)
        cost = input_tokens * in_rate + output_tokens * out_rate
        return int((cost * _NANO).to_integral_value(rounding=ROUND_CEILING))


# -- off-peak windows (LiteLLM's off_peak_pricing) -----------------------------------------------

_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_WEEKDAYS = {"mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6, "sun": 7}
#: a call is checked for being off-peak at its start, its end and this often in between
_OFF_PEAK_STEP_S = 300


def _windows(value: Any) -> list[tuple[int, int]]:
    out = []
    for text in ([value] if isinstance(value, str) else value if isinstance(value, list) else []):
        m = _WINDOW.match(text) if isinstance(text, str) else None
        if m:
            a, b, c, d = (int(x) for x in m.groups())
            out.append((a * 60 + b, c * 60 + d))
    return out


def _weekday(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 7:
        return value
    if isinstance(value, str):
        return _WEEKDAYS.get(value.strip().lower()[:3])
    return None


def _off_peak(name: str, block: Any, provider: str | None) -> dict[str, Any] | None:
    """The parsed ``off_peak_pricing`` block: rates, every-day windows, weekday rules."""
    if not isinstance(block, Mapping):
        return None
    rates = {k: _price(name, f"off_peak_pricing.{k}", v) for k, v in block.items()
             if _is_rate_field(k) and v is not None and not isinstance(v, Mapping | list)}
    if provider in DEFAULT_CACHE_READ_SHARE and "cache_read_input_token_cost" not in rates \
            and "input_cost_per_token" in rates:
        rates["cache_read_input_token_cost"] = (rates["input_cost_per_token"]
                                                * DEFAULT_CACHE_READ_SHARE[provider])
    rules = []
    for rule in block.get("windows") or ():
        if isinstance(rule, Mapping):
            days = rule.get("weekdays")
            rules.append((_windows(rule.get("hours_utc")),
                          None if days is None else {d for d in map(_weekday, days or ())
                                                     if d is not None}))
    tz = block.get("weekday_timezone")
    return {"rates": rates, "hours": _windows(block.get("hours_utc")), "rules": rules,
            "tz": tz if isinstance(tz, str) else None}


def _in(windows: list[tuple[int, int]], minute: int) -> bool:
    for start, end in windows:
        if start == end or (start < end and start <= minute < end) or (
                start > end and (minute >= start or minute < end)):
            return True
    return False


def _is_off_peak_at(op: Mapping[str, Any], epoch: float) -> bool:
    import datetime as dt

    utc = dt.datetime.fromtimestamp(epoch, dt.UTC)
    minute = utc.hour * 60 + utc.minute
    if op["hours"] and _in(op["hours"], minute):
        return True
    if not op["rules"]:
        return False
    local = utc
    if op["tz"]:
        try:
            from zoneinfo import ZoneInfo

            local = utc.astimezone(ZoneInfo(op["tz"]))
        except (ValueError, KeyError, OSError):
            local = utc
    return any((days is None or local.isoweekday() in days) and _in(hours, minute)
               for hours, days in op["rules"])


def _all_off_peak(op: Mapping[str, Any], during: tuple[float, float]) -> bool:
    start, end = during
    if not (start <= end) or end - start > 86_400:
        return False
    t = start
    while t < end:
        if not _is_off_peak_at(op, t):
            return False
        t += _OFF_PEAK_STEP_S
    return _is_off_peak_at(op, end)


def _ranges(name: str, table: Any) -> tuple[RangeTier, ...]:
    if table is None:
        return ()
    if not isinstance(table, list):
        raise ValueError(f"price of {name!r}: tiered_pricing must be a list of ranges")
    out = []
    for tier in table:
        if not isinstance(tier, Mapping):
            raise ValueError(f"price of {name!r}: each tiered_pricing range is a mapping")
        bounds = tier.get("range")
        if (not isinstance(bounds, list | tuple) or len(bounds) != 2
                or any(isinstance(b, bool) or not isinstance(b, int | float | Decimal)
                       for b in bounds)):
            continue  # LiteLLM skips a range it cannot read, too
        start, end = (Decimal(str(b)) for b in bounds)
        if not (start.is_finite() and end.is_finite()):
            continue
        rates = {k: _price(name, f"tiered_pricing.{k}", v) for k, v in tier.items()
                 if k != "range" and _is_rate_field(k) and v is not None}
        out.append(RangeTier(start, end, rates))
    return tuple(sorted(out, key=lambda r: r.start))


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return int(value)
    return None


def _read_file(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    p = Path(path)
    text = p.read_text()
    if p.suffix.lower() == ".json":
        data = json.loads(text, parse_float=Decimal)
    elif p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        raise ValueError(f"price file {p} must be .json, .yaml or .yml")
    if not isinstance(data, Mapping):
        raise ValueError(f"price file {p} must hold a mapping of model name -> prices")
    return data.get("models", data) if "_meta" in data else data


def _read_snapshot_file(path: str | os.PathLike[str]) -> tuple[str | None, dict[str, Any]] | None:
    """(snapshot date, models) when ``path`` is a whole dated table, else None."""
    p = Path(path)
    if p.suffix.lower() != ".json":
        return None
    data = json.loads(p.read_text(), parse_float=Decimal)
    meta = data.get("_meta") if isinstance(data, Mapping) else None
    if isinstance(meta, Mapping) and meta.get("snapshot_date") and isinstance(
            data.get("models"), Mapping):
        return str(meta["snapshot_date"]), dict(data["models"])
    return None


class PriceBook:
    """Prices by model name, with LiteLLM-compatible entries and name resolution."""

    def __init__(self, prices: Mapping[str, ModelPrice], snapshot_date: str | None = None,
                 *, raw: Mapping[str, Mapping[str, Any]] | None = None,
                 tools: Mapping[str, ToolPrice] | None = None) -> None:
        self._prices = dict(prices)
        #: tool name -> its price (the overrides file's ``tools`` table)
        self.tools: Mapping[str, ToolPrice] = dict(tools or {})
        self._lower = {k.lower(): v for k, v in self._prices.items()}
        self._raw = dict(raw or {})
        self.snapshot_date = snapshot_date
        self._memo: dict[tuple[str, str | None], ModelPrice | None] = {}
        self._memo_lock = threading.Lock()

    # -- construction -------------------------------------------------------------

    @classmethod
    def from_litellm(cls, table: Mapping[str, Mapping[str, Any]],
                     snapshot_date: str | None = None) -> PriceBook:
        prices = {name: ModelPrice.from_litellm(name, entry) for name, entry in table.items()}
        return cls(prices, snapshot_date, raw=table)

    @classmethod
    def bundled(cls) -> PriceBook:
        """The snapshot shipped with agent-guard (loaded once)."""
        global _BUNDLED
        if _BUNDLED is None:
            with _BUNDLED_LOCK:
                if _BUNDLED is None:
                    text = (resources.files("agent_guard.pricing") / "data" /
                            "model_prices.json").read_text()
                    data = json.loads(text, parse_float=Decimal)
                    _BUNDLED = cls.from_litellm(data["models"], data["_meta"]["snapshot_date"]
                                                ).with_list_prices()
        return _BUNDLED

    @classmethod
    def default(cls) -> PriceBook:
        """The bundled snapshot, or the table ``agent-guard prices update`` wrote, plus
        overrides: from ``$AGENT_GUARD_PRICES`` if set, else from
        :meth:`user_prices_path` if that file exists. A file written by ``prices update``
        (a whole dated table) replaces the bundled snapshot; any other file is merged
        over it field by field."""
        book = cls.bundled()
        path = os.environ.get(ENV_VAR) or (
            str(cls.user_prices_path()) if cls.user_prices_path().is_file() else None)
        if path:
            snapshot = _read_snapshot_file(path)
            if snapshot is not None:
                return cls.from_litellm(snapshot[1], snapshot[0]).with_list_prices()
            book = book.with_overrides(path)
        return book

    @staticmethod
    def user_prices_path() -> Path:
        """Where ``agent-guard prices update`` writes by default:
        ``$XDG_CONFIG_HOME/agent-guard/prices.json`` (``~/.config/...``)."""
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(base) / "agent-guard" / "prices.json"

    def with_list_prices(self) -> PriceBook:
        """This book with the providers' list prices that LiteLLM's table lacks
        (``data/anthropic_list_prices.json``: older Claude models, 1-hour cache writes, the
        long-context tier) filled in: a field the table has wins."""
        text = (resources.files("agent_guard.pricing") / "data" /
                "anthropic_list_prices.json").read_text()
        fills = json.loads(text, parse_float=Decimal)["models"]
        missing = {name: {k: v for k, v in fields.items()
                          if k not in self._raw.get(name, {})}
                   for name, fields in fills.items()}
        return self.with_overrides({n: f for n, f in missing.items() if f})

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]] | str | os.PathLike[str]
                       ) -> PriceBook:
        """A new book with ``overrides`` (``{model: {litellm fields}}`` or a JSON/YAML
        file of that shape) merged field by field over this one. A ``"tools"`` entry is
        a table of tool prices (``{"web_search": {"per_call_usd": "0.01"}}``, see
        :class:`~agent_guard.pricing.ToolPrice`), each replacing the tool's."""
        table = overrides if isinstance(overrides, Mapping) else _read_file(overrides)
        raw = dict(self._raw)
        prices = dict(self._prices)
        tools = dict(self.tools)
        tool_table = table.get(TOOLS_KEY)
        if tool_table is not None:
            if not isinstance(tool_table, Mapping):
                raise ValueError(f"the {TOOLS_KEY!r} price table must map tool names to "
                                 f"prices, got {tool_table!r}")
            tools.update({str(name): tool_price_from_data(str(name), fields)
                          for name, fields in tool_table.items()})
        for name, fields in table.items():
            if name == TOOLS_KEY:
                continue
            if not isinstance(fields, Mapping):
                raise ValueError(f"price override for {name!r} must be a mapping of fields, "
                                 f"got {fields!r}")
            merged = {**self._raw.get(name, {}), **fields}
            prices[name] = ModelPrice.from_litellm(name, merged)
            raw[name] = merged
        return PriceBook(prices, self.snapshot_date, raw=raw, tools=tools)

    # -- lookup --------------------------------------------------------------------

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and self.resolve(model) is not None

    def __len__(self) -> int:
        return len(self._prices)

    def resolve(self, model: str, provider: str | None = None) -> ModelPrice | None:
        """The price of ``model``, trying the name as given, then without provider
        prefixes and date or version suffixes; never another model family."""
        key = (model, provider)
        try:
            return self._memo[key]
        except KeyError:
            pass
        found = self._resolve(model, provider)
        with self._memo_lock:
            if len(self._memo) > 4096:
                self._memo.clear()
            self._memo[key] = found
        return found

    def _lookup(self, name: str) -> ModelPrice | None:
        return self._prices.get(name) or self._lower.get(name.lower())

    def _resolve(self, model: str, provider: str | None) -> ModelPrice | None:
        if not isinstance(model, str) or not model:
            return None
        for name in self._candidates(model, provider):
            found = self._lookup(name)
            if found is not None:
                return found
        return None

    def _candidates(self, model: str, provider: str | None) -> list[str]:
        names = [model]
        if provider:
            names.append(f"{provider}/{model}")
        parts = model.split("/")
        names += ["/".join(parts[i:]) for i in range(1, len(parts))]
        out: list[str] = []
        for name in names:
            out.append(name)
            for pattern in _DATE_SUFFIXES:
                stripped = pattern.sub("", name)
                if stripped != name:
                    out += [f"{stripped}-latest", stripped]
        return out

    def price(self, model: str, provider: str | None = None) -> ModelPrice:
        """Like :meth:`resolve` but raises :class:`UnknownModelPrice`."""
        found = self.resolve(model, provider)
        if found is None:
            raise UnknownModelPrice(model)
        return found

    def cost(self, model: str, usage: Usage, provider: str | None = None) -> CostBreakdown:
        return self.price(model, provider).cost(usage)


_BUNDLED: PriceBook | None = None
_BUNDLED_LOCK = threading.Lock()
