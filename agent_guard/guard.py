"""The framework-agnostic engine: estimate, reserve, call, settle.

Adapters (the LangChain callback, the agent middleware, the graph wrapper)
describe a call as a :class:`ModelCall`, ask :meth:`Guard.before_model_call`
for an :class:`Admission` (or get a :class:`~agent_guard.errors.BudgetExceeded`
before anything is spent), make the call, and hand the reported usage to
:meth:`Guard.after_model_call`. Every method has an ``a``-prefixed async twin
that awaits the ledger instead of blocking on it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import (
    BudgetExceeded,
    LoopDetected,
    StepLimitExceeded,
    UnknownModelPrice,
    dimension_label,
    format_amount,
)
from .ledger import Denial, Ledger, Reservation, ScopeCaps, from_url
from .ledger.base import Settlement
from .limits import Dimension, Limits, repeat_dimension, tool_dimension
from .pricing import ModelPrice, PriceBook
from .records import CallRecord, Outcome, SessionUsage
from .tokens import TokenCounter
from .usage import Usage, usd_to_nano

__all__ = ["Admission", "Guard", "ModelCall", "ThresholdEvent"]

logger = logging.getLogger("agent_guard")

RecordHook = Callable[[CallRecord], None]
_NO_ARGS: Any = object()


@dataclass(frozen=True, slots=True)
class ThresholdEvent:
    """A session crossed a soft threshold (a fraction of one of its caps)."""

    session: str
    dimension: str
    threshold: float
    spent: int
    cap: int

    @property
    def fraction(self) -> float:
        return self.spent / self.cap if self.cap else 1.0

    def __str__(self) -> str:
        d = self.dimension
        return (f"session {self.session!r} has used {self.fraction:.0%} of its "
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
    #: ``estimated_input_tokens`` is an upper bound (long new texts were not tokenised):
    #: the guard counts the prompt exactly before settling a call without usage.
    input_is_bound: bool = False


class Guard:
    """Budget caps for sessions, enforced before each call spends anything.

    ``ledger`` is a URL (``memory://``, ``sqlite:///guard.db``,
    ``redis://127.0.0.1:6379/0``) or a :class:`~agent_guard.ledger.Ledger`.
    Guards that share a ledger share budgets, across threads, processes and
    hosts. ``on_record`` hooks receive a :class:`CallRecord` per model call;
    ``on_threshold`` hooks a :class:`ThresholdEvent` once per session and
    threshold (``Limits.thresholds``, also logged at WARNING).
    """

    def __init__(
        self,
        limits: Limits | None = None,
        ledger: str | Ledger = "memory://",
        *,
        prices: PriceBook | None = None,
        token_counter: TokenCounter | None = None,
        on_record: Sequence[RecordHook] = (),
        on_threshold: Sequence[ThresholdHook] = (),
    ) -> None:
        self.limits = limits if limits is not None else Limits()
        if not isinstance(self.limits, Limits):
            raise TypeError(f"limits must be a Limits instance, got {type(limits).__name__}")
        self.ledger = from_url(ledger)
        self.prices = prices if prices is not None else PriceBook.default()
        self.tokens = token_counter if token_counter is not None else TokenCounter()
        self._hooks: list[RecordHook] = list(on_record)
        self._caps = self.limits.caps()
        self._threshold_hooks: list[ThresholdHook] = list(on_threshold)
        self._warned_unpriced: set[str] = set()
        self._warn_lock = threading.Lock()
        self._fired: set[tuple[str, str, float]] = set()

    # -- configuration -------------------------------------------------------------

    def add_record_hook(self, hook: RecordHook) -> None:
        self._hooks.append(hook)

    def add_threshold_hook(self, hook: ThresholdHook) -> None:
        self._threshold_hooks.append(hook)

    def scopes(self, session: str, extra_caps: Mapping[str, int] | None = None
               ) -> list[ScopeCaps]:
        """The scopes a call of ``session`` is charged to, with their caps."""
        caps = self._caps if not extra_caps else {**self._caps, **extra_caps}
        return [ScopeCaps(f"session:{session}", caps)]

    # -- model calls -----------------------------------------------------------------

    def estimate_model_call(self, call: ModelCall) -> int:
        """The worst case (nano-USD) of ``call`` with its prompt counted exactly;
        reserves nothing."""
        return self._plan(call, exact=True).worst_nano

    def before_model_call(self, call: ModelCall) -> Admission:
        """Reserve the call's worst case, or raise before anything is spent."""
        plan = self._plan(call)
        shrinks = 0
        while True:
            result = self.ledger.reserve(
                plan.scopes, plan.amounts, lease_seconds=self.limits.lease_seconds
            )
            if isinstance(result, Reservation):
                return plan.admit(result)
            plan, shrinks = self._after_denial(plan, result, shrinks)

    async def abefore_model_call(self, call: ModelCall) -> Admission:
        plan = self._plan(call)
        shrinks = 0
        while True:
            result = await self.ledger.areserve(
                plan.scopes, plan.amounts, lease_seconds=self.limits.lease_seconds
            )
            if isinstance(result, Reservation):
                return plan.admit(result)
            plan, shrinks = self._after_denial(plan, result, shrinks)

    def after_model_call(
        self,
        admission: Admission,
        usage: Usage | None,
        *,
        output_tokens: int | None = None,
        response_model: str | None = None,
        cache_hit: bool = False,
    ) -> CallRecord:
        """Settle the reservation with what the call actually used.

        ``usage`` is what the provider reported; when it is ``None`` the
        guard settles from its own count (``output_tokens``, counted by the
        adapter from the answer) and marks the record as estimated. A cache
        hit releases the reservation and records what it saved.
        """
        record, amounts = self._settlement(
            admission, usage, output_tokens, response_model,
            "cache_hit" if cache_hit else "ok",
        )
        return self._close(admission, record, amounts)

    async def aafter_model_call(
        self,
        admission: Admission,
        usage: Usage | None,
        *,
        output_tokens: int | None = None,
        response_model: str | None = None,
        cache_hit: bool = False,
    ) -> CallRecord:
        record, amounts = self._settlement(
            admission, usage, output_tokens, response_model,
            "cache_hit" if cache_hit else "ok",
        )
        return await self._aclose(admission, record, amounts)

    def model_call_failed(self, admission: Admission, *, output_tokens: int = 0) -> CallRecord:
        """The call raised. Release the hold; but if output was already streamed
        (and so paid for), settle what was streamed, marked as estimated."""
        outcome: Outcome = "aborted" if output_tokens > 0 else "error"
        record, amounts = self._settlement(admission, None, output_tokens, None, outcome)
        return self._close(admission, record, amounts)

    async def amodel_call_failed(
        self, admission: Admission, *, output_tokens: int = 0
    ) -> CallRecord:
        outcome: Outcome = "aborted" if output_tokens > 0 else "error"
        record, amounts = self._settlement(admission, None, output_tokens, None, outcome)
        return await self._aclose(admission, record, amounts)

    def _close(self, admission: Admission, record: CallRecord,
               amounts: dict[str, int] | None) -> CallRecord:
        """Settle (or release, when ``amounts`` is None), report, check thresholds."""
        settled = None
        if amounts is None:
            self.ledger.release(admission.reservation)
        else:
            settled = self.ledger.settle(admission.reservation, amounts)
            self._note_spent(settled)
        self._emit(record)
        if settled is not None:
            self._check_thresholds(admission.call.session, settled)
        return record

    async def _aclose(self, admission: Admission, record: CallRecord,
                      amounts: dict[str, int] | None) -> CallRecord:
        settled = None
        if amounts is None:
            await self.ledger.arelease(admission.reservation)
        else:
            settled = await self.ledger.asettle(admission.reservation, amounts)
            self._note_spent(settled)
        self._emit(record)
        if settled is not None:
            self._check_thresholds(admission.call.session, settled)
        return record

    # -- tools and steps -----------------------------------------------------------------

    def before_tool_call(self, session: str, tool: str | None = None,
                         args: Any = _NO_ARGS) -> None:
        """Count one tool call, or raise StepLimitExceeded (LoopDetected for the
        ``max_repeats``-th identical call) before the tool runs."""
        amounts, extra = self._tool_amounts(tool, args)
        denial = self.ledger.charge(self.scopes(session, extra), amounts)
        if denial is not None:
            raise self._refusal(session, denial)

    async def abefore_tool_call(self, session: str, tool: str | None = None,
                                args: Any = _NO_ARGS) -> None:
        amounts, extra = self._tool_amounts(tool, args)
        denial = await self.ledger.acharge(self.scopes(session, extra), amounts)
        if denial is not None:
            raise self._refusal(session, denial)

    def before_step(self, session: str, n: int = 1) -> None:
        """Count ``n`` graph steps, or raise StepLimitExceeded."""
        denial = self.ledger.charge(self.scopes(session), {Dimension.STEPS: n})
        if denial is not None:
            raise self._refusal(session, denial)

    async def abefore_step(self, session: str, n: int = 1) -> None:
        denial = await self.ledger.acharge(self.scopes(session), {Dimension.STEPS: n})
        if denial is not None:
            raise self._refusal(session, denial)

    # -- reading -------------------------------------------------------------------------

    def usage(self, session: str) -> SessionUsage:
        """The session's spend, reservations and counts, as the ledger has them."""
        scope = self.scopes(session)[0].scope
        return SessionUsage.from_totals(session, self.ledger.totals(scope),
                                        self.limits.max_cost_nano)

    async def ausage(self, session: str) -> SessionUsage:
        scope = self.scopes(session)[0].scope
        return SessionUsage.from_totals(session, await self.ledger.atotals(scope),
                                        self.limits.max_cost_nano)

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
        scope = self.scopes(session)[0].scope
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
        self.ledger.close()

    # -- internals -------------------------------------------------------------------------

    def _tool_amounts(self, tool: str | None, args: Any
                      ) -> tuple[dict[str, int], dict[str, int] | None]:
        amounts = {Dimension.TOOL_CALLS: 1}
        extra: dict[str, int] | None = None
        if tool:
            amounts[tool_dimension(tool)] = 1
            if self.limits.max_repeats is not None and args is not _NO_ARGS:
                repeat = repeat_dimension(tool, args)
                amounts[repeat] = 1
                extra = {repeat: self.limits.max_repeats}
        return amounts, extra

    def _check_thresholds(self, session: str, settled: Settlement) -> None:
        """Fire each crossed soft threshold once per session (across processes: a
        marker counter with cap 1 in the ledger decides who fires)."""
        if not settled or not self.limits.thresholds:
            return
        spent = settled.spent.get(f"session:{session}", {})
        for dim, cap in self._caps.items():
            if dim not in spent or cap <= 0:
                continue
            for t in self.limits.thresholds:
                key = (session, dim, t)
                if spent[dim] < cap * t or key in self._fired:
                    continue
                if len(self._fired) > 100_000:  # bounded: the ledger marker dedupes anyway
                    self._fired.clear()
                self._fired.add(key)
                marker = f"threshold:{dim}:{t}"
                if self.ledger.charge(self.scopes(session, {marker: 1}), {marker: 1}) is None:
                    self._fire(ThresholdEvent(session, dim, t, spent[dim], cap))

    def _fire(self, event: ThresholdEvent) -> None:
        logger.warning("agent-guard: %s", event)
        for hook in self._threshold_hooks:
            try:
                hook(event)
            except Exception:
                logger.exception("agent-guard: threshold hook %r failed", hook)

    def _price_for(self, call: ModelCall) -> ModelPrice | None:
        price = self.prices.resolve(call.model, call.provider)
        if price is not None:
            return price
        if Dimension.USD_NANO in self._caps and self.limits.unknown_price == "refuse":
            raise UnknownModelPrice(call.model, session=call.session)
        with self._warn_lock:
            first = call.model not in self._warned_unpriced
            self._warned_unpriced.add(call.model)
        if first:
            logger.warning(
                "agent-guard: no price for model %r; its calls are counted at $0 "
                "(add a price with PriceBook.with_overrides or AGENT_GUARD_PRICES)",
                call.model,
            )
        return None

    def _plan(self, call: ModelCall, *, exact: bool = False) -> _Plan:
        """What ``call`` would reserve. Unless ``exact``, a prompt with long texts not yet
        counted is sized by an upper bound of its tokens while the caps are far."""
        is_bound = False
        if call.input_tokens is not None:
            estimated_input = int(call.input_tokens)
        elif exact:
            estimated_input = self._exact_input(call)
        else:
            estimated_input, counted = self.tokens.estimate_messages(
                call.messages, call.model, tools=call.tools)
            is_bound = not counted
        requested_output = call.max_output_tokens
        if requested_output is None or requested_output <= 0:
            requested_output = self.limits.default_max_output_tokens
        price = self._price_for(call)
        plan = _Plan(self, call, price, estimated_input,
                     math.ceil(estimated_input * (1 + self.limits.input_margin)),
                     requested_output)
        if is_bound:
            if not self._bound_is_far_from_caps(plan):
                return self._plan(call, exact=True)
            plan.input_is_bound = True
        return plan

    def _exact_input(self, call: ModelCall) -> int:
        return self.tokens.count_messages(call.messages, call.model, tools=call.tools)

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
            raise self._refusal(plan.call.session, denial)
        room = denial.cap - denial.spent - denial.reserved
        fitted = plan.largest_output_within(denial.dimension, room)
        if fitted < max(1, self.limits.min_output_tokens) or fitted >= plan.output_tokens:
            raise self._refusal(plan.call.session, denial)
        return plan.with_output(fitted)

    def _refusal(self, session: str, denial: Denial) -> BudgetExceeded:
        cls: type[BudgetExceeded] = StepLimitExceeded
        if denial.dimension in _BUDGET_DIMENSIONS:
            cls = BudgetExceeded
        elif denial.dimension.startswith("repeat:"):
            cls = LoopDetected
        return cls(
            session=session,
            scope=denial.scope,
            dimension=denial.dimension,
            cap=denial.cap,
            spent=denial.spent,
            reserved=denial.reserved,
            requested=denial.requested,
        )

    def _cost_nano(self, price: ModelPrice | None, usage: Usage) -> int:
        return 0 if price is None else price.cost_nano(usage)

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
        if usage is None:
            if outcome == "error":  # failed before producing anything: nothing was paid
                return self._record(admission, Usage(), 0, estimated=False,
                                    outcome=outcome), None
            input_tokens = admission.estimated_input_tokens
            if admission.input_is_bound:  # reserved with a bound: settle with the count
                input_tokens = self._exact_input(admission.call)
            usage = Usage(input_tokens=input_tokens,
                          output_tokens=max(0, int(output_tokens or 0)))
        cost = self._cost_nano(price, usage)
        if outcome == "cache_hit":
            return self._record(admission, usage, 0, estimated=estimated, outcome=outcome,
                                saved_nano=cost, model=response_model), None
        record = self._record(admission, usage, cost, estimated=estimated, outcome=outcome,
                              model=response_model)
        return record, _amounts(usage, cost)

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
    ) -> CallRecord:
        call = admission.call
        return CallRecord(
            session=call.session,
            run_id=call.run_id,
            model=model or call.model,
            provider=call.provider,
            usage=Usage(usage.input_tokens, usage.output_tokens, usage.cache_read_tokens,
                        usage.cache_creation_tokens, usage.reasoning_tokens),
            cost_nano=cost_nano,
            reserved_nano=admission.reserved_nano,
            usage_estimated=estimated,
            outcome=outcome,
            started_at=admission.started_at,
            ended_at=time.time(),
            unpriced=admission.price is None,
            saved_nano=saved_nano,
            max_output_tokens=admission.max_output_tokens,
            node=call.node,
            tags=call.tags,
            tier=call.tier,
            route=call.route,
        )

    def _emit(self, record: CallRecord) -> None:
        for hook in self._hooks:
            try:
                hook(record)
            except Exception:  # a reporting hook must never break the agent
                logger.exception("agent-guard: record hook %r failed", hook)


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
        "call",
        "estimated_input",
        "guard",
        "input_is_bound",
        "output_tokens",
        "price",
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
    ) -> None:
        self.guard = guard
        self.call = call
        self.price = price
        self.estimated_input = estimated_input
        self.reserved_input = reserved_input
        self.output_tokens = output_tokens
        self.shrunk = False
        self.input_is_bound = False
        self.worst_nano = self._worst_cost(output_tokens)
        self.scopes = guard.scopes(call.session)
        self.amounts = {
            Dimension.USD_NANO: self.worst_nano,
            Dimension.TOKENS: reserved_input + output_tokens,
            Dimension.MODEL_CALLS: 1,
        }

    def _worst_cost(self, output_tokens: int) -> int:
        """Every prompt token uncached, every output token at the dearer of the
        output and reasoning rates."""
        if self.price is None:
            return 0
        plain = Usage(input_tokens=self.reserved_input, output_tokens=output_tokens)
        cost = self.price.cost_nano(plain)
        if self.price.reasoning is not None:
            reasoning = Usage(input_tokens=self.reserved_input, output_tokens=output_tokens,
                              reasoning_tokens=output_tokens)
            cost = max(cost, self.price.cost_nano(reasoning))
        return cost

    def largest_output_within(self, dimension: str, room: int) -> int:
        """The largest output cap whose worst case fits in ``room`` of ``dimension``."""
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
                     self.reserved_input, output_tokens)
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
            input_is_bound=self.input_is_bound,
        )
