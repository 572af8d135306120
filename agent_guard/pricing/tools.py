"""Prices of paid tools: web search, scraping, sandboxes, image generation, data APIs.

A :class:`ToolPrice` is a fixed price per call plus, optionally, a price per unit of
what the call used (results, seconds of sandbox time, images...). Its worst case is
known before the tool runs (``max_units``), so the guard reserves it with the
model calls' caps, and settles the call at what it actually cost afterwards.

    ToolPrice(per_call_usd="0.01")                                  # $0.01 a search
    ToolPrice(per_unit_usd="0.000005", units="results", max_units="arg:max_results")
    ToolPrice(per_unit_usd="0.0001", units="seconds", max_units=300)  # sandbox time
    ToolPrice(per_unit_usd="0.04", units="arg:n")                   # images asked for
    ToolPrice(per_unit_usd="0.001", units=lambda use: use.result["pages"], max_units=50)

``units`` names what is counted: ``"results"`` (the length of a list result, or of a
JSON list text), ``"seconds"`` (the call's wall time), ``"arg:NAME"`` (a numeric
argument), or a function of a :class:`ToolUse` (its arguments, result and seconds).
``max_units`` bounds it before the call: a number, ``"arg:NAME"``, or a function of
the arguments. A per-unit price without a bound is refused: the reservation must cover
the worst case. A ``units="arg:NAME"`` price is its own bound.

The same prices as data, in the price overrides file (``AGENT_GUARD_PRICES``)::

    {"tools": {"web_search": {"per_call_usd": "0.01", "service": "Tavily"},
               "sandbox": {"per_unit_usd": "0.0001", "units": "seconds",
                           "max_units": 300}}}
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ..engine.usage import usd_to_nano

__all__ = ["ToolPrice", "ToolUse", "declared_price", "tool_price_from_data"]

#: the key of a price in a tool's ``metadata`` (``priced_tool`` sets it)
METADATA_KEY = "agent_guard_price"
_NAMED_UNITS = ("results", "seconds")
_FIELDS = ("per_call_usd", "per_unit_usd", "units", "max_units", "service")


@dataclass(frozen=True, slots=True)
class ToolUse:
    """What one tool call used: its arguments, its result (``None`` before it ran or
    when it failed) and its wall time in seconds."""

    args: Any
    result: Any = None
    seconds: float = 0.0


UnitsFn = Callable[[ToolUse], float]
MaxUnitsFn = Callable[[Any], float]


class ToolPrice:
    """The price of one tool's calls (see the module docs). ``service`` names who bills
    it (``"Tavily"``, ``"E2B"``): the FOCUS export's ``ServiceName`` and the provider of
    its records."""

    __slots__ = ("max_units", "per_call_nano", "per_unit", "service", "units")

    def __init__(self, per_call_usd: Decimal | float | int | str = 0, *,
                 per_unit_usd: Decimal | float | int | str = 0,
                 units: str | UnitsFn | None = None,
                 max_units: float | str | MaxUnitsFn | None = None,
                 service: str | None = None) -> None:
        self.per_call_nano = _nano("per_call_usd", per_call_usd)
        self.per_unit = _usd("per_unit_usd", per_unit_usd)
        if self.per_unit and units is None:
            raise ValueError("ToolPrice(per_unit_usd=...) needs units= (\"results\", "
                             "\"seconds\", \"arg:NAME\" or a function of a ToolUse)")
        if isinstance(units, str) and units not in _NAMED_UNITS and not _arg(units):
            raise ValueError(f"ToolPrice(units={units!r}) must be one of "
                             f"{', '.join(map(repr, _NAMED_UNITS))}, 'arg:NAME' or a function")
        if units is not None and not (isinstance(units, str) or callable(units)):
            raise TypeError(f"ToolPrice(units=...) must be a name or a function, got {units!r}")
        if max_units is None and isinstance(units, str) and _arg(units):
            max_units = units  # the argument is known before the call: its own bound
        if self.per_unit and max_units is None:
            raise ValueError(
                "ToolPrice: a price per unit needs max_units= (a number, 'arg:NAME' or a "
                "function of the arguments): the guard reserves a call's worst case before "
                "it runs, so it must be bounded")
        if isinstance(max_units, str) and not _arg(max_units):
            raise ValueError(f"ToolPrice(max_units={max_units!r}) must be a number, "
                             "'arg:NAME' or a function of the arguments")
        if isinstance(max_units, bool) or (max_units is not None and not isinstance(
                max_units, int | float | Decimal | str) and not callable(max_units)):
            raise TypeError(f"ToolPrice(max_units=...) must be a number, 'arg:NAME' or a "
                            f"function, got {max_units!r}")
        if isinstance(max_units, int | float | Decimal) and not (
                math.isfinite(max_units) and max_units >= 0):
            raise ValueError(f"ToolPrice(max_units=...) must be a finite number >= 0, got "
                             f"{max_units!r}")
        if service is not None and (not isinstance(service, str) or not service):
            raise TypeError(f"ToolPrice(service=...) must be a non-empty string, got "
                            f"{service!r}")
        self.units = units
        self.max_units = max_units
        self.service = service

    @property
    def unit(self) -> str | None:
        """What a unit is (``"results"``, ``"seconds"``, the argument's name, ``"units"``
        for a function), or None for a price per call only."""
        if not self.per_unit:
            return None
        units = self.units
        if callable(units) or units is None:
            return "units"
        return _arg(units) or units

    @property
    def unit_price_usd(self) -> str | None:
        """The price of one unit as exact decimal text when the price is per unit only
        (no part per call): a call's cost is then its units at this price."""
        if not self.per_unit or self.per_call_nano:
            return None
        return format(self.per_unit.normalize(), "f")

    def worst_units(self, args: Any) -> Any:
        """The most units a call with ``args`` may use (None for a price per call)."""
        if not self.per_unit:
            return None
        bound = self.max_units
        if callable(bound):
            return bound(args)
        if isinstance(bound, str):
            return _arg_value(bound, args)
        return bound

    def worst_nano(self, args: Any) -> int:
        """The most one call with ``args`` may cost (nano-USD), before it runs."""
        if not self.per_unit:
            return self.per_call_nano
        return self.per_call_nano + self._units_nano(self.worst_units(args), "max_units")

    def charge(self, use: ToolUse) -> tuple[int, Any]:
        """What a call that ran cost (nano-USD) and the units it was priced on (None
        for a price per call)."""
        if not self.per_unit:
            return self.per_call_nano, None
        units = self.units
        if callable(units):
            n = units(use)
        elif units == "seconds":
            n = max(0.0, use.seconds)
        elif units == "results":
            n = _result_count(use.result)
        else:
            n = _arg_value(str(units), use.args)
        return self.per_call_nano + self._units_nano(n, "units"), n

    def cost_nano(self, use: ToolUse) -> int:
        """What a call that ran cost (nano-USD)."""
        return self.charge(use)[0]

    def _units_nano(self, n: Any, what: str) -> int:
        if isinstance(n, bool) or not isinstance(n, int | float | Decimal):
            raise ValueError(f"ToolPrice {what} must be a number, got {n!r}")
        if not (math.isfinite(n) and n >= 0):
            raise ValueError(f"ToolPrice {what} must be a finite number >= 0, got {n!r}")
        return math.ceil(self.per_unit * Decimal(str(n)) * 1_000_000_000)

    def to_dict(self) -> dict[str, Any]:
        """The price as data (functions shown by name)."""
        def shown(v: Any) -> Any:
            return getattr(v, "__name__", "function") if callable(v) else v
        return {"per_call_usd": str(Decimal(self.per_call_nano) / 1_000_000_000),
                "per_unit_usd": str(self.per_unit), "units": shown(self.units),
                "max_units": shown(self.max_units), "service": self.service}

    def __repr__(self) -> str:
        fields = {k: v for k, v in self.to_dict().items()
                  if v not in (None, "0", "0E-9") and not (k == "per_unit_usd" and
                                                            not self.per_unit)}
        return f"ToolPrice({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


def tool_price_from_data(name: str, fields: Any) -> ToolPrice:
    """A price from the overrides file's ``tools`` table (data only: no functions)."""
    if not isinstance(fields, Mapping):
        raise ValueError(f"tool price for {name!r} must be a mapping of fields, got "
                         f"{fields!r}")
    unknown = set(fields) - set(_FIELDS)
    if unknown:
        raise ValueError(f"tool price for {name!r}: unknown fields {sorted(unknown)}; "
                         f"known: {', '.join(_FIELDS)}")
    for key in ("units", "max_units"):
        if key in fields and not isinstance(fields[key], str | int | float | Decimal):
            raise ValueError(f"tool price for {name!r}: {key} must be a name or a number")
    try:
        return ToolPrice(fields.get("per_call_usd", 0),
                         per_unit_usd=fields.get("per_unit_usd", 0),
                         units=fields.get("units"), max_units=fields.get("max_units"),
                         service=fields.get("service"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"tool price for {name!r}: {exc}") from exc


def declared_price(metadata: Mapping[str, Any] | None, tool: str | None = None
                   ) -> ToolPrice | None:
    """The price a tool declares in its metadata (``metadata["agent_guard_price"]``: a
    :class:`ToolPrice`, or the same fields as data), or None."""
    if not metadata:
        return None
    found = metadata.get(METADATA_KEY)
    if found is None or isinstance(found, ToolPrice):
        return found
    return tool_price_from_data(tool or "tool", found)


def _usd(what: str, value: Any) -> Decimal:
    """An exact dollar rate (a float read through its repr; finer than a nano-dollar is
    kept: a rate per unit may be tiny)."""
    _nano(what, value)  # the same checks as a fixed price
    try:
        return Decimal(repr(value) if isinstance(value, float) else str(value))
    except ArithmeticError as exc:
        raise ValueError(f"ToolPrice({what}=...) must be a dollar amount") from exc


def _nano(what: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"ToolPrice({what}=...) must be a number, not a bool")
    try:
        nano = usd_to_nano(value)
    except (ArithmeticError, ValueError, TypeError) as exc:
        raise ValueError(f"ToolPrice({what}=...) must be a finite dollar amount, got "
                         f"{value!r}") from exc
    if nano < 0:
        raise ValueError(f"ToolPrice({what}=...) must be >= 0, got {value!r}")
    return nano


def _arg(spec: str) -> str | None:
    return spec[4:] if spec.startswith("arg:") and len(spec) > 4 else None


def _arg_value(spec: str, args: Any) -> Any:
    name = _arg(spec)
    if isinstance(args, str):  # a tool given a JSON text
        try:
            args = json.loads(args)
        except ValueError:
            args = None
    if not isinstance(args, Mapping) or name not in args:
        raise ValueError(f"ToolPrice counts the argument {name!r}, which the call does not "
                         "give")
    return args[name]


def _result_count(result: Any) -> int:
    """How many results a tool returned: a list's length, or a JSON list text's."""
    if isinstance(result, str | bytes):
        try:
            result = json.loads(result)
        except ValueError:
            return 1 if result else 0
    if isinstance(result, Mapping):
        found = next((v for v in result.values() if isinstance(v, list)), None)
        return len(found) if found is not None else 1
    if isinstance(result, list | tuple):
        return len(result)
    return 0 if result is None else 1
