"""The framework-agnostic engine: estimate, reserve, call, settle.

Adapters (the LangChain callback, the agent middleware, the graph wrapper)
describe a call as a :class:`ModelCall`, ask :meth:`Guard.before_model_call`
for an :class:`Admission` (or get a :class:`~agent_guard.errors.BudgetExceeded`
before anything is spent), make the call, and hand the reported usage to
:meth:`Guard.after_model_call`. Every method has an ``a``-prefixed async twin
that awaits the ledger instead of blocking on it: both drive the same decision
(:mod:`agent_guard.engine.drive`), so they cannot drift apart.

``Guard`` orchestrates its collaborators: :class:`~.plan.Planner` (a call's worst case
and shrink-to-fit), :class:`~.thresholds.ThresholdWatch` (soft thresholds),
:class:`~.backlog.Backlog` (settles that found the ledger away), the request
registry of :mod:`.admission` (one request, one admission),
:class:`~.recording.Recorder` (a call's record, its hooks), :class:`~.tools.ToolCalls`
(tool calls and steps), :mod:`.reads` (usage reads, extensions) and :mod:`.checks`
(what the guard is given, checked once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal, cast

from ..errors import (
    BudgetExceeded,
    GuardError,
    GuardStop,
    LedgerUnavailable,
    LoopDetected,
    StepLimitExceeded,
)
from ..ledger import Denial, Ledger, Reservation, ScopeCaps, from_url, redact_url
from ..ledger.base import Settlement
from ..ledger.failover import FailOpenLedger
from ..pricing import PriceBook, ToolPrice
from ..tokens import TokenCounter
from . import reads
from .admission import (
    _JOIN_WAIT_SECONDS,
    NO_ARGS,
    Admission,
    ModelCall,
    ToolAdmission,
    _Pending,
    certainly_not_billed,
    claim,
    finish,
    forget,
    not_opened,
    opened,
)
from .backlog import Backlog
from .budgets import CALL_KINDS, STANDARD_ATTRIBUTES, Budgets, ScopeRef
from .checks import check_attributes, check_ledger_retention, check_tool_prices, ledger_identity
from .drive import Op, Steps, Wait, adrive, drive
from .limits import Dimension, Limits
from .plan import BUDGET_DIMENSIONS, Planner, _Plan
from .recording import Recorder, RecordHook
from .recording import amounts_of as _amounts
from .records import CallRecord, Outcome, SessionUsage
from .thresholds import ThresholdEvent, ThresholdHook, ThresholdWatch, Triggers
from .tools import ToolCalls
from .usage import Usage

__all__ = ["Admission", "Guard", "ModelCall", "ThresholdEvent", "ToolAdmission"]

logger = logging.getLogger("agent_guard")

_NO_ARGS = NO_ARGS
# threshold checks of deferred settles that landed on an event loop's thread (Guard._landed)
_THRESHOLD_TASKS: set[asyncio.Task[None]] = set()


class Guard:
    """Budget caps for sessions, enforced before each call spends anything.

    ``limits`` caps each session (:class:`Limits`), or sessions and other scopes
    together (:class:`~agent_guard.engine.budgets.Budgets`: users, teams, features,
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
        self.attributes: dict[str, str] = check_attributes(attributes or {})
        self.attribute_names = self.budgets.attribute_names() | STANDARD_ATTRIBUTES
        self.clock = clock
        self.ledger = from_url(ledger)
        # close() closes only what the guard opened: a ledger made from a URL, or the
        # fail-open wrapper it put around one (which closes the backend only if that
        # was made here too); a ledger the caller passed in is the caller's to close
        owned = not isinstance(ledger, Ledger)
        if fail == "open" and not isinstance(self.ledger, FailOpenLedger):
            self.ledger = FailOpenLedger(self.ledger, owns_inner=owned)
            owned = True
        self._owns_ledger = owned
        check_ledger_retention(self.budgets, self.ledger)
        self.prices = prices if prices is not None else PriceBook.default()
        self.tool_prices: dict[str, ToolPrice] = check_tool_prices(tool_prices or {})
        self._call_kinds = self.budgets.call_kinds()
        self.tokens = token_counter if token_counter is not None else TokenCounter()
        # the records: built and emitted by the Recorder, its methods bound here (the
        # settle path calls them once per call)
        self._recorder = Recorder(self, on_record)
        self._hooks = self._recorder.hooks
        self._settlement = self._recorder.settlement
        self._record = self._recorder.record
        self._emit = self._recorder.emit
        self._caps = self.limits.caps()
        # a model without a price: reserved at the stated price, else refused under a
        # dollar cap of any scope (Limits.unknown_price)
        self._unknown_price = self.limits.unknown_model_price()
        self._dollar_capped = any(
            lim.max_cost_usd is not None
            for lim in (self.budgets.session, *(lim for _, lim in self.budgets.all_limits())))
        # whether any budget counts tool calls against a cap (max_tool_calls of any
        # scope, max_repeats): an adapter that sees a tool run again in one call counts
        # each run only when a cap reads the count
        self.tool_calls_capped = self.limits.max_repeats is not None or any(
            lim.max_tool_calls is not None
            for lim in (self.budgets.session, *(lim for _, lim in self.budgets.all_limits())))
        # finished calls whose settle found the ledger unavailable (settle_pending)
        self._unsettled = Backlog()
        # its queue, tested before every model call (a deque's truth: no Python call)
        self._unsettled_items = self._unsettled._items
        self._ledger_id = ledger_identity(self.ledger)
        self._watch = ThresholdWatch(on_threshold, self._ledger_id)
        self._planner = Planner(self)
        self._tools = ToolCalls(self)
        # whether any budget has soft thresholds (else a settle checks none)
        self._thresholds = bool(self.limits.thresholds) or any(
            lim.thresholds for _, lim in self.budgets.all_limits())

    # -- configuration -------------------------------------------------------------

    def add_record_hook(self, hook: RecordHook) -> None:
        self._hooks.append(hook)

    def add_threshold_hook(self, hook: ThresholdHook) -> None:
        self._watch.hooks.append(hook)

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
        selecting = self._scope_attributes(attributes, model, provider, tool)
        return self.budgets.resolve(session, selecting, self.clock(), self._caps, extra_caps)

    def _scope_attributes(self, attributes: Mapping[str, str] | None,
                          model: str | None = None, provider: str | None = None,
                          tool: str | None = None) -> Mapping[str, str]:
        """The values that select a call's scopes: :meth:`attributes_for`, and the call
        kinds' (model, provider, tool) when a budget has one: those are the call's own,
        never read from metadata."""
        if self._call_kinds:
            own = {k: v for k, v in (("model", model), ("provider", provider),
                                     ("tool", tool)) if v and k in self._call_kinds}
            merged = {k: v for k, v in self.attributes_for(attributes).items()
                      if k not in CALL_KINDS}
            return {**merged, **own}
        return self.attributes_for(attributes)

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
        own, pending = claim(self._ledger_id, call.run_id)
        if pending is not None or self._unsettled_items:
            return drive(self.ledger, self._admit_claimed(call, own, pending))
        # the common case without a generator (its start and end cost more than the
        # rest of the driving): the same plan and first reserve, the ledger called directly
        try:
            plan = self._planner.plan(call)
            result = self.ledger.reserve(plan.scopes, plan.amounts,
                                         lease_seconds=self.limits.lease_seconds)
            if isinstance(result, Reservation):
                return opened(own, plan.admit(result))
        except BaseException as exc:
            not_opened(own, exc)
            raise
        return drive(self.ledger, self._reserved(own, plan, result))

    async def abefore_model_call(self, call: ModelCall) -> Admission:
        return await adrive(self.ledger, self._admit(call))

    def _admit(self, call: ModelCall) -> Steps[Admission]:
        own, pending = claim(self._ledger_id, call.run_id)
        return (yield from self._admit_claimed(call, own, pending))

    def _admit_claimed(self, call: ModelCall, own: _Pending | None,
                       pending: _Pending | None) -> Steps[Admission]:
        """``own``: the request's entry this holder opened; ``pending``: the one it joins."""
        if pending is not None:
            if not pending.is_set():
                yield Wait(pending, _JOIN_WAIT_SECONDS)
            return (yield from self._joined(call, pending))
        try:
            if self._unsettled:
                yield from self._settle_pending()
            plan = self._plan(call)
            result = yield Op("reserve", plan.scopes, plan.amounts,
                              lease_seconds=self.limits.lease_seconds)
        except BaseException as exc:
            not_opened(own, exc)
            raise
        return (yield from self._reserved(own, plan, result))

    def _reserved(self, own: _Pending | None, plan: _Plan,
                  result: Reservation | Denial) -> Steps[Admission]:
        """After a reserve: the admission, or (after a denial) the next plan reserved
        until one is admitted or the call is refused."""
        try:
            shrinks = 0
            while not isinstance(result, Reservation):
                plan, shrinks = self._planner.after_denial(plan, result, shrinks)
                result = yield Op("reserve", plan.scopes, plan.amounts,
                                  lease_seconds=self.limits.lease_seconds)
            return opened(own, plan.admit(result))
        except BaseException as exc:
            not_opened(own, exc)
            raise

    def _joined(self, call: ModelCall, pending: _Pending) -> Steps[Admission]:
        """Join the admission of the request another holder opened (or its refusal)."""
        if pending.error is not None:
            raise pending.error
        if pending.admission is None:  # the first holder is stuck: admit on its own
            return (yield from self._admit(replace(call, run_id=None)))
        return pending.admission

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
        record, amounts = self._settlement(admission, usage, output_tokens, response_model,
                                           "cache_hit" if cache_hit else "ok")
        if retried:  # _with_retries has nothing to add to a call without retries
            record, amounts = self._with_retries(admission, record, amounts, retried)
        if amounts is None or self.ledger.defers_settles:
            return drive(self.ledger, self._close(admission, record, amounts))
        return self._close_settled(admission, record, amounts)

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
        return await adrive(self.ledger, self._close(*self._settled(
            admission, usage, output_tokens, response_model, cache_hit, retried)))

    def _settled(self, admission: Admission, usage: Usage | None, output_tokens: int | None,
                 response_model: str | None, cache_hit: bool, retried: int
                 ) -> tuple[Admission, CallRecord, dict[str, int] | None]:
        record, amounts = self._settlement(
            admission, usage, output_tokens, response_model,
            "cache_hit" if cache_hit else "ok",
        )
        return admission, *self._with_retries(admission, record, amounts, retried)

    def model_call_failed(self, admission: Admission, *, output_tokens: int = 0,
                          error: BaseException | None = None) -> CallRecord:
        """The call raised ``error``. Only a call the provider certainly did not bill
        (:func:`certainly_not_billed`: an HTTP status error, a connection never made)
        is released; one that may have been billed (a timeout, a reset, a
        cancellation, a stream closed early) is charged its reserved worst case,
        marked estimated (:meth:`model_call_abandoned`). A guard's own stop (a
        ``GuardError``), or no ``error`` given, settles what was streamed (nothing
        streamed: released)."""
        return drive(self.ledger, self._close(
            admission, *self._failure(admission, output_tokens, error)))

    async def amodel_call_failed(
        self, admission: Admission, *, output_tokens: int = 0,
        error: BaseException | None = None,
    ) -> CallRecord:
        return await adrive(self.ledger, self._close(
            admission, *self._failure(admission, output_tokens, error)))

    def model_call_abandoned(self, admission: Admission) -> CallRecord:
        """The call ended without a result or an error the adapter could read (it was
        cancelled, its run was dropped, another callback failed): it may have been
        billed in full, so it is charged what was reserved for it (every attempt's
        worst case), marked estimated and ``aborted``. A no-op once the call ended."""
        return drive(self.ledger, self._close(admission, *self._abandoned(admission)))

    async def amodel_call_abandoned(self, admission: Admission) -> CallRecord:
        return await adrive(self.ledger, self._close(admission, *self._abandoned(admission)))

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
               amounts: dict[str, int] | None) -> Steps[CallRecord]:
        """Settle (or release, when ``amounts`` is None), report, check thresholds; once
        per admission, whoever of its holders comes first."""
        first = finish(admission, record)
        if first is not record:
            return first
        reservation = cast(Reservation, admission.reservation)
        settled = None
        try:
            if amounts is None:
                yield Op("release", reservation)
            elif self.ledger.defers_settles and self._watch.may_defer(
                    admission.scopes, amounts, self._planner.spent_hint,
                    _known_triggers(admission)):
                self._settle_later(admission, amounts)
            else:
                try:
                    settled = yield Op("settle", reservation, amounts)
                except LedgerUnavailable as exc:
                    self._unsettled.keep(reservation, amounts, exc)
                else:
                    self._planner.note_spent(settled)
        finally:
            forget(admission)
        self._emit(record)
        if settled is not None and settled.counted and self._thresholds:
            refs = self._threshold_refs(admission, settled)
            if refs:
                yield from self._watch.check(record.session, refs, settled)
        return record

    def _threshold_refs(self, admission: Admission | ToolAdmission, settled: Settlement
                        ) -> Sequence[ScopeRef]:
        """The scopes whose soft thresholds a counted settle checks (reading and charging
        the ledger): none when the admission's descriptor shows nothing can fire
        (ThresholdWatch.may_fire), else all of them."""
        resolved = admission.resolved if isinstance(admission, Admission) else None
        if resolved is None or resolved.refs is not admission.scopes:
            return admission.scopes
        if resolved.triggers is not None and self._watch.may_fire(resolved.triggers,
                                                                  settled.spent):
            return resolved.refs
        return ()

    def _close_settled(self, admission: Admission, record: CallRecord,
                       amounts: dict[str, int]) -> CallRecord:
        """:meth:`_close` of a settle on a ledger that does not defer it, called
        directly: the same steps without a generator (its start and end cost more than
        the rest of the driving), the small ones inlined."""
        first = finish(admission, record)
        if first is not record:
            return first
        reservation = admission.reservation
        settled = None
        try:
            try:
                # amounts_of's counts are a validated Usage's (ints >= 0): only the cost,
                # a price's answer, is looked at before the ledger may skip its check
                cost = amounts["usd_nano"]
                settled = (self.ledger.settle_valid if type(cost) is int and cost >= 0
                           else self.ledger.settle)(reservation, amounts)
            except LedgerUnavailable as exc:
                self._unsettled.keep(reservation, amounts, exc)
            else:
                # _planner.note_spent(settled), its common case inlined: the hint kept and
                # small, a counted settle's totals added to it
                hint = self._planner.spent_hint
                if hint is not None and len(hint) <= 100_000 and settled.counted:
                    if settled.spent:
                        hint.update(settled.spent)
                else:
                    self._planner.note_spent(settled)
        finally:
            if admission.state.key is not None:  # only a request others may join is kept
                forget(admission)
        if self._hooks:
            self._emit(record)
        if settled is not None and settled.counted and self._thresholds:
            resolved = admission.resolved  # (_threshold_refs, inlined)
            if resolved is None or resolved.refs is not admission.scopes:
                self._check_thresholds(record.session, admission.scopes, settled)
            elif resolved.triggers is not None and self._watch.may_fire(
                    resolved.triggers, settled.spent):  # else nothing to read or fire
                self._check_thresholds(record.session, resolved.refs, settled)
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


    def _landed(self, admission: Admission | ToolAdmission, settled: Settlement) -> None:
        """A deferred settle landed (in the thread that carried it): note the spend and
        check the thresholds; on an event loop's thread, in a task of that loop."""
        self._planner.note_spent(settled)
        # (no triggers known: the refs are walked; a descriptor with no thresholds has none)
        if not settled or (_known_triggers(admission) is None and not any(
                ref.limits.thresholds for ref in admission.scopes)):
            return
        refs = self._threshold_refs(admission, settled)
        if not refs:  # nothing can fire
            return
        session = (admission.call.session if isinstance(admission, Admission)
                   else admission.session)  # a priced tool's deferred settle
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._check_thresholds(session, refs, settled)
            return
        task = loop.create_task(self._acheck_thresholds(session, refs, settled))
        _THRESHOLD_TASKS.add(task)
        task.add_done_callback(_THRESHOLD_TASKS.discard)


    # -- tools and steps -----------------------------------------------------------------

    def tool_price(self, tool: str | None, declared: ToolPrice | None = None
                   ) -> ToolPrice | None:
        """The price of ``tool``'s calls: ``Guard(tool_prices=...)``, else the one the
        tool declares (``declared``: ``priced_tool``, its metadata), else the price book's
        ``tools`` table (the overrides file). None: the tool is free."""
        return self._tools.price(tool, declared)

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
        return drive(self.ledger, self._tools.admit(session, tool, args, attributes, price))

    async def abefore_tool_call(self, session: str, tool: str | None = None,
                                args: Any = _NO_ARGS, *,
                                attributes: Mapping[str, str] | None = None,
                                price: ToolPrice | None = None) -> ToolAdmission:
        return await adrive(self.ledger,
                            self._tools.admit(session, tool, args, attributes, price))

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
        return drive(self.ledger, self._tools.done(admission, *self._tools.settlement(
            session, tool, outcome, saved_nano, started_at, run_id, node, tags, attributes,
            admission, result)))

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
        return await adrive(self.ledger, self._tools.done(admission, *self._tools.settlement(
            session, tool, outcome, saved_nano, started_at, run_id, node, tags, attributes,
            admission, result)))

    def tool_call_not_run(self, admission: ToolAdmission) -> None:
        """The admitted tool certainly did not run (another handler refused it, its
        arguments were invalid): its reservation is released. No record is emitted."""
        drive(self.ledger, self._tools.not_run(admission))

    async def atool_call_not_run(self, admission: ToolAdmission) -> None:
        await adrive(self.ledger, self._tools.not_run(admission))

    def before_step(self, session: str, n: int = 1, *,
                    attributes: Mapping[str, str] | None = None) -> None:
        """Count ``n`` graph steps, or raise StepLimitExceeded."""
        drive(self.ledger, self._tools.step(session, n, attributes))

    async def abefore_step(self, session: str, n: int = 1, *,
                           attributes: Mapping[str, str] | None = None) -> None:
        await adrive(self.ledger, self._tools.step(session, n, attributes))

    # -- reading -------------------------------------------------------------------------

    def usage(self, session: str) -> SessionUsage:
        """The session's spend, reservations and counts, as the ledger has them."""
        return drive(self.ledger, reads.session_usage(self, session))

    async def ausage(self, session: str) -> SessionUsage:
        return await adrive(self.ledger, reads.session_usage(self, session))

    def scope_usage(self, kind: str, value: str | None = None, *,
                    at: float | None = None) -> SessionUsage:
        """The spend of one budget scope (``scope_usage("team", "acme")``) in the window
        holding ``at`` (now by default); ``session`` of the result is the ledger scope."""
        return reads.scope_usage(self, kind, value, at)

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
        drive(self.ledger, reads.extending(self, session, usd=usd, tokens=tokens,
                                           steps=steps, model_calls=model_calls,
                                           tool_calls=tool_calls))

    async def aextend(self, session: str, *, usd: Any = None, tokens: int | None = None,
                      steps: int | None = None, model_calls: int | None = None,
                      tool_calls: int | None = None) -> None:
        """:meth:`extend` awaiting the ledger."""
        await adrive(self.ledger, reads.extending(
            self, session, usd=usd, tokens=tokens, steps=steps, model_calls=model_calls,
            tool_calls=tool_calls))

    def close(self) -> None:
        """Settle what is pending (deferred settles land here too) and close the ledger
        if the guard opened it (from a URL): a ledger passed in stays open."""
        drive(self.ledger, self._closing())

    async def aclose(self) -> None:
        """:meth:`close` awaiting the ledger."""
        await adrive(self.ledger, self._closing())

    def _closing(self) -> Steps[None]:
        if self.pending_settles and not (yield from self._settle_pending()):
            self._log_never_counted()
        if self._owns_ledger:
            yield Op("close")

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Guard:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _log_never_counted(self) -> None:
        logger.error("agent-guard: closing with %d settled calls the ledger never "
                     "counted (%s is unavailable)", self.pending_settles,
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
        return drive(self.ledger, self._settle_pending())

    async def asettle_pending(self) -> bool:
        return await adrive(self.ledger, self._settle_pending())

    def _settle_pending(self) -> Steps[bool]:
        return (yield from self._unsettled.settle(self._planner.note_spent))

    # -- internals -------------------------------------------------------------------------

    def _check_thresholds(self, session: str, refs: Sequence[ScopeRef],
                          settled: Settlement) -> None:
        watch = self._watch
        if not settled or watch.unread_windows(refs, settled):
            drive(self.ledger, watch.check(session, refs, settled))
            return
        # nothing to read first (nearly every settle): ThresholdWatch.check's marker
        # charges, called directly (no generator when nothing was crossed)
        for scope, marker, event in watch.crossed(session, refs, settled):
            if self.ledger.charge([scope], {marker: 1}) is None:
                watch.fire(event)

    async def _acheck_thresholds(self, session: str, refs: Sequence[ScopeRef],
                                 settled: Settlement) -> None:
        await adrive(self.ledger, self._watch.check(session, refs, settled))

    def _plan(self, call: ModelCall, *, exact: bool = False) -> _Plan:
        """What ``call`` would reserve (:meth:`Planner.plan`)."""
        return self._planner.plan(call, exact=exact)

    def _refusal(self, session: str, denial: Denial,
                 refs: Sequence[ScopeRef] = ()) -> GuardStop:
        cls: type[GuardStop] = StepLimitExceeded
        if denial.dimension in BUDGET_DIMENSIONS:
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


def _known_triggers(admission: Admission | ToolAdmission) -> Triggers | None:
    """The threshold triggers of ``admission``'s scopes when its call descriptor holds
    them (ThresholdWatch.triggers), else None (not known here)."""
    resolved = admission.resolved if isinstance(admission, Admission) else None
    if resolved is not None and resolved.refs is admission.scopes:
        return resolved.triggers
    return None
