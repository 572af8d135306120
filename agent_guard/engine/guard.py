"""The framework-agnostic engine: estimate, reserve, call, settle.

Adapters (the LangChain callback, the agent middleware, the graph wrapper)
describe a call as a :class:`ModelCall`, ask :meth:`Guard.before_model_call`
for an :class:`Admission` (or get a :class:`~agent_guard.errors.BudgetExceeded`
before anything is spent), make the call, and hand the reported usage to
:meth:`Guard.after_model_call`. Every method has an ``a``-prefixed async twin
that awaits the ledger instead of blocking on it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, Literal, cast

from ..errors import (
    BudgetExceeded,
    GuardError,
    GuardStop,
    LedgerUnavailable,
    LoopDetected,
    StepLimitExceeded,
    UnknownModelPrice,
    dimension_label,
    format_amount,
)
from ..ledger import Denial, Ledger, Reservation, ScopeCaps, ScopeTotals, from_url, redact_url
from ..ledger.base import Settlement
from ..ledger.failover import FailOpenLedger
from ..pricing import ModelPrice, PriceBook, ToolPrice, ToolUse
from ..tokens import RequestFeatures, TokenCounter, request_features
from .budgets import CALL_KINDS, STANDARD_ATTRIBUTES, Budgets, ScopeRef
from .limits import Dimension, Limits, repeat_dimension, tool_dimension
from .records import CallRecord, Outcome, SessionUsage
from .usage import Usage, usd_to_nano

__all__ = ["Admission", "Guard", "ModelCall", "ThresholdEvent", "ToolAdmission"]

logger = logging.getLogger("agent_guard")

RecordHook = Callable[[CallRecord], None]
_NO_ARGS: Any = object()


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

# Dimensions whose refusal is about money/tokens (BudgetExceeded) rather than counts.
_BUDGET_DIMENSIONS = frozenset({Dimension.USD_NANO, Dimension.TOKENS})
# How often a shrink-to-fit reservation is retried when a concurrent call takes the room.
_SHRINK_ATTEMPTS = 3
# A prompt with long texts not counted yet is reserved with an upper bound of its tokens
# (their UTF-8 length; see TokenCounter.estimate_messages) only while that reservation is
# at most this share of what is left under each token and dollar cap (cap minus the spend
# this process last saw settled). Nearer a cap the prompt is counted exactly, and a
# reservation with the bound that is denied is retried with the exact count.
_BOUND_SHARE_OF_ROOM = 0.1


@dataclass(frozen=True, slots=True)
class ModelCall:
    """One model call as an adapter describes it, before it is made.

    ``messages`` are LangChain messages or OpenAI-style dicts; give
    ``input_tokens`` instead when the adapter has already counted them.
    ``max_output_tokens`` is the call's own cap (``max_tokens`` /
    ``max_completion_tokens``); ``None`` means the policy default is reserved.
    ``can_shrink`` says the adapter can lower the call's output cap, so a
    call that does not fit may be admitted with a smaller one.

    ``attempts`` is how many requests the provider's client may send for this one
    call (1 + its own retries, e.g. the OpenAI SDK's ``max_retries``): a request
    that timed out may have been billed, so each attempt is reserved.

    ``run_id`` names the request: every ``before_model_call`` of guards on the same
    ledger with the same ``run_id`` while it is open joins one admission, so one
    request is reserved and charged once however many handlers see it.
    """

    session: str
    model: str
    provider: str | None = None
    messages: Sequence[Any] = ()
    tools: Sequence[Mapping[str, Any]] | None = None
    max_output_tokens: int | None = None
    input_tokens: int | None = None
    run_id: str | None = None
    node: str | None = None
    tags: tuple[str, ...] = ()
    can_shrink: bool = False
    tier: str | None = None
    route: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)
    #: the call's request parameters (LangChain ``invocation_params``): what the prompt
    #: estimate and the worst case read besides the messages (``response_format``,
    #: ``service_tier``, ``modalities``, ``cache_control``, ``tool_choice``)
    params: Mapping[str, Any] = field(default_factory=dict)
    attempts: int = 1


class _CallState:
    """What every holder of one admission shares: it ends exactly once."""

    __slots__ = ("key", "lock", "record")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.record: CallRecord | None = None
        self.key: tuple[str, str] | None = None


class _Pending:
    """A request being admitted or open, that other guards on its ledger may join."""

    __slots__ = ("admission", "error", "ready")

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.admission: Admission | None = None
        self.error: BaseException | None = None


# (ledger identity, run id) -> the request's admission while it is open. A LangChain
# model run executes in one process, so one process-wide registry sees every handler
# and guard that sees the run; the ledger identity keeps guards of different budgets
# apart. Entries leave when the call ends (settled, released or abandoned).
_OPEN_REQUESTS: dict[tuple[str, str], _Pending] = {}
_OPEN_LOCK = threading.Lock()
# threshold checks of deferred settles that landed on an event loop's thread (Guard._landed)
_THRESHOLD_TASKS: set[asyncio.Task[None]] = set()
# How long a second holder of a request waits for the first one's reservation.
_JOIN_WAIT_SECONDS = 30.0


def _forget_open_requests_after_fork() -> None:
    global _OPEN_LOCK
    _OPEN_REQUESTS.clear()  # the parent's requests are the parent's to end
    _OPEN_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_open_requests_after_fork)


def certainly_not_billed(error: BaseException) -> bool:
    """Whether a failed call certainly cost nothing at the provider.

    True for an HTTP status error (4xx, 429, 5xx: the provider answered with an error
    before generating) and for a connection that could not be made (the request was
    never sent). A timeout, a reset, a cancellation or anything else after the
    request may have been sent is not: the provider may have generated (and billed)
    the whole answer."""
    status = getattr(error, "status_code", None)
    if status is None:
        status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599:
        return True
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if type(current).__name__ in _NOT_SENT:
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


# exception class names (httpx, the standard library) of a request that was never sent
_NOT_SENT = frozenset({"ConnectError", "ConnectTimeout", "ConnectionRefusedError",
                       "UnsupportedProtocol", "InvalidURL", "LocalProtocolError"})


@dataclass(frozen=True, slots=True)
class Admission:
    """The guard's yes: a reservation covering the call's worst case.

    ``max_output_tokens`` is the output the reservation covers; when
    ``shrunk`` is True it is lower than the call asked for and the adapter
    must lower the call's ``max_tokens`` to it before making the call.
    """

    call: ModelCall
    reservation: Reservation
    price: ModelPrice | None
    estimated_input_tokens: int
    max_output_tokens: int
    reserved_nano: int
    shrunk: bool = False
    started_at: float = field(default_factory=time.time)
    scopes: tuple[ScopeRef, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)
    #: ``estimated_input_tokens`` is an upper bound (long new texts were not tokenised):
    #: the guard counts the prompt exactly before settling a call without usage.
    input_is_bound: bool = False
    #: shared by every holder of this admission; set once the call is finished
    state: _CallState = field(default_factory=_CallState, compare=False, repr=False)

    @property
    def finished(self) -> bool:
        """Whether the call was settled or released (by any holder)."""
        return self.state.record is not None

    @property
    def attempt_nano(self) -> int:
        """The worst case of one attempt (``reserved_nano`` covers every attempt)."""
        return self.reserved_nano // max(1, self.call.attempts)


@dataclass(frozen=True, slots=True)
class ToolAdmission:
    """The guard's yes to one tool call. ``reservation`` holds a priced tool's worst
    case (``reserved_nano``) with its counts until the call ends; it is None for a free
    tool, whose counts were charged when it was admitted."""

    session: str
    tool: str | None
    args: Any
    price: ToolPrice | None
    reservation: Reservation | None
    reserved_nano: int
    started_at: float
    scopes: tuple[ScopeRef, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)
    state: _CallState = field(default_factory=_CallState, compare=False, repr=False)

    @property
    def finished(self) -> bool:
        return self.state.record is not None


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


# what a tool admission ends with when the tool certainly did not run (no record)
_NOT_RUN = CallRecord(session="", run_id=None, model="", provider=None, usage=Usage(),
                      cost_nano=0, reserved_nano=0, usage_estimated=False, outcome="error",
                      started_at=0.0, ended_at=0.0, kind="tool")


class Guard:
    """Budget caps for sessions, enforced before each call spends anything.

    ``limits`` caps each session (:class:`Limits`), or sessions and other scopes
    together (:class:`~agent_guard.budgets.Budgets`: users, teams, features,
    globally, per window). ``attributes`` (``{"team": "acme", "feature":
    "search"}``) say which scopes this guard's calls belong to; a call's own
    attributes (from its run metadata) override them.

    ``ledger`` is a URL (``memory://``, ``sqlite:///guard.db``,
    ``redis://127.0.0.1:6379/0``) or a :class:`~agent_guard.ledger.Ledger`.
    Guards that share a ledger share budgets, across threads, processes and
    hosts. ``on_record`` hooks receive a :class:`CallRecord` per model and tool
    call; ``on_threshold`` hooks a :class:`ThresholdEvent` once per scope,
    threshold and window (``Limits.thresholds``, also logged at WARNING).
    ``clock`` (epoch seconds) decides windows and record times; tests inject one.

    ``fail`` is what happens when the ledger backend cannot be reached:
    ``"closed"`` (default) refuses the call with
    :class:`~agent_guard.errors.LedgerUnavailable`; ``"open"`` admits it against
    this process's local view of the caps, journals the spend and reconciles it
    into the backend when it answers again
    (:class:`~agent_guard.ledger.failover.FailOpenLedger`).
    """

    def __init__(
        self,
        limits: Limits | Budgets | None = None,
        ledger: str | Ledger = "memory://",
        *,
        prices: PriceBook | None = None,
        token_counter: TokenCounter | None = None,
        on_record: Sequence[RecordHook] = (),
        on_threshold: Sequence[ThresholdHook] = (),
        attributes: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        fail: Literal["closed", "open"] = "closed",
        tool_prices: Mapping[str, ToolPrice] | None = None,
    ) -> None:
        if fail not in ("closed", "open"):
            raise ValueError(f"fail must be 'closed' or 'open', got {fail!r}")
        self.budgets = Budgets.of(limits)
        self.limits = self.budgets.session
        self.attributes: dict[str, str] = _check_attributes(attributes or {})
        self.attribute_names = self.budgets.attribute_names() | STANDARD_ATTRIBUTES
        self.clock = clock
        self.ledger = from_url(ledger)
        if fail == "open" and not isinstance(self.ledger, FailOpenLedger):
            self.ledger = FailOpenLedger(self.ledger)
        _check_ledger_retention(self.budgets, self.ledger)
        self.prices = prices if prices is not None else PriceBook.default()
        self.tool_prices: dict[str, ToolPrice] = _check_tool_prices(tool_prices or {})
        self._call_kinds = self.budgets.call_kinds()
        self.tokens = token_counter if token_counter is not None else TokenCounter()
        self._hooks: list[RecordHook] = list(on_record)
        self._caps = self.limits.caps()
        self._threshold_hooks: list[ThresholdHook] = list(on_threshold)
        self._warned_unpriced: set[str] = set()
        # a model without a price: reserved at the stated price, else refused under a
        # dollar cap of any scope (Limits.unknown_price)
        self._unknown_price = self.limits.unknown_model_price()
        self._dollar_capped = any(
            lim.max_cost_usd is not None
            for lim in (self.budgets.session, *(lim for _, lim in self.budgets.all_limits())))
        self._warned_no_usage: set[str] = set()
        self._warn_lock = threading.Lock()
        self._fired: set[tuple[str, str, float]] = set()
        # finished calls whose settle found the ledger unavailable (settle_pending)
        self._unsettled: deque[tuple[Reservation, dict[str, int]]] = deque()
        self._ledger_id = _ledger_identity(self.ledger)
        # a rolling window's current bucket -> what its earlier buckets had spent when
        # first read (past buckets change only by late settles), for its thresholds
        self._past_spent: dict[str, dict[str, int]] = {}
        # whether any budget has soft thresholds (else a settle checks none)
        self._thresholds = bool(self.limits.thresholds) or any(
            lim.thresholds for _, lim in self.budgets.all_limits())

    # -- configuration -------------------------------------------------------------

    def add_record_hook(self, hook: RecordHook) -> None:
        self._hooks.append(hook)

    def add_threshold_hook(self, hook: ThresholdHook) -> None:
        self._threshold_hooks.append(hook)

    def scopes(self, session: str, extra_caps: Mapping[str, int] | None = None,
               attributes: Mapping[str, str] | None = None) -> list[ScopeCaps]:
        """The scopes a call of ``session`` is charged to now, with their caps."""
        return [r.caps for r in self.scope_refs(session, attributes, extra_caps)]

    def scope_refs(self, session: str, attributes: Mapping[str, str] | None = None,
                   extra_caps: Mapping[str, int] | None = None, *,
                   model: str | None = None, provider: str | None = None,
                   tool: str | None = None) -> list[ScopeRef]:
        """The scopes a call is charged to: the session's, those its attributes select,
        and the budgets of its ``model``, ``provider`` or ``tool`` (built once per window
        period: Budgets.resolve)."""
        if self._call_kinds:
            # the call kinds' values are the call's own: never read from metadata
            own = {k: v for k, v in (("model", model), ("provider", provider),
                                     ("tool", tool)) if v and k in self._call_kinds}
            merged = {k: v for k, v in self.attributes_for(attributes).items()
                      if k not in CALL_KINDS}
            return self.budgets.resolve(session, {**merged, **own}, self.clock(),
                                        self._caps, extra_caps)
        return self.budgets.resolve(session, self.attributes_for(attributes), self.clock(),
                                    self._caps, extra_caps)

    def attributes_for(self, attributes: Mapping[str, str] | None) -> Mapping[str, str]:
        """The guard's attributes overridden by a call's own."""
        if not attributes:
            return self.attributes
        return {**self.attributes, **attributes}

    # -- model calls -----------------------------------------------------------------

    def estimate_model_call(self, call: ModelCall) -> int:
        """The worst case (nano-USD) of ``call`` with its prompt counted exactly;
        reserves nothing."""
        return self._plan(call, exact=True).worst_nano

    def before_model_call(self, call: ModelCall) -> Admission:
        """Reserve the call's worst case, or raise before anything is spent.

        A call whose ``run_id`` is already open on this ledger (another handler or
        guard saw the same request first) gets that request's admission: one request
        is reserved and charged once."""
        key, pending = self._claim(call)
        if pending is not None:
            if not pending.ready.is_set():
                pending.ready.wait(_JOIN_WAIT_SECONDS)
            return self._joined(call, pending)
        try:
            if self._unsettled:
                self.settle_pending()
            plan = self._plan(call)
            shrinks = 0
            while True:
                result = self.ledger.reserve(
                    plan.scopes, plan.amounts, lease_seconds=self.limits.lease_seconds
                )
                if isinstance(result, Reservation):
                    return self._opened(key, plan.admit(result))
                plan, shrinks = self._after_denial(plan, result, shrinks)
        except BaseException as exc:
            self._not_opened(key, exc)
            raise

    async def abefore_model_call(self, call: ModelCall) -> Admission:
        key, pending = self._claim(call)
        if pending is not None:
            if not pending.ready.is_set():
                await asyncio.to_thread(pending.ready.wait, _JOIN_WAIT_SECONDS)
            return self._joined(call, pending)
        try:
            if self._unsettled:
                await self.asettle_pending()
            plan = self._plan(call)
            shrinks = 0
            while True:
                result = await self.ledger.areserve(
                    plan.scopes, plan.amounts, lease_seconds=self.limits.lease_seconds
                )
                if isinstance(result, Reservation):
                    return self._opened(key, plan.admit(result))
                plan, shrinks = self._after_denial(plan, result, shrinks)
        except BaseException as exc:
            self._not_opened(key, exc)
            raise

    # -- one request, one admission ---------------------------------------------------

    def _claim(self, call: ModelCall) -> tuple[tuple[str, str] | None, _Pending | None]:
        """(the request's key, the pending admission to join or None to open one)."""
        if not call.run_id:
            return None, None
        key = (self._ledger_id, call.run_id)
        with _OPEN_LOCK:
            pending = _OPEN_REQUESTS.get(key)
            if pending is None:
                _OPEN_REQUESTS[key] = _Pending()
                return key, None
            return key, pending

    def _joined(self, call: ModelCall, pending: _Pending) -> Admission:
        if pending.error is not None:
            raise pending.error
        if pending.admission is None:  # the first holder is stuck: admit on its own
            return self.before_model_call(replace(call, run_id=None))
        return pending.admission

    @staticmethod
    def _opened(key: tuple[str, str] | None, admission: Admission) -> Admission:
        if key is not None:
            admission.state.key = key
            with _OPEN_LOCK:
                pending = _OPEN_REQUESTS.get(key)
            if pending is not None:
                pending.admission = admission
                pending.ready.set()
        return admission

    @staticmethod
    def _not_opened(key: tuple[str, str] | None, exc: BaseException) -> None:
        if key is None:
            return
        with _OPEN_LOCK:
            pending = _OPEN_REQUESTS.pop(key, None)
        if pending is not None:
            pending.error = exc
            pending.ready.set()


    def after_model_call(
        self,
        admission: Admission,
        usage: Usage | None,
        *,
        output_tokens: int | None = None,
        response_model: str | None = None,
        cache_hit: bool = False,
        retried: int = 0,
    ) -> CallRecord:
        """Settle the reservation with what the call actually used.

        ``usage`` is what the provider reported; when it is ``None`` the
        guard settles from its own count (``output_tokens``, counted by the
        adapter from the answer) and marks the record as estimated. A cache
        hit releases the reservation and records what it saved. ``retried``
        earlier attempts that may have been billed (the provider client retried
        after timeouts) are each charged one attempt's worst case, estimated.
        """
        record, amounts = self._settlement(
            admission, usage, output_tokens, response_model,
            "cache_hit" if cache_hit else "ok",
        )
        record, amounts = self._with_retries(admission, record, amounts, retried)
        return self._close(admission, record, amounts)

    async def aafter_model_call(
        self,
        admission: Admission,
        usage: Usage | None,
        *,
        output_tokens: int | None = None,
        response_model: str | None = None,
        cache_hit: bool = False,
        retried: int = 0,
    ) -> CallRecord:
        record, amounts = self._settlement(
            admission, usage, output_tokens, response_model,
            "cache_hit" if cache_hit else "ok",
        )
        record, amounts = self._with_retries(admission, record, amounts, retried)
        return await self._aclose(admission, record, amounts)

    def model_call_failed(self, admission: Admission, *, output_tokens: int = 0,
                          error: BaseException | None = None) -> CallRecord:
        """The call raised ``error``. Only a call the provider certainly did not bill
        (:func:`certainly_not_billed`: an HTTP status error, a connection never made)
        is released; one that may have been billed (a timeout, a reset, a
        cancellation, a stream closed early) is charged its reserved worst case,
        marked estimated (:meth:`model_call_abandoned`). A guard's own stop (a
        ``GuardError``), or no ``error`` given, settles what was streamed (nothing
        streamed: released)."""
        record, amounts = self._failure(admission, output_tokens, error)
        return self._close(admission, record, amounts)

    async def amodel_call_failed(
        self, admission: Admission, *, output_tokens: int = 0,
        error: BaseException | None = None,
    ) -> CallRecord:
        record, amounts = self._failure(admission, output_tokens, error)
        return await self._aclose(admission, record, amounts)

    def model_call_abandoned(self, admission: Admission) -> CallRecord:
        """The call ended without a result or an error the adapter could read (it was
        cancelled, its run was dropped, another callback failed): it may have been
        billed in full, so it is charged what was reserved for it (every attempt's
        worst case), marked estimated and ``aborted``. A no-op once the call ended."""
        record, amounts = self._abandoned(admission)
        return self._close(admission, record, amounts)

    async def amodel_call_abandoned(self, admission: Admission) -> CallRecord:
        record, amounts = self._abandoned(admission)
        return await self._aclose(admission, record, amounts)

    def _failure(self, admission: Admission, output_tokens: int,
                 error: BaseException | None) -> tuple[CallRecord, dict[str, int] | None]:
        if (error is not None and not isinstance(error, GuardError)
                and not certainly_not_billed(error)):
            return self._abandoned(admission)
        outcome: Outcome = "aborted" if output_tokens > 0 else "error"
        return self._settlement(admission, None, output_tokens, None, outcome)

    def _abandoned(self, admission: Admission) -> tuple[CallRecord, dict[str, int]]:
        """Charge what was reserved: the prompt with its margin and the full output, for
        every attempt the provider client may have sent."""
        attempts = max(1, admission.call.attempts)
        held = admission.reservation.amounts
        output = admission.max_output_tokens * attempts
        prompt = max(0, int(held.get(Dimension.TOKENS, 0)) - output)
        usage = Usage(input_tokens=prompt, output_tokens=output)
        record = self._record(admission, usage, admission.reserved_nano, estimated=True,
                              outcome="aborted")
        amounts = _amounts(usage, admission.reserved_nano)
        return record, amounts

    def _with_retries(self, admission: Admission, record: CallRecord,
                      amounts: dict[str, int] | None, retried: int
                      ) -> tuple[CallRecord, dict[str, int] | None]:
        retried = min(max(0, int(retried)), max(1, admission.call.attempts) - 1)
        if not retried or amounts is None:
            return record, amounts
        attempts = max(1, admission.call.attempts)
        per_tokens = int(admission.reservation.amounts.get(Dimension.TOKENS, 0)) // attempts
        extra_out = admission.max_output_tokens * retried
        extra = Usage(input_tokens=max(0, per_tokens - admission.max_output_tokens) * retried,
                      output_tokens=extra_out)
        usage = record.usage + extra
        cost = record.cost_nano + admission.attempt_nano * retried
        record = replace(record, usage=usage, cost_nano=cost, usage_estimated=True)
        calls = amounts.get(Dimension.MODEL_CALLS, 1)
        return record, {**_amounts(usage, cost), Dimension.MODEL_CALLS: calls}

    def _close(self, admission: Admission | ToolAdmission, record: CallRecord,
               amounts: dict[str, int] | None) -> CallRecord:
        """Settle (or release, when ``amounts`` is None), report, check thresholds; once
        per admission, whoever of its holders comes first."""
        first = self._finish(admission, record)
        if first is not record:
            return first
        settled = None
        try:
            if amounts is None:
                self.ledger.release(cast(Reservation, admission.reservation))
            elif self.ledger.defers_settles and self._may_defer(admission, amounts):
                self._settle_later(admission, amounts)
            else:
                try:
                    settled = self.ledger.settle(cast(Reservation, admission.reservation), amounts)
                except LedgerUnavailable as exc:
                    self._keep_unsettled(cast(Reservation, admission.reservation), amounts, exc)
                else:
                    self._note_spent(settled)
        finally:
            _forget(admission)
        self._emit(record)
        if settled is not None and self._thresholds:  # no work when none is set
            self._check_thresholds(record.session, admission.scopes, settled)
        return record

    async def _aclose(self, admission: Admission | ToolAdmission, record: CallRecord,
                      amounts: dict[str, int] | None) -> CallRecord:
        first = self._finish(admission, record)
        if first is not record:
            return first
        settled = None
        try:
            if amounts is None:
                await self.ledger.arelease(cast(Reservation, admission.reservation))
            elif self.ledger.defers_settles and self._may_defer(admission, amounts):
                self._settle_later(admission, amounts)
            else:
                try:
                    settled = await self.ledger.asettle(
                        cast(Reservation, admission.reservation), amounts)
                except LedgerUnavailable as exc:
                    self._keep_unsettled(cast(Reservation, admission.reservation), amounts, exc)
                else:
                    self._note_spent(settled)
        finally:
            _forget(admission)
        self._emit(record)
        if settled is not None and self._thresholds:
            await self._acheck_thresholds(record.session, admission.scopes, settled)
        return record

    def _settle_later(self, admission: Admission | ToolAdmission,
                      amounts: dict[str, int]) -> None:
        """Hand the settle to a ledger that sends it with its next script (Redis): the
        hold keeps counting until it lands; the spend hint and the thresholds follow
        when it does (:meth:`_landed`). Only the capped dimensions are read back."""
        reads = {ref.scope: [dim for dim in ref.caps.caps if dim in amounts]
                 for ref in admission.scopes}
        self.ledger.settle_later(cast(Reservation, admission.reservation), amounts, reads=reads,
                                 then=lambda settled: self._landed(admission, settled))

    def _may_defer(self, admission: Admission | ToolAdmission,
                   amounts: Mapping[str, int]) -> bool:
        """Whether this settle may wait for the next script: no soft threshold this guard
        has not fired yet is within its reach, by the spend last seen settled on each
        scope. Near one (or before any sight of a scope with thresholds) it settles at
        once, so the event fires at the call's end as without deferral."""
        hint = self._spent_hint
        for ref in admission.scopes:
            thresholds = ref.limits.thresholds
            if not thresholds:
                continue
            seen = hint.get(ref.scope) if hint else None
            if seen is None or (ref.caps.history and ref.scope not in self._past_spent):
                return False
            past = self._past_spent.get(ref.scope) if ref.caps.history else None
            for dim, cap in ref.caps.caps.items():
                amount = amounts.get(dim)
                if not amount or cap <= 0:
                    continue
                unfired = [t for t in thresholds if (ref.scope, dim, t) not in self._fired]
                used = seen.get(dim, 0) + (past.get(dim, 0) if past else 0) + amount
                if unfired and used >= cap * min(unfired):
                    return False
        return True

    def _landed(self, admission: Admission | ToolAdmission, settled: Settlement) -> None:
        """A deferred settle landed (in the thread that carried it): note the spend and
        check the thresholds; on an event loop's thread, in a task of that loop."""
        self._note_spent(settled)
        if not settled or not any(ref.limits.thresholds for ref in admission.scopes):
            return
        session = (admission.call.session if isinstance(admission, Admission)
                   else admission.session)  # a priced tool's deferred settle
        refs = admission.scopes
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._check_thresholds(session, refs, settled)
            return
        task = loop.create_task(self._acheck_thresholds(session, refs, settled))
        _THRESHOLD_TASKS.add(task)
        task.add_done_callback(_THRESHOLD_TASKS.discard)

    @staticmethod
    def _finish(admission: Admission | ToolAdmission, record: CallRecord) -> CallRecord:
        """Claim the end of ``admission`` for ``record``; the record it already ended
        with if another holder came first."""
        state = admission.state
        with state.lock:
            if state.record is None:
                state.record = record
            return state.record

    # -- tools and steps -----------------------------------------------------------------

    def tool_price(self, tool: str | None, declared: ToolPrice | None = None
                   ) -> ToolPrice | None:
        """The price of ``tool``'s calls: ``Guard(tool_prices=...)``, else the one the
        tool declares (``declared``: ``priced_tool``, its metadata), else the price book's
        ``tools`` table (the overrides file). None: the tool is free."""
        if not tool:
            return None
        return self.tool_prices.get(tool) or declared or self.prices.tools.get(tool)

    def before_tool_call(self, session: str, tool: str | None = None,
                         args: Any = _NO_ARGS, *,
                         attributes: Mapping[str, str] | None = None,
                         price: ToolPrice | None = None) -> ToolAdmission:
        """Count one tool call and reserve its worst-case price, or raise before the
        tool runs: StepLimitExceeded (LoopDetected for the ``max_repeats``-th identical
        call), BudgetExceeded when its price does not fit a dollar cap.

        A priced tool (:meth:`tool_price`) is reserved with the model calls' caps in one
        atomic step; end it with :meth:`tool_call_done` (settled at its actual price) or
        :meth:`tool_call_not_run` (released). The identical-call counter lives in the
        session scope only (team and global scopes would otherwise gain a counter per
        distinct call, forever): it is charged first, and given back if the tool caps
        then refuse the call."""
        plan = self._tool_plan(session, tool, args, attributes, price)
        if plan.repeat is not None:
            denial = self.ledger.charge([plan.repeat], dict.fromkeys(plan.repeat.caps, 1))
            if denial is not None:
                raise self._refusal(session, denial, plan.refs)
        reservation = None
        if plan.worst:
            result = self.ledger.reserve([r.caps for r in plan.refs], plan.amounts,
                                         lease_seconds=self.limits.lease_seconds)
            denial, reservation = (result, None) if isinstance(result, Denial) else \
                (None, result)
        else:
            denial = self._charge(session, plan.refs, plan.amounts)
        if denial is not None:
            if plan.repeat is not None:
                for dim in plan.repeat.caps:
                    self.ledger.extend(plan.repeat.scope, dim, 1)
            raise self._refusal(session, denial, plan.refs)
        return plan.admit(reservation)

    async def abefore_tool_call(self, session: str, tool: str | None = None,
                                args: Any = _NO_ARGS, *,
                                attributes: Mapping[str, str] | None = None,
                                price: ToolPrice | None = None) -> ToolAdmission:
        plan = self._tool_plan(session, tool, args, attributes, price)
        if plan.repeat is not None:
            denial = await self.ledger.acharge([plan.repeat],
                                               dict.fromkeys(plan.repeat.caps, 1))
            if denial is not None:
                raise self._refusal(session, denial, plan.refs)
        reservation = None
        if plan.worst:
            result = await self.ledger.areserve([r.caps for r in plan.refs], plan.amounts,
                                                lease_seconds=self.limits.lease_seconds)
            denial, reservation = (result, None) if isinstance(result, Denial) else \
                (None, result)
        else:
            denial = await self._acharge(session, plan.refs, plan.amounts)
        if denial is not None:
            if plan.repeat is not None:
                for dim in plan.repeat.caps:
                    await self.ledger.aextend(plan.repeat.scope, dim, 1)
            raise self._refusal(session, denial, plan.refs)
        return plan.admit(reservation)

    def tool_call_done(
        self,
        session: str,
        tool: str,
        *,
        outcome: Outcome = "ok",
        saved_nano: int = 0,
        started_at: float | None = None,
        run_id: str | None = None,
        node: str | None = None,
        tags: Sequence[str] = (),
        attributes: Mapping[str, str] | None = None,
        admission: ToolAdmission | None = None,
        result: Any = None,
    ) -> CallRecord:
        """Report a finished tool call (``outcome="cache_hit"`` with what the cached
        result saved): a priced call's ``admission`` is settled at what it cost
        (:meth:`ToolPrice.cost_nano` of its arguments, ``result`` and wall time; a call
        that failed, at its reserved worst case, marked estimated; a cache hit, at $0),
        and the guard emits its :class:`CallRecord` to ``on_record``."""
        record, amounts = self._tool_settlement(session, tool, outcome, saved_nano,
                                                started_at, run_id, node, tags, attributes,
                                                admission, result)
        if admission is None or admission.reservation is None:
            self._finish_unreserved(admission, record)
            return record
        return self._close(admission, record, amounts)

    async def atool_call_done(
        self,
        session: str,
        tool: str,
        *,
        outcome: Outcome = "ok",
        saved_nano: int = 0,
        started_at: float | None = None,
        run_id: str | None = None,
        node: str | None = None,
        tags: Sequence[str] = (),
        attributes: Mapping[str, str] | None = None,
        admission: ToolAdmission | None = None,
        result: Any = None,
    ) -> CallRecord:
        record, amounts = self._tool_settlement(session, tool, outcome, saved_nano,
                                                started_at, run_id, node, tags, attributes,
                                                admission, result)
        if admission is None or admission.reservation is None:
            self._finish_unreserved(admission, record)
            return record
        return await self._aclose(admission, record, amounts)

    def tool_call_not_run(self, admission: ToolAdmission) -> None:
        """The admitted tool certainly did not run (another handler refused it, its
        arguments were invalid): its reservation is released. No record is emitted."""
        if admission.reservation is not None and self._finish(
                admission, _NOT_RUN) is _NOT_RUN:
            self.ledger.release(admission.reservation)

    async def atool_call_not_run(self, admission: ToolAdmission) -> None:
        if admission.reservation is not None and self._finish(
                admission, _NOT_RUN) is _NOT_RUN:
            await self.ledger.arelease(admission.reservation)

    def _finish_unreserved(self, admission: ToolAdmission | None, record: CallRecord) -> None:
        """An unpriced tool call (its counts were charged up front): report it once."""
        if admission is None or self._finish(admission, record) is record:
            self._emit(record)

    def _tool_plan(self, session: str, tool: str | None, args: Any,
                   attributes: Mapping[str, str] | None, declared: ToolPrice | None
                   ) -> _ToolPlan:
        refs = self.scope_refs(session, attributes, tool=tool or None)
        amounts, repeat = self._tool_amounts(tool, args, refs[0].scope)
        price = self.tool_price(tool, declared)
        worst = 0
        if price is not None:
            try:
                worst = price.worst_nano(None if args is _NO_ARGS else args)
            except ValueError as exc:
                raise ValueError(f"agent-guard: the worst case of a {tool!r} call cannot "
                                 f"be priced, so it is not run: {exc}") from exc
        if worst:
            amounts[Dimension.USD_NANO] = worst
        return _ToolPlan(self, session, tool, args, attributes, refs, amounts, repeat,
                         price, worst)

    def _tool_settlement(
        self, session: str, tool: str, outcome: Outcome, saved_nano: int,
        started_at: float | None, run_id: str | None, node: str | None,
        tags: Sequence[str], attributes: Mapping[str, str] | None,
        admission: ToolAdmission | None, result: Any,
    ) -> tuple[CallRecord, dict[str, int]]:
        """The record of a finished tool call and the amounts its reservation settles."""
        now = self.clock()
        if admission is not None:
            started_at = admission.started_at if started_at is None else started_at
            scopes = admission.scopes
            attrs = admission.attributes
        else:
            scopes = tuple(self.scope_refs(session, attributes, tool=tool or None))
            attrs = self.attributes_for(attributes)
        started = now if started_at is None else started_at
        price = admission.price if admission is not None else None
        reserved = admission.reserved_nano if admission is not None else 0
        cost, estimated = 0, False
        if admission is not None and admission.reservation is not None and price is not None:
            if outcome == "ok":
                use = ToolUse(None if admission.args is _NO_ARGS else admission.args,
                              result, max(0.0, now - admission.started_at))
                try:
                    cost = price.cost_nano(use)
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
        record = CallRecord(
            session=session, run_id=run_id, model="",
            provider=price.service if price is not None else None, usage=Usage(),
            cost_nano=cost, reserved_nano=reserved, usage_estimated=estimated,
            outcome=outcome, started_at=started, ended_at=now,
            saved_nano=max(0, int(saved_nano)), node=node, tags=tuple(tags), kind="tool",
            tool=tool, attributes=attrs, scopes=tuple(r.scope for r in scopes),
            **cast(dict[str, Any], {"record_id": admission.reservation.id}
                   if admission is not None and admission.reservation is not None else {}),
        )
        amounts = dict(admission.reservation.amounts) if admission is not None and \
            admission.reservation is not None else {}
        amounts[Dimension.USD_NANO] = cost
        return record, amounts

    def before_step(self, session: str, n: int = 1, *,
                    attributes: Mapping[str, str] | None = None) -> None:
        """Count ``n`` graph steps, or raise StepLimitExceeded."""
        refs = self.scope_refs(session, attributes)
        denial = self._charge(session, refs, {Dimension.STEPS: n})
        if denial is not None:
            raise self._refusal(session, denial, refs)

    async def abefore_step(self, session: str, n: int = 1, *,
                           attributes: Mapping[str, str] | None = None) -> None:
        refs = self.scope_refs(session, attributes)
        denial = await self._acharge(session, refs, {Dimension.STEPS: n})
        if denial is not None:
            raise self._refusal(session, denial, refs)

    # -- reading -------------------------------------------------------------------------

    def usage(self, session: str) -> SessionUsage:
        """The session's spend, reservations and counts, as the ledger has them."""
        ref = self.budgets.ref("session", session, self.clock())
        return SessionUsage.from_totals(session, self.ledger.totals(ref.scope),
                                        self.limits.max_cost_nano)

    async def ausage(self, session: str) -> SessionUsage:
        ref = self.budgets.ref("session", session, self.clock())
        return SessionUsage.from_totals(session, await self.ledger.atotals(ref.scope),
                                        self.limits.max_cost_nano)

    def scope_usage(self, kind: str, value: str | None = None, *,
                    at: float | None = None) -> SessionUsage:
        """The spend of one budget scope (``scope_usage("team", "acme")``) in the window
        holding ``at`` (now by default); ``session`` of the result is the ledger scope."""
        ref = self.budgets.ref(kind, value, self.clock() if at is None else at)
        totals = self.ledger.totals(ref.scope)
        if ref.caps.history:  # a rolling window: its buckets together
            totals = _summed(ref.scope, [totals, *self.ledger.totals_many(ref.caps.history)])
        return SessionUsage.from_totals(ref.scope, totals, ref.limits.max_cost_nano)

    def extend(
        self,
        session: str,
        *,
        usd: Any = None,
        tokens: int | None = None,
        steps: int | None = None,
        model_calls: int | None = None,
        tool_calls: int | None = None,
    ) -> None:
        """Raise this session's caps at run time (e.g. after a human approved more)."""
        scope = self.budgets.ref("session", session, self.clock()).scope
        if usd is not None:
            self.ledger.extend(scope, Dimension.USD_NANO, usd_to_nano(usd))
        for dim, value in ((Dimension.TOKENS, tokens), (Dimension.STEPS, steps),
                           (Dimension.MODEL_CALLS, model_calls),
                           (Dimension.TOOL_CALLS, tool_calls)):
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise TypeError(f"extend {dim} must be an int, got {value!r}")
                self.ledger.extend(scope, dim, value)

    def close(self) -> None:
        """Settle what is pending (deferred settles land here too) and close the ledger."""
        if self._unsettled and not self.settle_pending():
            self._log_never_counted()
        self.ledger.close()

    async def aclose(self) -> None:
        if self._unsettled and not await self.asettle_pending():
            self._log_never_counted()
        await self.ledger.aclose()

    def _log_never_counted(self) -> None:
        logger.error("agent-guard: closing with %d settled calls the ledger never "
                     "counted (%s is unavailable)", len(self._unsettled),
                     redact_url(getattr(self.ledger, "url", "") or ""))

    @property
    def pending_settles(self) -> int:
        """Finished calls whose spend the ledger has not taken yet: it was unavailable,
        or (Redis) the settle waits to ride with the next script."""
        return len(self._unsettled) + self.ledger.pending_settles

    def settle_pending(self) -> bool:
        """Settle the calls whose settle found the ledger unavailable (done before every
        model call; a settle is idempotent and counts after its lease too), and land the
        settles a ledger deferred (Redis). True when none is left."""
        while self._unsettled:
            reservation, amounts = self._unsettled[0]
            try:
                self._note_spent(self.ledger.settle(reservation, amounts))
            except LedgerUnavailable:
                return False
            self._pop_unsettled(reservation)
        try:
            self.ledger.flush()
        except LedgerUnavailable:
            return False
        return True

    async def asettle_pending(self) -> bool:
        while self._unsettled:
            reservation, amounts = self._unsettled[0]
            try:
                self._note_spent(await self.ledger.asettle(reservation, amounts))
            except LedgerUnavailable:
                return False
            self._pop_unsettled(reservation)
        try:
            await self.ledger.aflush()
        except LedgerUnavailable:
            return False
        return True

    def _pop_unsettled(self, reservation: Reservation) -> None:
        with self._warn_lock:
            if self._unsettled and self._unsettled[0][0] is reservation:
                self._unsettled.popleft()

    def _keep_unsettled(self, reservation: Reservation, amounts: dict[str, int],
                        exc: LedgerUnavailable) -> None:
        """The call ran and the provider billed it, but the settle found the ledger
        unavailable: keep it to settle later rather than lose it (its hold would expire
        and the spend would never be counted)."""
        with self._warn_lock:
            self._unsettled.append((reservation, amounts))
        logger.error("agent-guard: a finished call's spend could not be settled (%s); "
                     "it is kept and settled before the next call (%d pending)",
                     exc, len(self._unsettled))

    # -- internals -------------------------------------------------------------------------

    def _tool_amounts(self, tool: str | None, args: Any, session_scope: str
                      ) -> tuple[dict[str, int], ScopeCaps | None]:
        """The tool call's amounts, and its identical-call counter (session only)."""
        amounts = {Dimension.TOOL_CALLS: 1}
        repeat: ScopeCaps | None = None
        if tool:
            amounts[tool_dimension(tool)] = 1
            if self.limits.max_repeats is not None and args is not _NO_ARGS:
                repeat = ScopeCaps(session_scope,
                                   {repeat_dimension(tool, args): self.limits.max_repeats})
        return amounts, repeat

    @staticmethod
    def _watched(refs: Sequence[ScopeRef], amounts: Mapping[str, int]) -> bool:
        """Whether a soft threshold watches a capped dimension of ``amounts``."""
        return any(ref.limits.thresholds and any(dim in ref.caps.caps for dim in amounts)
                   for ref in refs)

    def _charge(self, session: str, refs: Sequence[ScopeRef], amounts: Mapping[str, int]
                ) -> Denial | None:
        """Charge counts (steps, tool calls) to every scope; when a soft threshold watches
        them, read the totals in the same step and fire what the charge crossed."""
        scopes = [r.caps for r in refs]
        if not self._watched(refs, amounts):
            return self.ledger.charge(scopes, amounts)
        result = self.ledger.charge_read(scopes, amounts)
        if isinstance(result, Denial):
            return result
        self._check_thresholds(session, refs, result)
        return None

    async def _acharge(self, session: str, refs: Sequence[ScopeRef],
                       amounts: Mapping[str, int]) -> Denial | None:
        scopes = [r.caps for r in refs]
        if not self._watched(refs, amounts):
            return await self.ledger.acharge(scopes, amounts)
        result = await self.ledger.acharge_read(scopes, amounts)
        if isinstance(result, Denial):
            return result
        await self._acheck_thresholds(session, refs, result)
        return None

    def _crossed(self, session: str, refs: Sequence[ScopeRef], settled: Settlement
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
            past = self._past_spent.get(ref.scope) if ref.caps.history else None
            lowest = min(thresholds)
            for dim, cap in ref.caps.caps.items():
                if dim not in spent or cap <= 0:
                    continue
                used = spent[dim] + past.get(dim, 0) if past else spent[dim]
                if used < cap * lowest:
                    continue  # below every threshold (most settles): nothing to check
                for t in thresholds:
                    key = (ref.scope, dim, t)
                    if used < cap * t or key in self._fired:
                        continue
                    if len(self._fired) > 100_000:  # bounded: the ledger marker dedupes
                        self._fired.clear()
                    self._fired.add(key)
                    marker = f"threshold:{dim}:{t}"
                    # a rolling window's marker counts over the window's buckets: once
                    # per window length, not once per bucket
                    out.append((ScopeCaps(ref.scope, {marker: 1}, ref.caps.history), marker,
                                ThresholdEvent(session, dim, t, used, cap, scope=ref.scope,
                                               kind=ref.kind, value=ref.value,
                                               period=ref.period, window=ref.limits.window,
                                               ledger=self._ledger_id)))
        return out

    def _unread_windows(self, refs: Sequence[ScopeRef], settled: Settlement
                        ) -> list[ScopeRef]:
        """Rolling windows with thresholds whose earlier buckets this guard has not read
        since their current bucket began (one read per bucket and process)."""
        if not settled:
            return []
        return [ref for ref in refs if ref.caps.history and ref.limits.thresholds
                and ref.scope in settled.spent and ref.scope not in self._past_spent]

    def _keep_past(self, ref: ScopeRef, buckets: Sequence[ScopeTotals]) -> None:
        sums: dict[str, int] = {}
        for totals in buckets:
            for dim, amount in totals.spent.items():
                sums[dim] = sums.get(dim, 0) + int(amount)
        with self._warn_lock:
            if len(self._past_spent) >= 10_000:
                self._past_spent.clear()
            self._past_spent[ref.scope] = sums

    def _check_thresholds(self, session: str, refs: Sequence[ScopeRef],
                          settled: Settlement) -> None:
        for ref in self._unread_windows(refs, settled):
            self._keep_past(ref, self.ledger.totals_many(ref.caps.history))
        for scope, marker, event in self._crossed(session, refs, settled):
            if self.ledger.charge([scope], {marker: 1}) is None:
                self._fire(event)

    async def _acheck_thresholds(self, session: str, refs: Sequence[ScopeRef],
                                 settled: Settlement) -> None:
        for ref in self._unread_windows(refs, settled):
            self._keep_past(ref, await self.ledger.atotals_many(ref.caps.history))
        for scope, marker, event in self._crossed(session, refs, settled):
            if await self.ledger.acharge([scope], {marker: 1}) is None:
                self._fire(event)

    def _fire(self, event: ThresholdEvent) -> None:
        logger.warning("agent-guard: %s", event)
        for hook in self._threshold_hooks:
            try:
                hook(event)
            except Exception:
                logger.exception("agent-guard: threshold hook %r failed", hook)

    def _price_for(self, call: ModelCall) -> ModelPrice | None:
        """The call's price. A model without one is reserved at the stated
        ``Limits.unknown_price``; without a stated price it is refused when a dollar cap
        applies to it (never admitted at $0 and charged later), else counted at $0."""
        price = self.prices.resolve(call.model, call.provider)
        if price is not None:
            return price
        stated = self._unknown_price
        if stated is None and self._dollar_capped:
            raise UnknownModelPrice(call.model, session=call.session)
        with self._warn_lock:
            first = call.model not in self._warned_unpriced
            self._warned_unpriced.add(call.model)
        if first:
            logger.warning(
                "agent-guard: no price for model %r; its calls are %s (add a price with "
                "PriceBook.with_overrides or AGENT_GUARD_PRICES)", call.model,
                "counted at $0" if stated is None else
                "reserved and settled at Limits.unknown_price")
        return stated

    def _plan(self, call: ModelCall, *, exact: bool = False) -> _Plan:
        """What ``call`` would reserve. Unless ``exact``, a prompt with long texts not yet
        counted is sized by an upper bound of its tokens while the caps are far."""
        is_bound = False
        features = None
        if call.input_tokens is not None:
            estimated_input = int(call.input_tokens)
        elif exact:
            estimated_input = self._exact_input(call)
        else:
            estimated_input, counted, features = self.tokens.estimate_prompt(
                call.messages, call.model, tools=call.tools, params=call.params,
                conversation=call.session)
            is_bound = not counted
        requested_output = call.max_output_tokens
        if requested_output is None or requested_output <= 0:
            requested_output = self.limits.default_max_output_tokens
        price = self._price_for(call)
        plan = _Plan(self, call, price, estimated_input,
                     math.ceil(estimated_input * (1 + self.limits.input_margin)),
                     requested_output, features=features)
        if is_bound:
            if not self._bound_is_far_from_caps(plan):
                return self._plan(call, exact=True)
            plan.input_is_bound = True
        return plan

    def _exact_input(self, call: ModelCall) -> int:
        return self.tokens.count_messages(call.messages, call.model, tools=call.tools,
                                          params=call.params)

    def _bound_is_far_from_caps(self, plan: _Plan) -> bool:
        """Whether a reservation sized by the prompt's upper bound stays a small share of
        the room under every token and dollar cap it is charged against."""
        hint = self._spent_hint
        for sc in plan.scopes:
            seen = hint.get(sc.scope) if hint else None
            for dim in _BUDGET_DIMENSIONS:
                cap = sc.caps.get(dim)
                if cap is None:
                    continue
                room = cap - (seen.get(dim, 0) if seen else 0)
                if plan.amounts.get(dim, 0) > _BOUND_SHARE_OF_ROOM * room:
                    return False
        return True

    def _note_spent(self, settled: Settlement) -> None:
        """Remember each scope's spend as of this settle (a hint for _plan only: other
        processes spend too, so a denial is still retried with the exact count)."""
        if not settled or not settled.spent:
            return
        hint = self._spent_hint
        if hint is None:
            hint = self._spent_hint = {}
        elif len(hint) > 100_000:
            hint.clear()
        for scope, spent in settled.spent.items():
            hint[scope] = spent

    # scope -> spent amounts last seen settled by this guard; created on first settle
    _spent_hint: dict[str, Mapping[str, int]] | None = None

    def _after_denial(self, plan: _Plan, denial: Denial, shrinks: int) -> tuple[_Plan, int]:
        """The plan to try next after ``denial`` (and how many shrinks were tried), or
        raise the refusal. A plan sized by an upper bound is first retried exactly."""
        if plan.input_is_bound and denial.dimension in _BUDGET_DIMENSIONS:
            exact = self._plan(plan.call, exact=True)
            if plan.shrunk:
                exact = exact.with_output(min(plan.output_tokens, exact.output_tokens))
            return exact, shrinks
        shrinks += 1
        if shrinks >= _SHRINK_ATTEMPTS:
            raise self._refusal(plan.call.session, denial)
        return self._replan_or_raise(plan, denial), shrinks

    def _replan_or_raise(self, plan: _Plan, denial: Denial) -> _Plan:
        """After a denial: a smaller output cap that fits, or the refusal."""
        if not plan.call.can_shrink or denial.dimension not in _BUDGET_DIMENSIONS:
            raise self._refusal(plan.call.session, denial, plan.refs)
        room = denial.cap - denial.spent - denial.reserved
        fitted = plan.largest_output_within(denial.dimension, room)
        floor = max(1, self.limits.min_output_tokens, _thinking_floor(plan.call.params))
        if fitted < floor or fitted >= plan.output_tokens:
            raise self._refusal(plan.call.session, denial, plan.refs)
        return plan.with_output(fitted)

    def _refusal(self, session: str, denial: Denial,
                 refs: Sequence[ScopeRef] = ()) -> GuardStop:
        cls: type[GuardStop] = StepLimitExceeded
        if denial.dimension in _BUDGET_DIMENSIONS:
            cls = BudgetExceeded
        elif denial.dimension.startswith("repeat:"):
            cls = LoopDetected
        hint = None
        ref = next((r for r in refs if r.scope == denial.scope), None)
        if ref is not None and ref.kind != "session":
            name = ref.kind if ref.kind != "global" else "global_"
            limits = f"{{{ref.value!r}: Limits(...)}}" if ref.kind in self.budgets.per_value \
                else "Limits(...)"
            hint = (f"The {ref.describe()} budget is used up for every session charged to "
                    f"it. Raise Budgets({name}={limits})")
            hint += (", or wait for the next window." if ref.period is not None else ".")
        return cls(
            session=session,
            scope=denial.scope,
            dimension=denial.dimension,
            cap=denial.cap,
            spent=denial.spent,
            reserved=denial.reserved,
            requested=denial.requested,
            hint=hint,
        )

    def _cost_nano(self, price: ModelPrice | None, usage: Usage,
                   during: tuple[float, float] | None = None) -> int:
        """``during``: the call's start and end (off-peak rates apply to a call that ran
        wholly inside an off-peak window)."""
        return 0 if price is None else price.cost_nano(usage, during)

    def _settlement(
        self,
        admission: Admission,
        usage: Usage | None,
        output_tokens: int | None,
        response_model: str | None,
        outcome: Outcome,
    ) -> tuple[CallRecord, dict[str, int] | None]:
        """The record of a finished call and the amounts to settle (None: release)."""
        price = admission.price
        if response_model and response_model != admission.call.model:
            price = self.prices.resolve(response_model, admission.call.provider) or price
        estimated = usage is None
        if (usage is not None and usage.input_tokens == 0 and outcome != "cache_hit"
                and admission.estimated_input_tokens > 0):
            # a usage with 0 input for a non-empty prompt is not believed (an Anthropic-
            # compatible server whose last stream event has only output_tokens): the
            # prompt is settled at the guard's own count, the output as reported
            input_tokens = admission.estimated_input_tokens
            if admission.input_is_bound:
                input_tokens = self._exact_input(admission.call)
            usage = replace(usage, input_tokens=input_tokens)
            estimated = True
        if usage is None:
            if outcome == "error":  # failed before producing anything: nothing was paid
                return self._record(admission, Usage(), 0, estimated=False,
                                    outcome=outcome), None
            input_tokens = admission.estimated_input_tokens
            if admission.input_is_bound:  # reserved with a bound: settle with the count
                input_tokens = self._exact_input(admission.call)
            usage = self._unreported_usage(admission, price, input_tokens,
                                           max(0, int(output_tokens or 0)))
        cost = self._cost_nano(price, usage, (admission.started_at, self.clock()))
        priced = price is not None and price is not self._unknown_price
        if outcome == "cache_hit":
            return self._record(admission, usage, 0, estimated=estimated, outcome=outcome,
                                saved_nano=cost, model=response_model, priced=priced), None
        record = self._record(admission, usage, cost, estimated=estimated, outcome=outcome,
                              model=response_model, priced=priced)
        return record, _amounts(usage, cost)

    def _unreported_usage(self, admission: Admission, price: ModelPrice | None,
                          input_tokens: int, counted_output: int) -> Usage:
        """The usage of a call whose provider reported none, from what was counted.

        A model that bills hidden reasoning (LiteLLM's ``supports_reasoning``) may have
        billed reasoning tokens that no stream shows: it is settled at no less than its
        reserved output, the tokens beyond what was counted as reasoning."""
        if price is None or not (price.supports_reasoning or (
                admission.price is not None and admission.price.supports_reasoning)):
            return Usage(input_tokens=input_tokens, output_tokens=counted_output)
        output = max(counted_output, admission.max_output_tokens)
        model = admission.call.model
        with self._warn_lock:
            first = model not in self._warned_no_usage
            self._warned_no_usage.add(model)
        if first:
            logger.warning(
                "agent-guard: %r reported no usage and may bill hidden reasoning tokens: "
                "its calls are settled at their reserved output (%d tokens here). Ask the "
                "provider for usage to be charged exactly (ChatOpenAI(stream_usage=True) "
                "when streaming).", model, admission.max_output_tokens)
        return Usage(input_tokens=input_tokens, output_tokens=output,
                     reasoning_tokens=output - counted_output)

    def _record(
        self,
        admission: Admission,
        usage: Usage,
        cost_nano: int,
        *,
        estimated: bool,
        outcome: Outcome,
        saved_nano: int = 0,
        model: str | None = None,
        priced: bool | None = None,
    ) -> CallRecord:
        """``priced``: whether the settled price was known (default: the admission's)."""
        call = admission.call
        return CallRecord(
            session=call.session,
            run_id=call.run_id,
            model=model or call.model,
            provider=call.provider,
            # a frozen Usage is kept as is; a subclass is copied to the plain type
            usage=usage if type(usage) is Usage else Usage(
                usage.input_tokens, usage.output_tokens, usage.cache_read_tokens,
                usage.cache_creation_tokens, usage.reasoning_tokens),
            cost_nano=cost_nano,
            reserved_nano=admission.reserved_nano,
            usage_estimated=estimated,
            outcome=outcome,
            started_at=admission.started_at,
            ended_at=self.clock(),
            unpriced=(admission.price is None or admission.price is self._unknown_price)
            if priced is None else not priced,
            saved_nano=saved_nano,
            max_output_tokens=admission.max_output_tokens,
            node=call.node,
            tags=call.tags,
            tier=call.tier,
            route=call.route,
            attributes=admission.attributes,
            scopes=tuple(r.scope for r in admission.scopes),
            record_id=admission.reservation.id,
        )

    def _emit(self, record: CallRecord) -> None:
        for hook in self._hooks:
            try:
                hook(record)
            except Exception:  # a reporting hook must never break the agent
                logger.exception("agent-guard: record hook %r failed", hook)


def _check_ledger_retention(budgets: Budgets, ledger: Ledger) -> None:
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


def _ledger_identity(ledger: Ledger) -> str:
    """Which budgets a ledger holds: its redacted URL and key namespace; an in-process
    ledger is its own (two ``memory://`` ledgers are different budgets)."""
    inner = getattr(ledger, "inner", ledger)  # a fail-open wrapper: the backend's
    url = redact_url(getattr(inner, "url", "") or "")
    if not url or url.startswith("memory:"):
        return f"{url or type(inner).__name__}#{id(inner):x}"
    return f"{url}#{getattr(inner, 'prefix', '')}"


def _summed(scope: str, parts: Sequence[ScopeTotals]) -> ScopeTotals:
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


def _check_tool_prices(prices: Mapping[str, ToolPrice]) -> dict[str, ToolPrice]:
    out: dict[str, ToolPrice] = {}
    for name, price in prices.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"Guard(tool_prices=...) keys must be tool names, got {name!r}")
        if not isinstance(price, ToolPrice):
            raise TypeError(f"Guard(tool_prices={{{name!r}: ...}}) must be a ToolPrice, "
                            f"got {type(price).__name__}")
        out[name] = price
    return out


def _usd_text(nano: int) -> str:
    return f"{Decimal(nano) / 1_000_000_000:f}"


def _check_attributes(attributes: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in attributes.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"Guard(attributes=...) keys must be non-empty strings, got {key!r}")
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise TypeError(f"Guard(attributes={{{key!r}: ...}}) must be a string, got "
                            f"{value!r}")
        out[key] = str(value)
    return out


def _forget(admission: Admission | ToolAdmission) -> None:
    """The request is over: a later handler of the same run id admits anew."""
    key = admission.state.key
    if key is not None:
        with _OPEN_LOCK:
            pending = _OPEN_REQUESTS.get(key)
            if pending is not None and pending.admission is admission:
                del _OPEN_REQUESTS[key]


def _thinking_floor(params: Mapping[str, Any]) -> int:
    """The lowest output cap a request with extended thinking can be sent with:
    Anthropic refuses (400) a ``max_tokens`` not above ``thinking.budget_tokens``."""
    thinking = params.get("thinking") if isinstance(params, Mapping) else None
    if not isinstance(thinking, Mapping) or thinking.get("type") != "enabled":
        return 0
    budget = thinking.get("budget_tokens")
    if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
        return budget + 1
    return 0


def _amounts(usage: Usage, cost_nano: int) -> dict[str, int]:
    return {
        Dimension.USD_NANO: cost_nano,
        Dimension.TOKENS: usage.total_tokens,
        Dimension.INPUT_TOKENS: usage.input_tokens,
        Dimension.OUTPUT_TOKENS: usage.output_tokens,
        Dimension.CACHE_READ_TOKENS: usage.cache_read_tokens,
        Dimension.CACHE_CREATION_TOKENS: usage.cache_creation_tokens,
        Dimension.REASONING_TOKENS: usage.reasoning_tokens,
        Dimension.MODEL_CALLS: 1,
    }


class _Plan:
    """The amounts one model call would reserve, for a given output cap."""

    __slots__ = (
        "amounts",
        "attempts",
        "call",
        "estimated_input",
        "features",
        "guard",
        "input_is_bound",
        "output_tokens",
        "price",
        "refs",
        "reserved_input",
        "scopes",
        "shrunk",
        "worst_nano",
    )

    def __init__(
        self,
        guard: Guard,
        call: ModelCall,
        price: ModelPrice | None,
        estimated_input: int,
        reserved_input: int,
        output_tokens: int,
        refs: list[ScopeRef] | None = None,
        features: RequestFeatures | None = None,
    ) -> None:
        self.features = features if features is not None else request_features(
            call.messages, call.tools, call.params)
        self.guard = guard
        self.call = call
        self.price = price
        self.estimated_input = estimated_input
        self.reserved_input = reserved_input
        self.output_tokens = output_tokens
        self.shrunk = False
        self.input_is_bound = False
        # every attempt the provider client may send is reserved (ModelCall.attempts)
        self.attempts = max(1, int(call.attempts))
        self.worst_nano = self._worst_cost(output_tokens) * self.attempts
        self.refs = refs if refs is not None else guard.scope_refs(
            call.session, call.attributes, model=call.model, provider=call.provider)
        self.scopes = [r.caps for r in self.refs]
        self.amounts = {
            Dimension.USD_NANO: self.worst_nano,
            Dimension.TOKENS: (reserved_input + output_tokens) * self.attempts,
            Dimension.MODEL_CALLS: 1,
        }

    def _worst_cost(self, output_tokens: int) -> int:
        """Every prompt token at the dearest input-side rate the call could bill (cache
        writes when it marks blocks for caching, audio, images, its service tier), every
        output token at the dearest of the output, reasoning (and audio) rates."""
        if self.price is None:
            return 0
        f = self.features
        return self.price.worst_cost_nano(
            self.reserved_input, output_tokens, service_tier=f.service_tier,
            cache_write=f.cache_write, audio_input=f.audio_input, image_input=f.image_input,
            audio_output=f.audio_output)

    def largest_output_within(self, dimension: str, room: int) -> int:
        """The largest output cap whose worst case fits in ``room`` of ``dimension``."""
        room //= self.attempts
        if dimension == Dimension.TOKENS:
            return min(self.output_tokens, room - self.reserved_input)
        lo, hi = 0, self.output_tokens  # the cost is monotonic in output tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._worst_cost(mid) <= room:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def with_output(self, output_tokens: int) -> _Plan:
        plan = _Plan(self.guard, self.call, self.price, self.estimated_input,
                     self.reserved_input, output_tokens, self.refs, self.features)
        plan.shrunk = True
        plan.input_is_bound = self.input_is_bound
        return plan

    def admit(self, reservation: Reservation) -> Admission:
        return Admission(
            call=self.call,
            reservation=reservation,
            price=self.price,
            estimated_input_tokens=self.estimated_input,
            max_output_tokens=self.output_tokens,
            reserved_nano=self.worst_nano,
            shrunk=self.shrunk,
            started_at=self.guard.clock(),
            scopes=tuple(self.refs),
            attributes=self.guard.attributes_for(self.call.attributes),
            input_is_bound=self.input_is_bound,
        )
