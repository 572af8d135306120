"""Soft thresholds: a scope that crosses a fraction of one of its caps fires a
:class:`ThresholdEvent` once per scope, dimension, threshold and window period, across
processes (a marker counter with cap 1 in the ledger decides who fires).

:class:`ThresholdWatch` is the guard's collaborator that decides what a settlement
crossed (I/O-free: :meth:`ThresholdWatch.crossed`, :meth:`ThresholdWatch.may_defer`)
and fires the hooks; the guard's sync and async drivers read and charge the ledger.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import dimension_label, format_amount
from ..ledger import ScopeCaps, ScopeTotals
from ..ledger.base import Settlement
from .budgets import ScopeRef
from .drive import Op, Steps

__all__ = ["ThresholdEvent", "ThresholdHook", "ThresholdWatch"]

logger = logging.getLogger("agent_guard")


@dataclass(frozen=True, slots=True)
class ThresholdEvent:
    """A scope crossed a soft threshold (a fraction of one of its caps).

    ``session`` is the session whose call crossed it; ``kind``, ``value`` and
    ``period`` say which scope (``team``, ``"acme"``, ``"2026-11"``): a
    threshold fires once per scope, dimension and window period.
    """

    session: str
    dimension: str
    threshold: float
    spent: int
    cap: int
    scope: str = ""
    kind: str = "session"
    value: str | None = None
    period: str | None = None
    window: str | None = None
    # which ledger holds the scope (its redacted URL and namespace): two guards on
    # different ledgers may have scopes of the same name that are different budgets
    ledger: str = ""

    @property
    def fraction(self) -> float:
        return self.spent / self.cap if self.cap else 1.0

    @property
    def subject(self) -> str:
        """``session 't-1'``, ``team 'acme' (month 2026-11)``, ``global (day 2026-11-30)``."""
        value = self.session if self.kind == "session" and self.value is None else self.value
        who = self.kind if value is None else f"{self.kind} {value!r}"
        return who if self.period is None else f"{who} ({self.window} {self.period})"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields (amounts as integers in their dimension's unit)."""
        return {
            "session": self.session, "scope": self.scope or f"session:{self.session}",
            "kind": self.kind, "value": self.value, "window": self.window,
            "period": self.period, "dimension": self.dimension,
            "threshold": self.threshold, "spent": self.spent, "cap": self.cap,
            "fraction": round(self.fraction, 6), "message": str(self),
        }

    def __str__(self) -> str:
        d = self.dimension
        return (f"{self.subject} has used {self.fraction:.0%} of its "
                f"{dimension_label(d)} cap ({format_amount(d, self.spent)} of "
                f"{format_amount(d, self.cap)}; threshold {self.threshold:.0%})")


ThresholdHook = Callable[[ThresholdEvent], None]
# (scope, rolling window, ((dimension, cap x lowest threshold), ...)) per scope with
# thresholds: ThresholdWatch.triggers
Triggers = tuple[tuple[str, bool, tuple[tuple[str, int], ...]], ...]


def _reached_at(cap: int, threshold: float) -> int:
    """The least integer total at or above ``cap * threshold``; 0 for a cap too large
    for a float (every settle is then checked, as :meth:`ThresholdWatch.crossed` does)."""
    try:
        return math.ceil(cap * threshold)
    except OverflowError:
        return 0


class ThresholdWatch:
    """What soft thresholds one guard has fired and the spend of rolling windows' earlier
    buckets it has read; its own lock (the guard's other state has its own)."""

    def __init__(self, hooks: Sequence[ThresholdHook], ledger_id: str) -> None:
        self.hooks: list[ThresholdHook] = list(hooks)
        self.ledger_id = ledger_id
        self.fired: set[tuple[str, str, float]] = set()
        # a rolling window's current bucket -> what its earlier buckets had spent when
        # first read (past buckets change only by late settles), for its thresholds
        self.past_spent: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def watched(refs: Sequence[ScopeRef], amounts: Mapping[str, int]) -> bool:
        """Whether a soft threshold watches a capped dimension of ``amounts``."""
        return any(ref.limits.thresholds and any(dim in ref.caps.caps for dim in amounts)
                   for ref in refs)

    def may_defer(self, scopes: Sequence[ScopeRef], amounts: Mapping[str, int],
                  hint: Mapping[str, Mapping[str, int]] | None,
                  triggers: Triggers | None = None) -> bool:
        """Whether a settle may wait for the next script: no soft threshold this guard
        has not fired yet is within its reach, by the spend last seen settled on each
        scope (``hint``). Near one (or before any sight of a scope with thresholds) it
        settles at once, so the event fires at the call's end as without deferral.
        ``triggers``: :meth:`triggers` of ``scopes``, if known: a spend below every
        scope's lowest threshold (most settles) is answered from them alone."""
        if triggers is not None and hint is not None and self._below_lowest(
                triggers, amounts, hint):
            return True
        for ref in scopes:
            thresholds = ref.limits.thresholds
            if not thresholds:
                continue
            seen = hint.get(ref.scope) if hint else None
            if seen is None or (ref.caps.history and ref.scope not in self.past_spent):
                return False
            past = self.past_spent.get(ref.scope) if ref.caps.history else None
            for dim, cap in ref.caps.caps.items():
                amount = amounts.get(dim)
                if not amount or cap <= 0:
                    continue
                unfired = [t for t in thresholds if (ref.scope, dim, t) not in self.fired]
                used = seen.get(dim, 0) + (past.get(dim, 0) if past else 0) + amount
                if unfired and used >= cap * min(unfired):
                    return False
        return True

    def _below_lowest(self, triggers: Triggers, amounts: Mapping[str, int],
                      hint: Mapping[str, Mapping[str, int]]) -> bool:
        """Whether, by ``hint``, every capped total after ``amounts`` stays below its
        scope's lowest threshold (then no unfired one is within reach either)."""
        past_spent = self.past_spent
        for scope, rolling, dims in triggers:
            seen = hint.get(scope)
            if seen is None:
                return False
            past = past_spent.get(scope) if rolling else None
            if rolling and past is None:
                return False
            for dim, lowest in dims:
                amount = amounts.get(dim)
                if amount:
                    used = seen.get(dim, 0) + amount + (past.get(dim, 0) if past else 0)
                    if used >= lowest:
                        return False
        return True

    @staticmethod
    def triggers(refs: Sequence[ScopeRef]) -> Triggers:
        """What :meth:`may_fire` compares a settlement with, for these refs (built once
        per call descriptor, Planner.resolved): per scope with thresholds, whether it is a
        rolling window, and each capped dimension with the lowest threshold's amount
        (rounded up: an integer total reaches ``cap * lowest`` exactly when it reaches its
        ceiling, and integers compare faster than an integer and a float)."""
        return tuple(
            (ref.scope, bool(ref.caps.history),
             tuple([(dim, _reached_at(cap, min(ref.limits.thresholds)))
                    for dim, cap in ref.caps.caps.items() if cap > 0]))
            for ref in refs if ref.limits.thresholds)

    def may_fire(self, triggers: Triggers, spent: Mapping[str, Mapping[str, int]]) -> bool:
        """Whether :meth:`check` of a counted settlement (``spent``: its spent totals)
        has anything to read (a rolling window's earlier buckets, :meth:`unread_windows`)
        or may fire (a total at or above a scope's lowest threshold, :meth:`crossed`).
        False for nearly every settle: the check is skipped, with its steps per scope.
        (A dimension this settle did not count is compared as 0: at worst a True that
        the check then finds nothing in.)"""
        past_spent = self.past_spent
        for scope, rolling, dims in triggers:
            totals = spent.get(scope)
            if totals is None:
                continue
            if not rolling:
                for dim, lowest in dims:
                    if totals.get(dim, 0) >= lowest:
                        return True
                continue
            past = past_spent.get(scope)
            if past is None:  # the earlier buckets are to be read first
                return True
            for dim, lowest in dims:
                if totals.get(dim, 0) + past.get(dim, 0) >= lowest:
                    return True
        return False

    def crossed(self, session: str, refs: Sequence[ScopeRef], settled: Settlement
                ) -> list[tuple[ScopeCaps, str, ThresholdEvent]]:
        """Soft thresholds this settlement crossed and this process has not seen fired:
        (marker scope, marker dimension, event) each. A marker counter with cap 1 in the
        scope decides, across processes, who fires (once per scope and window)."""
        out: list[tuple[ScopeCaps, str, ThresholdEvent]] = []
        if not settled:
            return out
        for ref in refs:
            thresholds = ref.limits.thresholds
            spent = settled.spent.get(ref.scope)
            if not thresholds or not spent:
                continue
            past = self.past_spent.get(ref.scope) if ref.caps.history else None
            lowest = min(thresholds)
            for dim, cap in ref.caps.caps.items():
                if dim not in spent or cap <= 0:
                    continue
                used = spent[dim] + past.get(dim, 0) if past else spent[dim]
                if used < cap * lowest:
                    continue  # below every threshold (most settles): nothing to check
                for t in thresholds:
                    key = (ref.scope, dim, t)
                    if used < cap * t or key in self.fired:
                        continue
                    if len(self.fired) > 100_000:  # bounded: the ledger marker dedupes
                        self.fired.clear()
                    self.fired.add(key)
                    marker = f"threshold:{dim}:{t}"
                    # a rolling window's marker counts over the window's buckets: once
                    # per window length, not once per bucket
                    out.append((ScopeCaps(ref.scope, {marker: 1}, ref.caps.history), marker,
                                ThresholdEvent(session, dim, t, used, cap, scope=ref.scope,
                                               kind=ref.kind, value=ref.value,
                                               period=ref.period, window=ref.limits.window,
                                               ledger=self.ledger_id)))
        return out

    def unread_windows(self, refs: Sequence[ScopeRef], settled: Settlement
                       ) -> list[ScopeRef]:
        """Rolling windows with thresholds whose earlier buckets this guard has not read
        since their current bucket began (one read per bucket and process)."""
        if not settled:
            return []
        return [ref for ref in refs if ref.caps.history and ref.limits.thresholds
                and ref.scope in settled.spent and ref.scope not in self.past_spent]

    def keep_past(self, ref: ScopeRef, buckets: Sequence[ScopeTotals]) -> None:
        sums: dict[str, int] = {}
        for totals in buckets:
            for dim, amount in totals.spent.items():
                sums[dim] = sums.get(dim, 0) + int(amount)
        with self._lock:
            if len(self.past_spent) >= 10_000:
                self.past_spent.clear()
            self.past_spent[ref.scope] = sums

    def check(self, session: str, refs: Sequence[ScopeRef], settled: Settlement
              ) -> Steps[None]:
        """Read what the decision needs, fire what ``settled`` crossed: the marker charge
        that decides who fires, across processes, once per scope and window."""
        for ref in self.unread_windows(refs, settled):
            self.keep_past(ref, (yield Op("totals_many", ref.caps.history)))
        for scope, marker, event in self.crossed(session, refs, settled):
            if (yield Op("charge", [scope], {marker: 1})) is None:
                self.fire(event)

    def fire(self, event: ThresholdEvent) -> None:
        logger.warning("agent-guard: %s", event)
        for hook in self.hooks:
            try:
                hook(event)
            except Exception:
                logger.exception("agent-guard: threshold hook %r failed", hook)
