"""Declarative caps for one scope (a session, later a user, team or feature).

``Limits`` is plain data: it validates its numbers and translates itself into
the integer caps the ledger enforces, one per *dimension*.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from .usage import usd_to_nano

__all__ = ["WINDOWS", "Dimension", "Limits", "Window", "repeat_dimension", "tool_dimension"]

Window = Literal["hour", "day", "week", "month", "year"] | str
WINDOWS: tuple[str, ...] = ("hour", "day", "week", "month", "year")
# A rolling window: a duration in minutes, hours or days ("90m", "24h", "30d").
ROLLING = re.compile(r"^([1-9][0-9]*)([mhd])$")
ROLLING_UNITS = {"m": 60, "h": 3600, "d": 86400}
MAX_ROLLING_BUCKETS = 100


def rolling_window(window: str) -> tuple[int, int] | None:
    """``(bucket seconds, buckets)`` of a rolling window such as ``"24h"`` (24 buckets
    of an hour), or None for a calendar window."""
    m = ROLLING.match(window)
    if m is None:
        return None
    return ROLLING_UNITS[m.group(2)], int(m.group(1))


class Dimension:
    """Names of the counters the ledger keeps per scope."""

    USD_NANO = "usd_nano"
    TOKENS = "tokens"
    INPUT_TOKENS = "input_tokens"
    OUTPUT_TOKENS = "output_tokens"
    CACHE_READ_TOKENS = "cache_read_tokens"
    CACHE_CREATION_TOKENS = "cache_creation_tokens"
    REASONING_TOKENS = "reasoning_tokens"
    MODEL_CALLS = "model_calls"
    TOOL_CALLS = "tool_calls"
    STEPS = "steps"


def tool_dimension(tool: str) -> str:
    """The counter of one tool's calls."""
    return f"{Dimension.TOOL_CALLS}:{tool}"


def repeat_dimension(tool: str, args: object) -> str:
    """The counter of identical calls: same tool, same canonical JSON arguments."""
    canonical = json.dumps(args, sort_keys=True, separators=(",", ":"), default=str,
                           ensure_ascii=False)
    digest = hashlib.sha256(f"{tool}\x00{canonical}".encode()).hexdigest()[:24]
    return f"repeat:{digest}"


def _check_count(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Limits.{name} must be an int or None, got {value!r}")
    if value < 0:
        raise ValueError(
            f"Limits.{name} must be >= 0 (0 refuses every call), got {value}; "
            "use None for no cap"
        )


@dataclass(frozen=True)
class Limits:
    """Hard caps for one session.

    Every cap is optional (``None`` = no cap). A call is refused *before* it
    is made when its worst case does not fit in what is left.

    - ``max_cost_usd``: dollars, exact (a float is read through its repr).
    - ``max_tokens``: input + output tokens.
    - ``max_model_calls`` / ``max_steps``: counts (a step is one graph node run).
    - ``max_tool_calls``: an int for all tools together, or a mapping of tool
      name to cap, with ``"*"`` for all tools together:
      ``{"*": 40, "web_search": 5}``.
    - ``max_repeats``: how many times the same tool may run with the same
      (canonical JSON) arguments in a session; one more is refused as a loop.
    - ``thresholds``: fractions of each cap at which a soft-threshold event is
      emitted once per session (to logging and to ``Guard(on_threshold=...)``).
    - ``default_max_output_tokens``: the output reserved for a call that sets
      no ``max_tokens`` of its own (its worst case must be bounded).
    - ``input_margin``: the token estimate of a prompt is multiplied by
      ``1 + input_margin`` before it is reserved, to cover tokenizer error.
    - ``unknown_price``: what a call to a model with no known price does.
      ``"refuse"`` (default) refuses it when a dollar cap applies to the call
      (:class:`~agent_guard.errors.UnknownModelPrice`); ``"allow"`` lets it
      through at $0 (its tokens and calls are still counted), and is only
      accepted without a dollar cap, since the cap could not hold; a mapping of
      LiteLLM price fields (``{"input_cost_per_token": 1e-05,
      "output_cost_per_token": 4e-05}``) is one stated, conservative price: such
      calls are reserved at it and settled at it, or at the price of the model
      the response names when that one is known.
    - ``min_output_tokens``: where an adapter can shrink a call's output cap
      to fit the remaining budget, it never shrinks below this.
    - ``lease_seconds``: how long a reservation may stay open before the
      ledger reclaims it (a crashed worker's hold comes back then).
    - ``window``: ``None`` (the caps hold for the scope's whole life), a
      calendar period, ``"hour"``, ``"day"``, ``"week"``, ``"month"`` or
      ``"year"``, after which the scope starts again from zero, or a rolling
      duration, ``"90m"``, ``"24h"``, ``"30d"``: the caps hold for the current
      minute, hour or day plus the ones before it (see
      :class:`~agent_guard.engine.budgets.Budgets`).
    """

    max_cost_usd: Decimal | float | int | str | None = None
    max_tokens: int | None = None
    max_model_calls: int | None = None
    max_tool_calls: int | Mapping[str, int] | None = None
    max_steps: int | None = None
    max_repeats: int | None = None
    default_max_output_tokens: int = 4096
    min_output_tokens: int = 64
    input_margin: float = 0.05
    unknown_price: Literal["refuse", "allow"] | Mapping[str, Any] = "refuse"
    lease_seconds: float = 600.0
    thresholds: tuple[float, ...] = (0.5, 0.8, 1.0)
    extra_caps: Mapping[str, int] = field(default_factory=dict)
    window: Window | None = None

    def __post_init__(self) -> None:
        if self.window is not None:
            rolling = rolling_window(self.window) if isinstance(self.window, str) else None
            if self.window not in WINDOWS and rolling is None:
                raise ValueError(
                    f"Limits.window must be one of {', '.join(WINDOWS)}, a rolling duration "
                    f"such as '24h', '7d' or '90m', or None; got {self.window!r}")
            if rolling is not None and rolling[1] > MAX_ROLLING_BUCKETS:
                raise ValueError(
                    f"Limits.window={self.window!r} would sum {rolling[1]} buckets; use a "
                    f"larger unit (at most {MAX_ROLLING_BUCKETS} of them: e.g. '30d', not "
                    "'720h')")
        if self.max_cost_usd is not None:
            if isinstance(self.max_cost_usd, bool):
                raise TypeError("Limits.max_cost_usd must be a number, not a bool")
            try:
                nanos = usd_to_nano(self.max_cost_usd)
            except (ArithmeticError, ValueError, TypeError) as exc:
                raise ValueError(
                    f"Limits.max_cost_usd must be a finite dollar amount, got "
                    f"{self.max_cost_usd!r}"
                ) from exc
            if nanos < 0:
                raise ValueError(
                    f"Limits.max_cost_usd must be >= 0, got {self.max_cost_usd!r}; "
                    "use None for no dollar cap"
                )
        for name in ("max_tokens", "max_model_calls", "max_steps", "max_repeats"):
            _check_count(name, getattr(self, name))
        if isinstance(self.max_tool_calls, Mapping):
            for tool, cap in self.max_tool_calls.items():
                if not isinstance(tool, str) or not tool:
                    raise TypeError(f"Limits.max_tool_calls keys must be tool names or '*', "
                                    f"got {tool!r}")
                _check_count(f"max_tool_calls[{tool!r}]", cap)
        else:
            _check_count("max_tool_calls", self.max_tool_calls)
        for t in self.thresholds:
            if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 1:
                raise ValueError(f"Limits.thresholds must be fractions in (0, 1], got {t!r}")
        _check_count("default_max_output_tokens", self.default_max_output_tokens)
        _check_count("min_output_tokens", self.min_output_tokens)
        if not isinstance(self.input_margin, int | float) or not (
            math.isfinite(self.input_margin) and self.input_margin >= 0
        ):
            raise ValueError(f"Limits.input_margin must be a finite number >= 0, got "
                             f"{self.input_margin!r}")
        self._check_unknown_price()
        if not isinstance(self.lease_seconds, int | float) or not (
            math.isfinite(self.lease_seconds) and self.lease_seconds > 0
        ):
            raise ValueError(f"Limits.lease_seconds must be > 0, got {self.lease_seconds!r}")
        for name, cap in self.extra_caps.items():
            _check_count(f"extra_caps[{name!r}]", cap)

    def _check_unknown_price(self) -> None:
        if isinstance(self.unknown_price, Mapping):
            from ..pricing import ModelPrice

            try:
                ModelPrice.from_litellm("unknown_price", self.unknown_price)
            except ValueError as exc:
                raise ValueError(f"Limits.unknown_price: {exc}") from exc
            return
        if self.unknown_price not in ("refuse", "allow"):
            raise ValueError(
                "Limits.unknown_price must be 'refuse', 'allow' or a price mapping such as "
                "{'input_cost_per_token': 1e-05, 'output_cost_per_token': 4e-05}, got "
                f"{self.unknown_price!r}")
        if self.unknown_price == "allow" and self.max_cost_usd is not None:
            raise ValueError(
                "Limits(unknown_price='allow') admits a model without a price at $0, so "
                f"max_cost_usd={self.max_cost_usd!r} could not hold for it (its answer would "
                "be charged later, or never). State one conservative price for unpriced "
                "models, unknown_price={'input_cost_per_token': ..., "
                "'output_cost_per_token': ...}; or add the model's price "
                "(PriceBook.with_overrides, AGENT_GUARD_PRICES); or keep 'refuse'.")

    def unknown_model_price(self) -> Any:
        """The stated price of models without one (a ``ModelPrice``), or None."""
        if not isinstance(self.unknown_price, Mapping):
            return None
        from ..pricing import ModelPrice

        return ModelPrice.from_litellm("unknown_price", self.unknown_price)

    @property
    def max_cost_nano(self) -> int | None:
        return None if self.max_cost_usd is None else usd_to_nano(self.max_cost_usd)

    def caps(self) -> dict[str, int]:
        """The caps as ``{dimension: integer}``, for the ledger."""
        out: dict[str, int] = {}
        if self.max_cost_usd is not None:
            out[Dimension.USD_NANO] = usd_to_nano(self.max_cost_usd)
        pairs = (
            (Dimension.TOKENS, self.max_tokens),
            (Dimension.MODEL_CALLS, self.max_model_calls),
            (Dimension.STEPS, self.max_steps),
        )
        for dim, value in pairs:
            if value is not None:
                out[dim] = value
        if isinstance(self.max_tool_calls, Mapping):
            for tool, cap in self.max_tool_calls.items():
                out[Dimension.TOOL_CALLS if tool == "*" else tool_dimension(tool)] = cap
        elif self.max_tool_calls is not None:
            out[Dimension.TOOL_CALLS] = self.max_tool_calls
        out.update(self.extra_caps)
        return out
