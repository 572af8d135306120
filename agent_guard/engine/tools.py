"""Tool calls and graph steps: counted (steps, tool calls, identical calls), and a priced
tool reserved at its worst case and settled at what it cost. Each decision is written once
as steps (:mod:`.drive`); :class:`~.guard.Guard`'s sync and async methods drive it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

from ..ledger import Denial, Reservation, ScopeCaps
from ..pricing import ToolPrice, ToolUse
from .admission import _NOT_RUN, NO_ARGS, ToolAdmission, finish
from .budgets import ScopeRef
from .drive import Op, Steps
from .limits import Dimension, repeat_dimension, tool_dimension
from .records import CallRecord, Outcome
from .usage import Usage

if TYPE_CHECKING:
    from .guard import Guard

__all__ = ["ToolCalls"]

logger = logging.getLogger("agent_guard")

_NO_ARGS = NO_ARGS


class _ToolPlan:
    """What one tool call would reserve (or charge, when it is free)."""

    __slots__ = ("amounts", "args", "attributes", "guard", "price", "refs", "repeat",
                 "session", "tool", "worst")

    def __init__(self, guard: Guard, session: str, tool: str | None, args: Any,
                 attributes: Mapping[str, str] | None, refs: list[ScopeRef],
                 amounts: dict[str, int], repeat: ScopeCaps | None,
                 price: ToolPrice | None, worst: int) -> None:
        self.guard, self.session, self.tool, self.args = guard, session, tool, args
        self.attributes, self.refs, self.amounts, self.repeat = attributes, refs, amounts, repeat
        self.price, self.worst = price, worst

    def admit(self, reservation: Reservation | None) -> ToolAdmission:
        return ToolAdmission(
            session=self.session, tool=self.tool, args=self.args, price=self.price,
            reservation=reservation, reserved_nano=self.worst if reservation else 0,
            started_at=self.guard.clock(), scopes=tuple(self.refs),
            attributes=self.guard.attributes_for(self.attributes))


class ToolCalls:
    """A guard's tool calls and steps: admission, settlement, the counts they charge."""

    __slots__ = ("guard",)

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def price(self, tool: str | None, declared: ToolPrice | None = None) -> ToolPrice | None:
        """:meth:`Guard.tool_price`."""
        if not tool:
            return None
        guard = self.guard
        return guard.tool_prices.get(tool) or declared or guard.prices.tools.get(tool)

    def admit(self, session: str, tool: str | None, args: Any,
              attributes: Mapping[str, str] | None, price: ToolPrice | None
              ) -> Steps[ToolAdmission]:
        """:meth:`Guard.before_tool_call`."""
        guard = self.guard
        plan = self.plan(session, tool, args, attributes, price)
        if plan.repeat is not None:
            denial = yield Op("charge", [plan.repeat], dict.fromkeys(plan.repeat.caps, 1))
            if denial is not None:
                raise guard._refusal(session, denial, plan.refs)
        reservation = None
        if plan.worst:
            result = yield Op("reserve", [r.caps for r in plan.refs], plan.amounts,
                              lease_seconds=guard.limits.lease_seconds)
            denial, reservation = (result, None) if isinstance(result, Denial) else \
                (None, result)
        else:
            denial = yield from self.charge(session, plan.refs, plan.amounts)
        if denial is not None:
            if plan.repeat is not None:
                for dim in plan.repeat.caps:
                    yield Op("extend", plan.repeat.scope, dim, 1)
            raise guard._refusal(session, denial, plan.refs)
        return plan.admit(reservation)

    def done(self, admission: ToolAdmission | None, record: CallRecord,
             amounts: dict[str, int]) -> Steps[CallRecord]:
        """:meth:`Guard.tool_call_done` after :meth:`settlement`."""
        if admission is None or admission.reservation is None:
            # an unpriced tool call (its counts were charged up front): report it once
            if admission is None or finish(admission, record) is record:
                self.guard._emit(record)
            return record
        return (yield from self.guard._close(admission, record, amounts))

    @staticmethod
    def not_run(admission: ToolAdmission) -> Steps[None]:
        """:meth:`Guard.tool_call_not_run`."""
        if admission.reservation is not None and finish(
                admission, _NOT_RUN) is _NOT_RUN:
            yield Op("release", admission.reservation)

    def plan(self, session: str, tool: str | None, args: Any,
             attributes: Mapping[str, str] | None, declared: ToolPrice | None
             ) -> _ToolPlan:
        guard = self.guard
        refs = guard.scope_refs(session, attributes, tool=tool or None)
        amounts, repeat = self.amounts(tool, args, refs[0].scope)
        price = self.price(tool, declared)
        worst = 0
        if price is not None:
            try:
                worst = price.worst_nano(None if args is _NO_ARGS else args)
            except ValueError as exc:
                raise ValueError(f"agent-guard: the worst case of a {tool!r} call cannot "
                                 f"be priced, so it is not run: {exc}") from exc
        if worst:
            amounts[Dimension.USD_NANO] = worst
        return _ToolPlan(guard, session, tool, args, attributes, refs, amounts, repeat,
                         price, worst)

    def settlement(
        self, session: str, tool: str, outcome: Outcome, saved_nano: int,
        started_at: float | None, run_id: str | None, node: str | None,
        tags: Sequence[str], attributes: Mapping[str, str] | None,
        admission: ToolAdmission | None, result: Any,
    ) -> tuple[CallRecord, dict[str, int]]:
        """The record of a finished tool call and the amounts its reservation settles."""
        guard = self.guard
        now = guard.clock()
        if admission is not None:
            started_at = admission.started_at if started_at is None else started_at
            scopes = admission.scopes
            attrs = admission.attributes
        else:
            scopes = tuple(guard.scope_refs(session, attributes, tool=tool or None))
            attrs = guard.attributes_for(attributes)
        started = now if started_at is None else started_at
        price = admission.price if admission is not None else None
        reserved = admission.reserved_nano if admission is not None else 0
        cost, estimated, units = 0, False, None
        if admission is not None and admission.reservation is not None and price is not None:
            args = None if admission.args is _NO_ARGS else admission.args
            if outcome == "ok":
                use = ToolUse(args, result, max(0.0, now - admission.started_at))
                try:
                    cost, units = price.charge(use)
                except Exception:  # a price function that fails charges the worst case
                    logger.exception("agent-guard: the price of a %r call could not be "
                                     "computed; it is charged its worst case", tool)
                    cost, estimated = reserved, True
                if cost > reserved:
                    logger.warning("agent-guard: a %r call cost $%s, above the worst case "
                                   "its price declares ($%s): raise its max_units", tool,
                                   _usd_text(cost), _usd_text(reserved))
            elif outcome != "cache_hit":  # failed after it started: it may have billed
                cost, estimated = reserved, True
            if estimated:  # charged its worst case: its bound of units
                with contextlib.suppress(Exception):
                    units = price.worst_units(args)
            if isinstance(units, Decimal):
                units = float(units)
        record = CallRecord(
            session=session, run_id=run_id, model="",
            provider=price.service if price is not None else None, usage=Usage(),
            cost_nano=cost, reserved_nano=reserved, usage_estimated=estimated,
            outcome=outcome, started_at=started, ended_at=now,
            saved_nano=max(0, int(saved_nano)), node=node, tags=tuple(tags), kind="tool",
            tool=tool, attributes=attrs, scopes=tuple(r.scope for r in scopes),
            units=units, unit=price.unit if price is not None and units is not None else None,
            unit_price_usd=price.unit_price_usd if price is not None and units is not None
            else None,
            **cast(dict[str, Any], {"record_id": admission.reservation.id}
                   if admission is not None and admission.reservation is not None else {}),
        )
        amounts = dict(admission.reservation.amounts) if admission is not None and \
            admission.reservation is not None else {}
        amounts[Dimension.USD_NANO] = cost
        return record, amounts

    def step(self, session: str, n: int, attributes: Mapping[str, str] | None
             ) -> Steps[None]:
        """:meth:`Guard.before_step`."""
        guard = self.guard
        refs = guard.scope_refs(session, attributes)
        denial = yield from self.charge(session, refs, {Dimension.STEPS: n})
        if denial is not None:
            raise guard._refusal(session, denial, refs)

    def amounts(self, tool: str | None, args: Any, session_scope: str
                ) -> tuple[dict[str, int], ScopeCaps | None]:
        """The tool call's amounts, and its identical-call counter (session only)."""
        amounts = {Dimension.TOOL_CALLS: 1}
        repeat: ScopeCaps | None = None
        if tool:
            amounts[tool_dimension(tool)] = 1
            limits = self.guard.limits
            if limits.max_repeats is not None and args is not _NO_ARGS:
                repeat = ScopeCaps(session_scope,
                                   {repeat_dimension(tool, args): limits.max_repeats})
        return amounts, repeat

    def charge(self, session: str, refs: Sequence[ScopeRef], amounts: Mapping[str, int]
               ) -> Steps[Denial | None]:
        """Charge counts (steps, tool calls) to every scope; when a soft threshold watches
        them, read the totals in the same step and fire what the charge crossed."""
        watch = self.guard._watch
        scopes = [r.caps for r in refs]
        if not watch.watched(refs, amounts):
            return (yield Op("charge", scopes, amounts))
        result = yield Op("charge_read", scopes, amounts)
        if isinstance(result, Denial):
            return result
        yield from watch.check(session, refs, result)
        return None


def _usd_text(nano: int) -> str:
    return f"{Decimal(nano) / 1_000_000_000:f}"
