"""Planning a model call: what it would reserve, and shrink-to-fit after a denial.

:class:`Planner` (one per guard) sizes a call's worst case (:class:`_Plan`: the prompt,
counted or bounded, plus its output cap at the dearest rates it could bill, for every
attempt) and, when the ledger denies it, decides the next plan: the exact prompt count
instead of a bound, a smaller output cap that fits, or the refusal. It reads no ledger:
the guard's drivers reserve.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._frozen import fields_maker
from ..errors import UnknownModelPrice
from ..ledger import Denial, Reservation
from ..ledger.base import Settlement
from ..pricing import ModelPrice
from ..tokens import RequestFeatures, request_features
from .admission import Admission, ModelCall, _CallState
from .budgets import ScopeRef
from .limits import Dimension
from .thresholds import ThresholdWatch, Triggers

if TYPE_CHECKING:
    from .guard import Guard

__all__ = ["BUDGET_DIMENSIONS", "Planner"]

logger = logging.getLogger("agent_guard")

# Dimensions whose refusal is about money/tokens (BudgetExceeded) rather than counts.
BUDGET_DIMENSIONS = frozenset({Dimension.USD_NANO, Dimension.TOKENS})
# How often a shrink-to-fit reservation is retried when a concurrent call takes the room.
_SHRINK_ATTEMPTS = 3
# A prompt with long texts not counted yet is reserved with an upper bound of its tokens
# (their UTF-8 length; see TokenCounter.estimate_messages) only while that reservation is
# at most this share of what is left under each token and dollar cap (cap minus the spend
# this process last saw settled). Nearer a cap the prompt is counted exactly, and a
# reservation with the bound that is denied is retried with the exact count.
_BOUND_SHARE_OF_ROOM = 0.1
# How many call descriptors (Planner.resolved) a planner keeps per generation (two).
_RESOLVED_MAX = 4096
_NOTHING: Mapping[str, Any] = {}


_new_admission = fields_maker(Admission)


class Resolved:
    """What every model call of one session, model, provider and attributes shares while
    its window periods last: the price, the scopes (refs, and their caps for the ledger),
    their names for the record, and the parts of the bound and threshold checks that do
    not depend on the amounts. Built by :meth:`Planner.resolved` on a call's first use
    and again when a window period ends or the guard's attributes or price book change;
    the call's admission carries it to the settle (each of these was a few small steps
    on every call, several per scope)."""

    __slots__ = ("bound_caps", "end", "guard_attributes", "names", "price", "prices", "refs",
                 "scopes", "start", "triggers")

    def __init__(self, guard: Guard, price: ModelPrice | None, refs: tuple[ScopeRef, ...],
                 start: float, end: float) -> None:
        self.price = price
        self.refs = refs
        self.start = start
        self.end = end
        self.prices = guard.prices
        self.guard_attributes = dict(guard.attributes)
        self.scopes = tuple([r.caps for r in refs])
        self.names = tuple([r.scope for r in refs])
        # each scope's token and dollar caps, for Planner.plan's check of a bound
        self.bound_caps = tuple([
            (sc.scope, tuple([(dim, sc.caps[dim]) for dim in BUDGET_DIMENSIONS
                              if sc.caps.get(dim) is not None]))
            for sc in self.scopes])
        # None: no scope has soft thresholds (a settle checks none)
        self.triggers: Triggers | None = ThresholdWatch.triggers(refs) or None


class Planner:
    """Plans the model calls of one guard; remembers the spend it last saw settled per
    scope (a hint: other processes spend too) and which unpriced models it warned of."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        # scope -> spent amounts last seen settled by this guard; created on first settle
        self.spent_hint: dict[str, Mapping[str, int]] | None = None
        self._warned_unpriced: set[str] = set()
        self._lock = threading.Lock()
        # (session, model, provider, *call attributes) -> Resolved, in two generations
        self._resolved: dict[tuple[Any, ...], Resolved] = {}
        self._resolved_old: dict[tuple[Any, ...], Resolved] = {}

    def resolved(self, call: ModelCall) -> Resolved:
        """The call's :class:`Resolved`: the one kept for its session, model, provider and
        attributes while its window periods hold (checked against the clock, read once
        per call as before) and the guard's price book and attributes are unchanged;
        else built anew. The price comes first: an unpriced model under a dollar cap is
        refused before the scopes are resolved."""
        guard = self.guard
        attributes = call.attributes
        key = (call.session, call.model, call.provider, *attributes.items()) if attributes \
            else (call.session, call.model, call.provider)  # (most calls: no unpacking)
        try:
            found = self._resolved.get(key) or self._resolved_old.get(key)
        except TypeError:  # an attribute value that cannot be hashed: resolved each call
            return self._resolve(call, None, self.price_for(call), guard.clock())
        if found is None:
            return self._resolve(call, key, self.price_for(call), guard.clock())
        now = guard.clock()
        if (found.start <= now < found.end and found.prices is guard.prices
                and found.guard_attributes == guard.attributes):
            return found
        return self._resolve(call, key, self.price_for(call), now)

    def _resolve(self, call: ModelCall, key: tuple[Any, ...] | None,
                 price: ModelPrice | None, now: float) -> Resolved:
        guard = self.guard
        refs, start, end, _ = guard.budgets.resolve_span(
            call.session, guard._scope_attributes(call.attributes, call.model, call.provider),
            now, guard._caps)
        resolved = Resolved(guard, price, refs, start, end)
        if key is not None:
            if len(self._resolved) >= _RESOLVED_MAX:  # the older generation is dropped
                self._resolved_old, self._resolved = self._resolved, {}
            self._resolved[key] = resolved
        return resolved

    def price_for(self, call: ModelCall) -> ModelPrice | None:
        """The call's price. A model without one is reserved at the stated
        ``Limits.unknown_price``; without a stated price it is refused when a dollar cap
        applies to it (never admitted at $0 and charged later), else counted at $0."""
        guard = self.guard
        price = guard.prices.resolve(call.model, call.provider)
        if price is not None:
            return price
        stated = guard._unknown_price
        if stated is None and guard._dollar_capped:
            raise UnknownModelPrice(call.model, session=call.session)
        with self._lock:
            first = call.model not in self._warned_unpriced
            self._warned_unpriced.add(call.model)
        if first:
            logger.warning(
                "agent-guard: no price for model %r; its calls are %s (add a price with "
                "PriceBook.with_overrides or AGENT_GUARD_PRICES)", call.model,
                "counted at $0" if stated is None else
                "reserved and settled at Limits.unknown_price")
        return stated

    def plan(self, call: ModelCall, *, exact: bool = False) -> _Plan:
        """What ``call`` would reserve. Unless ``exact``, a prompt with long texts not yet
        counted is sized by an upper bound of its tokens while the caps are far."""
        guard = self.guard
        is_bound = False
        features = None
        if call.input_tokens is not None:
            estimated_input = int(call.input_tokens)
        elif exact:
            estimated_input = self.exact_input(call)
        else:
            estimated_input, counted, features = guard.tokens.estimate_prompt(
                call.messages, call.model, tools=call.tools, params=call.params,
                conversation=call.session)
            is_bound = not counted
        requested_output = call.max_output_tokens
        if requested_output is None or requested_output <= 0:
            requested_output = guard.limits.default_max_output_tokens
        plan = _Plan(guard, call, self.resolved(call), estimated_input,
                     math.ceil(estimated_input * (1 + guard.limits.input_margin)),
                     requested_output, features)
        if is_bound:
            # the reservation sized by the bound must stay a small share of the room under
            # every token and dollar cap it is charged against, else the prompt is counted
            # (inline: a call here cost a tenth of the plan)
            hint = self.spent_hint or _NOTHING
            amounts = plan.amounts
            for scope, caps in plan.resolved.bound_caps:
                seen = hint.get(scope) or _NOTHING
                for dim, cap in caps:
                    if amounts[dim] > _BOUND_SHARE_OF_ROOM * (cap - seen.get(dim, 0)):
                        return self.plan(call, exact=True)
            plan.input_is_bound = True
        return plan

    def exact_input(self, call: ModelCall) -> int:
        return self.guard.tokens.count_messages(call.messages, call.model, tools=call.tools,
                                                params=call.params)

    def note_spent(self, settled: Settlement) -> None:
        """Remember each scope's spend as of this settle (a hint for planning only: other
        processes spend too, so a denial is still retried with the exact count)."""
        if not settled.counted or not settled.spent:
            return
        hint = self.spent_hint
        if hint is None:
            hint = self.spent_hint = {}
        elif len(hint) > 100_000:
            hint.clear()
        hint.update(settled.spent)  # each scope's spent totals

    def after_denial(self, plan: _Plan, denial: Denial, shrinks: int) -> tuple[_Plan, int]:
        """The plan to try next after ``denial`` (and how many shrinks were tried), or
        raise the refusal. A plan sized by an upper bound is first retried exactly."""
        if plan.input_is_bound and denial.dimension in BUDGET_DIMENSIONS:
            exact = self.plan(plan.call, exact=True)
            if plan.shrunk:
                exact = exact.with_output(min(plan.output_tokens, exact.output_tokens))
            return exact, shrinks
        shrinks += 1
        if shrinks >= _SHRINK_ATTEMPTS:
            raise self.guard._refusal(plan.call.session, denial)
        return self._replan_or_raise(plan, denial), shrinks

    def _replan_or_raise(self, plan: _Plan, denial: Denial) -> _Plan:
        """After a denial: a smaller output cap that fits, or the refusal."""
        guard = self.guard
        if not plan.call.can_shrink or denial.dimension not in BUDGET_DIMENSIONS:
            raise guard._refusal(plan.call.session, denial, plan.refs)
        room = denial.cap - denial.spent - denial.reserved
        fitted = plan.largest_output_within(denial.dimension, room)
        floor = max(1, guard.limits.min_output_tokens, _thinking_floor(plan.call.params))
        if fitted < floor or fitted >= plan.output_tokens:
            raise guard._refusal(plan.call.session, denial, plan.refs)
        return plan.with_output(fitted)


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
        "resolved",
        "scopes",
        "shrunk",
        "worst_nano",
    )

    def __init__(
        self,
        guard: Guard,
        call: ModelCall,
        resolved: Resolved,
        estimated_input: int,
        reserved_input: int,
        output_tokens: int,
        features: RequestFeatures | None = None,
    ) -> None:
        self.features = features if features is not None else request_features(
            call.messages, call.tools, call.params)
        self.guard = guard
        self.call = call
        self.resolved = resolved
        self.price = resolved.price
        self.estimated_input = estimated_input
        self.reserved_input = reserved_input
        self.output_tokens = output_tokens
        self.shrunk = False
        self.input_is_bound = False
        # every attempt the provider client may send is reserved (ModelCall.attempts)
        attempts = call.attempts
        if type(attempts) is not int or attempts < 1:  # (max and int: two calls, rarely
            attempts = max(1, int(attempts))           # needed)
        self.attempts = attempts
        self.worst_nano = self._worst_cost(output_tokens) * self.attempts
        self.refs = resolved.refs
        self.scopes = resolved.scopes
        # Dimension's USD_NANO, TOKENS and MODEL_CALLS written out (constant keys: the
        # dict is built in one step)
        self.amounts = {
            "usd_nano": self.worst_nano,
            "tokens": (reserved_input + output_tokens) * self.attempts,
            "model_calls": 1,
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
        plan = _Plan(self.guard, self.call, self.resolved, self.estimated_input,
                     self.reserved_input, output_tokens, self.features)
        plan.shrunk = True
        plan.input_is_bound = self.input_is_bound
        return plan

    def admit(self, reservation: Reservation) -> Admission:
        guard = self.guard
        call = self.call
        # positional: a call's keyword arguments are matched by name, one by one (about
        # 400 instructions each), so every field is given in the order Admission declares;
        # Admission has no __post_init__, so its fields_maker builds the same object
        return _new_admission(
            call,
            reservation,
            self.price,
            self.estimated_input,  # estimated_input_tokens
            self.output_tokens,  # max_output_tokens
            self.worst_nano,  # reserved_nano
            self.shrunk,
            guard.clock(),  # started_at
            self.refs,  # scopes
            # attributes: Guard.attributes_for, inlined
            {**guard.attributes, **call.attributes} if call.attributes else guard.attributes,
            self.input_is_bound,
            _CallState(),  # state
            self.resolved,
        )
