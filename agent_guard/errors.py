"""The exceptions agent-guard raises.

Every error names the session, the cap, what was spent and reserved, and what
to do about it, so the message alone is enough to act on.

::

    GuardError                 every error agent-guard raises on purpose (a GraphBubbleUp
                               once LangGraph is loaded)
      GuardStop                a cap stopped a call or a run; nothing was spent on it
        BudgetExceeded         a cap on dollars or tokens
        StepLimitExceeded      a cap on a count: model calls, tool calls, graph steps
          LoopDetected         the same tool called with the same arguments too often
        OutputCapExceeded      a stream ran past the output reserved for it
      SessionRequired          a run names no session
      UnknownModelPrice        a dollar cap needs a price the guard does not have
      LedgerUnavailable        the ledger cannot be reached (fail closed)

``except GuardStop`` catches every stop. ``StepLimitExceeded``, ``LoopDetected`` and
``OutputCapExceeded`` are not ``BudgetExceeded`` (they were before 0.1.0's layout
cut): code that caught ``BudgetExceeded`` for every stop catches ``GuardStop`` now.
"""

from __future__ import annotations

import sys
import threading
from decimal import Decimal

__all__ = [
    "BudgetExceeded",
    "GuardError",
    "GuardStop",
    "LedgerUnavailable",
    "LoopDetected",
    "OutputCapExceeded",
    "SessionRequired",
    "StepLimitExceeded",
    "UnknownModelPrice",
]

# Dimensions measured in nano-USD are shown as dollars in messages.
_MONEY_DIMENSIONS = frozenset({"usd_nano"})


_LABELS = {"usd_nano": "cost", "tokens": "tokens (input + output)"}


def dimension_label(dimension: str) -> str:
    if dimension.startswith("repeat:"):
        return "identical calls of one tool"
    if dimension.startswith("tool_calls:"):
        return f"calls of tool {dimension.split(':', 1)[1]!r}"
    return _LABELS.get(dimension, dimension.replace("_", " "))


def format_amount(dimension: str, amount: int) -> str:
    if dimension in _MONEY_DIMENSIONS:
        return f"${Decimal(amount) / 10**9:.6f}"
    return f"{amount:,}"


class _BubbleUp(Exception):
    """The base of :class:`GuardError` until LangGraph is loaded (see there)."""


class GuardError(_BubbleUp):
    """Base class of every error agent-guard raises on purpose.

    It derives from LangGraph's ``GraphBubbleUp`` (itself an ``Exception``) so
    that a refusal is a hard stop: LangGraph's retry policies and node error
    handlers, ``ToolNode(handle_tool_errors=True)`` and LangChain's retry,
    fallback and tool-error middleware all re-raise ``GraphBubbleUp``
    untouched instead of retrying it, answering it with another model or
    turning it into an error message the agent reads and ignores.

    This module does not import LangGraph (the engine and the ledgers run without
    it): ``GraphBubbleUp`` becomes the base as soon as LangGraph is loaded, when this
    module is imported after it, when an adapter is imported, and at the latest when
    a ``GuardError`` is created (:func:`link_graph_bubble_up`); code that catches
    ``GraphBubbleUp`` has LangGraph loaded, so it always sees one.
    """

    def __init__(self, *args: object) -> None:
        if not _linked:
            link_graph_bubble_up()
        super().__init__(*args)


_linked = False
_link_lock = threading.Lock()


def link_graph_bubble_up() -> bool:
    """Make :class:`GuardError` a LangGraph ``GraphBubbleUp`` if LangGraph is loaded
    (without loading it); True once it is one."""
    global _linked
    if _linked:
        return True
    lg_errors = sys.modules.get("langgraph.errors")
    bubble = getattr(lg_errors, "GraphBubbleUp", None)
    if bubble is None:
        return False
    with _link_lock:
        if not _linked:
            GuardError.__bases__ = (bubble,)
            _linked = True
    return True


class GuardStop(GuardError):
    """A cap stopped a call (and, under ``guarded_graph`` or ``GuardMiddleware``, the
    run): the base of every stop, with the numbers of the cap that refused.

    Nothing was spent on the refused call: the check runs before the provider
    is contacted. ``scope`` is the ledger scope whose cap refused (the session's,
    or a team's, feature's... when ``Budgets`` charge the call to them),
    ``dimension`` what is capped, and ``cap``, ``spent``, ``reserved`` and
    ``requested`` are in that dimension's unit (nano-USD for ``"usd_nano"``).
    """

    def __init__(
        self,
        *,
        session: str,
        scope: str,
        dimension: str,
        cap: int,
        spent: int,
        reserved: int,
        requested: int,
        hint: str | None = None,
    ) -> None:
        self.session = session
        self.scope = scope
        self.dimension = dimension
        self.cap = cap
        self.spent = spent
        self.reserved = reserved
        self.requested = requested
        self.hint = hint or self._default_hint()
        super().__init__(self._message())

    def _default_hint(self) -> str:
        return (
            "Raise the cap in Limits(...), start a new session, or lower the call's "
            "max_tokens so its worst case fits."
        )

    @property
    def remaining(self) -> int:
        return max(0, self.cap - self.spent - self.reserved)

    def _message(self) -> str:
        d = self.dimension

        def amount(value: int) -> str:
            return format_amount(d, value)

        whose = (f"session {self.session!r} ({self.scope})"
                 if self.scope == f"session:{self.session}" or not self.scope else
                 f"session {self.session!r} is charged to {self.scope}, whose")
        return (
            f"{type(self).__name__}: {whose} cap on "
            f"{dimension_label(d)} is {amount(self.cap)}; spent {amount(self.spent)}, "
            f"reserved {amount(self.reserved)}, this call needs up to "
            f"{amount(self.requested)} (remaining {amount(self.remaining)}). "
            f"Nothing was spent on this call. {self.hint}"
        )

    def __reduce__(self):  # keep pickling (multiprocessing) working with keyword-only init
        return (
            _rebuild,
            (
                type(self),
                {
                    "session": self.session,
                    "scope": self.scope,
                    "dimension": self.dimension,
                    "cap": self.cap,
                    "spent": self.spent,
                    "reserved": self.reserved,
                    "requested": self.requested,
                    "hint": self.hint,
                },
            ),
        )


def _rebuild(cls: type[GuardStop], kwargs: dict) -> GuardStop:
    return cls(**kwargs)


class BudgetExceeded(GuardStop):
    """A call does not fit in a cap on dollars or tokens."""


class StepLimitExceeded(GuardStop):
    """A count cap (model calls, tool calls, steps) was reached."""

    def _default_hint(self) -> str:
        return (
            "The agent may be looping. Raise the limit in Limits(...) if this much work "
            "is expected, or start a new session."
        )


class LoopDetected(StepLimitExceeded):
    """The same tool was called with the same arguments too many times."""

    def _default_hint(self) -> str:
        return (
            "The agent keeps repeating the same tool call; it is probably stuck in a loop. "
            "Raise Limits(max_repeats=...) if identical calls are expected."
        )


class OutputCapExceeded(GuardStop):
    """A stream produced more output than its reservation covered: the stream was
    stopped and what was streamed is charged."""

    def _default_hint(self) -> str:
        return (
            "The provider streamed past the call's max_tokens. Set max_tokens on the "
            "model so the provider stops by itself."
        )

    def _message(self) -> str:
        return (
            f"OutputCapExceeded: session {self.session!r}: a streamed answer reached "
            f"{self.spent:,} output tokens, past the {self.cap:,} reserved for it; the stream "
            f"was stopped and what was streamed is charged. {self.hint}"
        )


class UnknownModelPrice(GuardError):
    """No price is known for a model, and a dollar cap needs one."""

    def __init__(self, model: str, *, session: str | None = None) -> None:
        self.model = model
        self.session = session
        where = f" in session {session!r}" if session else ""
        super().__init__(
            f"No price is known for model {model!r}{where}, and a dollar cap is set, so the "
            "call was refused before anything was spent. Add a price: "
            "Guard(prices=PriceBook.default().with_overrides({"
            f"{model!r}: {{'input_cost_per_token': 2.5e-06, 'output_cost_per_token': 1e-05}}}})), "
            "or point AGENT_GUARD_PRICES at a JSON/YAML file of the same shape, or state "
            "one conservative price for every unpriced model: Limits(unknown_price="
            "{'input_cost_per_token': ..., 'output_cost_per_token': ...}). Without a "
            "dollar cap, Limits(unknown_price='allow') counts its tokens and calls at $0."
        )


class SessionRequired(GuardError):
    """A run names no session, so no session's caps could be applied to it.

    Runs without a session are never pooled silently (one user's spend would refuse
    another's calls): the call is refused before anything is spent."""

    def __init__(self, where: str = "this run") -> None:
        super().__init__(
            f"agent-guard: {where} has no session, so no caps can be applied to it and "
            "nothing was spent. Name the session of each run: "
            "config={'metadata': {'session_id': 'user-42'}} (any chain, model or agent), "
            "or a LangGraph graph's thread, config={'configurable': {'thread_id': "
            "'user-42'}}; or give the guard a fixed "
            "session on purpose: GuardCallbackHandler(..., session_id='shared') / "
            "GuardMiddleware(..., session_id=...) / guarded_graph(..., session_id=...), "
            "which pools every run without a session into that one budget.")


class LedgerUnavailable(GuardError):
    """The ledger backend could not be reached; the call was refused (fail closed).

    ``Guard(..., fail="open")`` admits calls against local caps instead and reconciles
    when the backend answers again (:class:`agent_guard.ledger.failover.FailOpenLedger`).
    """

    def __init__(self, url: str, cause: BaseException | None = None, *,
                 hint: str | None = None) -> None:
        self.url = url
        self.cause = cause
        detail = f": {cause!r}" if cause is not None else ""
        self.hint = hint or (
            "The call was refused so no unaccounted money is spent (Guard(fail='closed'), "
            "the default). Check that the server is running and reachable and retry; use "
            "a local ledger (memory:// or sqlite:///path); or, to keep agents running "
            "through an outage and reconcile afterwards, use Guard(..., fail='open')."
        )
        super().__init__(f"The budget ledger at {url} is unavailable{detail}. {self.hint}")


link_graph_bubble_up()  # LangGraph loaded before agent-guard
