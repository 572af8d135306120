"""The checks a :class:`~.guard.Guard` makes of what it is given, once, when it is made:
its attributes, its tool prices, whether its ledger keeps the budgets' windows, and which
budgets that ledger holds."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from ..ledger import Ledger, redact_url
from ..pricing import ToolPrice
from .budgets import Budgets

__all__ = ["check_attributes", "check_ledger_retention", "check_tool_prices",
           "ledger_identity"]

logger = logging.getLogger("agent_guard")


def check_ledger_retention(budgets: Budgets, ledger: Ledger) -> None:
    inner = getattr(ledger, "inner", ledger)  # FailOpenLedger wraps the backend
    idle = getattr(inner, "max_idle_seconds", None)
    budgets.check_retention(idle, f"{type(inner).__name__}(max_idle_seconds=...)")
    ttl = getattr(inner, "scope_ttl_seconds", None)
    budgets.check_retention(ttl, f"{type(inner).__name__}(scope_ttl_seconds=...)")
    if getattr(inner, "max_scopes", None) is not None and budgets.kinds:
        logger.warning(
            "agent-guard: %s(max_scopes=...) may forget the least recently used scopes, "
            "including a %s budget, which would then start again from zero",
            type(inner).__name__, "/".join(budgets.kinds))


def ledger_identity(ledger: Ledger) -> str:
    """Which budgets a ledger holds: its redacted URL and key namespace; an in-process
    ledger is its own (two ``memory://`` ledgers are different budgets)."""
    inner = getattr(ledger, "inner", ledger)  # a fail-open wrapper: the backend's
    url = redact_url(getattr(inner, "url", "") or "")
    if not url or url.startswith("memory:"):
        return f"{url or type(inner).__name__}#{id(inner):x}"
    return f"{url}#{getattr(inner, 'prefix', '')}"


def check_tool_prices(prices: Mapping[str, ToolPrice]) -> dict[str, ToolPrice]:
    out: dict[str, ToolPrice] = {}
    for name, price in prices.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"Guard(tool_prices=...) keys must be tool names, got {name!r}")
        if not isinstance(price, ToolPrice):
            raise TypeError(f"Guard(tool_prices={{{name!r}: ...}}) must be a ToolPrice, "
                            f"got {type(price).__name__}")
        out[name] = price
    return out


def check_attributes(attributes: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in attributes.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"Guard(attributes=...) keys must be non-empty strings, got {key!r}")
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise TypeError(f"Guard(attributes={{{key!r}: ...}}) must be a string, got "
                            f"{value!r}")
        out[key] = str(value)
    return out
