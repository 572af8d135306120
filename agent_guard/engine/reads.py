"""Reading a guard's budgets (a session's usage, any scope's usage in a window) and
extending a session's caps at run time. The decisions that touch the ledger are steps
(:mod:`.drive`): :class:`~.guard.Guard`'s sync and async methods drive them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..ledger import ScopeTotals
from .drive import Op, Steps
from .limits import Dimension
from .records import SessionUsage
from .usage import usd_to_nano

if TYPE_CHECKING:
    from .guard import Guard

__all__ = ["extending", "scope_usage", "session_usage"]


def session_usage(guard: Guard, session: str) -> Steps[SessionUsage]:
    """:meth:`Guard.usage`."""
    ref = guard.budgets.ref("session", session, guard.clock())
    totals = yield Op("totals", ref.scope)
    return SessionUsage.from_totals(session, totals, guard.limits.max_cost_nano)


def scope_usage(guard: Guard, kind: str, value: str | None, at: float | None
                ) -> SessionUsage:
    """:meth:`Guard.scope_usage`."""
    ref = guard.budgets.ref(kind, value, guard.clock() if at is None else at)
    totals = guard.ledger.totals(ref.scope)
    if ref.caps.history:  # a rolling window: its buckets together
        totals = summed(ref.scope, [totals, *guard.ledger.totals_many(ref.caps.history)])
    return SessionUsage.from_totals(ref.scope, totals, ref.limits.max_cost_nano)


def extending(guard: Guard, session: str, *, usd: Any = None, tokens: int | None = None,
              steps: int | None = None, model_calls: int | None = None,
              tool_calls: int | None = None) -> Steps[None]:
    """The ledger operations of :meth:`Guard.extend` (checked before any runs)."""
    scope = guard.budgets.ref("session", session, guard.clock()).scope
    ops = [] if usd is None else [Op("extend", scope, Dimension.USD_NANO,
                                     usd_to_nano(usd))]
    for dim, value in ((Dimension.TOKENS, tokens), (Dimension.STEPS, steps),
                       (Dimension.MODEL_CALLS, model_calls),
                       (Dimension.TOOL_CALLS, tool_calls)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"extend {dim} must be an int, got {value!r}")
            ops.append(Op("extend", scope, dim, value))
    for op in ops:
        _ = yield op  # (a ledger's extend may answer something: not a list's send)


def summed(scope: str, parts: Sequence[ScopeTotals]) -> ScopeTotals:
    """One scope's totals made of several (the buckets of a rolling window); extensions
    are the current bucket's."""
    spent: dict[str, int] = {}
    reserved: dict[str, int] = {}
    for part in parts:
        for dim, v in part.spent.items():
            spent[dim] = spent.get(dim, 0) + int(v)
        for dim, v in part.reserved.items():
            reserved[dim] = reserved.get(dim, 0) + int(v)
    return ScopeTotals(scope, spent, reserved, parts[0].extra)
