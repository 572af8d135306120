"""Model prices with LiteLLM's field names and semantics, exact to the token.

A price is per token, as an exact ``Decimal``. The cost of one call is:

- uncached prompt tokens at ``input_cost_per_token``;
- cache reads at ``cache_read_input_token_cost`` (else the input rate);
- cache writes at ``cache_creation_input_token_cost`` (else the input rate);
- output tokens at ``output_cost_per_token``, except that when
  ``output_cost_per_reasoning_token`` is set the reasoning tokens (a part of
  the output tokens) are charged at that rate instead: each token once;
- when the prompt (all input tokens, cached included) is *above* a tier's
  threshold (``*_above_128k_tokens``...), that tier's rates apply to the whole
  request, input and output; the highest exceeded threshold wins.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import UnknownModelPrice
from ..usage import Usage, usd_to_nano

__all__ = ["CostBreakdown", "ModelPrice", "PriceBook", "PriceTier"]

ENV_VAR = "AGENT_GUARD_PRICES"
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


@dataclass(frozen=True, slots=True)
class PriceTier:
    """Rates that apply to the whole request when the prompt exceeds ``threshold_tokens``."""

    threshold_tokens: int
    input: Decimal
    output: Decimal
    cache_read: Decimal | None
    cache_creation: Decimal | None


@dataclass(frozen=True, slots=True)
class CostBreakdown:
    """The exact cost of one call, by kind of token, and its ledger amount."""

    model: str
    input_usd: Decimal
    cache_read_usd: Decimal
    cache_creation_usd: Decimal
    output_usd: Decimal
    reasoning_usd: Decimal
    tier_threshold: int | None = None

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
    """Per-token prices of one model."""

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

    @classmethod
    def from_litellm(cls, name: str, entry: Mapping[str, Any]) -> ModelPrice:
        if not isinstance(entry, Mapping):
            raise ValueError(f"price of {name!r} must be a mapping of LiteLLM fields")
        for required in ("input_cost_per_token", "output_cost_per_token"):
            if required not in entry:
                raise ValueError(
                    f"price of {name!r} needs {required!r} (USD per token), e.g. "
                    "{'input_cost_per_token': 2.5e-06, 'output_cost_per_token': 1e-05}"
                )

        def opt(field: str) -> Decimal | None:
            return None if entry.get(field) is None else _price(name, field, entry[field])

        base = cls(
            model=name,
            provider=entry.get("litellm_provider"),
            input=_price(name, "input_cost_per_token", entry["input_cost_per_token"]),
            output=_price(name, "output_cost_per_token", entry["output_cost_per_token"]),
            cache_read=opt("cache_read_input_token_cost"),
            cache_creation=opt("cache_creation_input_token_cost"),
            reasoning=opt("output_cost_per_reasoning_token"),
            max_input_tokens=_int_or_none(entry.get("max_input_tokens")),
            max_output_tokens=_int_or_none(entry.get("max_output_tokens")),
        )
        thresholds: dict[int, dict[str, Decimal]] = {}
        for field, value in entry.items():
            m = _TIER_FIELD.match(field)
            if m and value is not None:
                rates = thresholds.setdefault(int(m.group(2)) * 1000, {})
                rates[_TIER_ATTR[m.group(1)]] = _price(name, field, value)
        tiers = tuple(
            PriceTier(
                threshold_tokens=t,
                input=r.get("input", base.input),
                output=r.get("output", base.output),
                cache_read=r.get("cache_read", base.cache_read),
                cache_creation=r.get("cache_creation", base.cache_creation),
            )
            for t, r in sorted(thresholds.items())
        )
        return replace(base, tiers=tiers)

    def _rates(self, input_tokens: int
               ) -> tuple[Decimal, Decimal, Decimal | None, Decimal | None, int | None]:
        inp, out, read, write = self.input, self.output, self.cache_read, self.cache_creation
        tier_threshold = None
        for tier in self.tiers:  # ascending: the last exceeded one wins
            if input_tokens > tier.threshold_tokens:
                inp, out = tier.input, tier.output
                read, write = tier.cache_read, tier.cache_creation
                tier_threshold = tier.threshold_tokens
        return inp, out, read, write, tier_threshold

    def cost_nano(self, usage: Usage) -> int:
        """``cost(usage).total_nano`` (the ledger amount) without building the breakdown:
        the same Decimal sums in the same order, rounded up to the next nano-USD."""
        inp, out, read, write, _ = self._rates(usage.input_tokens)
        reasoning_usd = _ZERO
        plain_output = usage.output_tokens
        if self.reasoning is not None and usage.reasoning_tokens:
            reasoning_usd = usage.reasoning_tokens * self.reasoning
            plain_output -= usage.reasoning_tokens
        prompt = (usage.uncached_input_tokens * inp
                  + usage.cache_read_tokens * (read if read is not None else inp)
                  + usage.cache_creation_tokens * (write if write is not None else inp))
        total = prompt + (plain_output * out + reasoning_usd)
        return int((total * _NANO).to_integral_value(rounding=ROUND_CEILING))

    def cost(self, usage: Usage) -> CostBreakdown:
        """The exact cost of ``usage`` at these prices."""
        inp, out, read, write, tier_threshold = self._rates(usage.input_tokens)
        reasoning_usd = Decimal(0)
        plain_output = usage.output_tokens
        if self.reasoning is not None and usage.reasoning_tokens:
            reasoning_usd = usage.reasoning_tokens * self.reasoning
            plain_output -= usage.reasoning_tokens
        return CostBreakdown(
            model=self.model,
            input_usd=usage.uncached_input_tokens * inp,
            cache_read_usd=usage.cache_read_tokens * (read if read is not None else inp),
            cache_creation_usd=usage.cache_creation_tokens * (write if write is not None else inp),
            output_usd=plain_output * out,
            reasoning_usd=reasoning_usd,
            tier_threshold=tier_threshold,
        )


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


class PriceBook:
    """Prices by model name, with LiteLLM-compatible entries and name resolution."""

    def __init__(self, prices: Mapping[str, ModelPrice], snapshot_date: str | None = None,
                 *, raw: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self._prices = dict(prices)
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
                    _BUNDLED = cls.from_litellm(data["models"], data["_meta"]["snapshot_date"])
        return _BUNDLED

    @classmethod
    def default(cls) -> PriceBook:
        """The bundled snapshot plus overrides from ``$AGENT_GUARD_PRICES`` if set."""
        book = cls.bundled()
        path = os.environ.get(ENV_VAR)
        if path:
            book = book.with_overrides(path)
        return book

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]] | str | os.PathLike[str]
                       ) -> PriceBook:
        """A new book with ``overrides`` (``{model: {litellm fields}}`` or a JSON/YAML
        file of that shape) merged field by field over this one."""
        table = overrides if isinstance(overrides, Mapping) else _read_file(overrides)
        raw = dict(self._raw)
        prices = dict(self._prices)
        for name, fields in table.items():
            if not isinstance(fields, Mapping):
                raise ValueError(f"price override for {name!r} must be a mapping of fields, "
                                 f"got {fields!r}")
            merged = {**self._raw.get(name, {}), **fields}
            prices[name] = ModelPrice.from_litellm(name, merged)
            raw[name] = merged
        return PriceBook(prices, self.snapshot_date, raw=raw)

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
