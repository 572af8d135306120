"""Building and emitting a model call's :class:`~.records.CallRecord`: what a finished
call used and cost, the amounts its reservation settles, and the ``on_record`` hooks
that receive the record."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from .._frozen import fields_maker
from ..pricing import ModelPrice
from .admission import Admission
from .records import CallRecord, Outcome
from .usage import Usage

if TYPE_CHECKING:
    from .guard import Guard

__all__ = ["RecordHook", "Recorder", "amounts_of"]

logger = logging.getLogger("agent_guard")

RecordHook = Callable[[CallRecord], None]
_new_record = fields_maker(CallRecord)


class Recorder:
    """A guard's records: built from an admission and what the call used, handed to the
    guard's ``on_record`` hooks (a failing hook is logged, never raised)."""

    __slots__ = ("_warn_lock", "_warned_no_usage", "guard", "hooks")

    def __init__(self, guard: Guard, hooks: Sequence[RecordHook]) -> None:
        self.guard = guard
        self.hooks: list[RecordHook] = list(hooks)
        self._warned_no_usage: set[str] = set()
        self._warn_lock = threading.Lock()  # the models warned of (no usage reported)

    def settlement(
        self,
        admission: Admission,
        usage: Usage | None,
        output_tokens: int | None,
        response_model: str | None,
        outcome: Outcome,
    ) -> tuple[CallRecord, dict[str, int] | None]:
        """The record of a finished call and the amounts to settle (None: release)."""
        guard = self.guard
        price = admission.price
        if response_model and response_model != admission.call.model:
            price = guard.prices.resolve(response_model, admission.call.provider) or price
        estimated = usage is None
        if (usage is not None and usage.input_tokens == 0 and outcome != "cache_hit"
                and admission.estimated_input_tokens > 0):
            # a usage with 0 input for a non-empty prompt is not believed (an Anthropic-
            # compatible server whose last stream event has only output_tokens): the
            # prompt is settled at the guard's own count, the output as reported
            input_tokens = admission.estimated_input_tokens
            if admission.input_is_bound:
                input_tokens = guard._planner.exact_input(admission.call)
            usage = replace(usage, input_tokens=input_tokens)
            estimated = True
        if usage is None:
            if outcome == "error":  # failed before producing anything: nothing was paid
                return self.record(admission, Usage(), 0, estimated=False,
                                   outcome=outcome), None
            input_tokens = admission.estimated_input_tokens
            if admission.input_is_bound:  # reserved with a bound: settle with the count
                input_tokens = guard._planner.exact_input(admission.call)
            usage = self.unreported_usage(admission, price, input_tokens,
                                          max(0, int(output_tokens or 0)))
        # cost_nano(), inlined
        cost = 0 if price is None else price.cost_nano(usage, (admission.started_at,
                                                              guard.clock()))
        priced = price is not None and price is not guard._unknown_price
        if outcome == "cache_hit":
            return self.record(admission, usage, 0, estimated=estimated, outcome=outcome,
                               saved_nano=cost, model=response_model, priced=priced), None
        # (positional: the keywords' matching by name cost more than the rest of the call)
        record = self.record(admission, usage, cost, estimated, outcome, 0, response_model,
                             priced)
        return record, amounts_of(usage, cost)

    def unreported_usage(self, admission: Admission, price: ModelPrice | None,
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

    def record(
        self,
        admission: Admission,
        usage: Usage,
        cost_nano: int,
        estimated: bool,
        outcome: Outcome,
        saved_nano: int = 0,
        model: str | None = None,
        priced: bool | None = None,
    ) -> CallRecord:
        """``priced``: whether the settled price was known (default: the admission's)."""
        call = admission.call
        guard = self.guard
        # the scopes' names: the planner's descriptor has them, unless the admission's
        # scopes were replaced since
        resolved = admission.resolved
        names = resolved.names if resolved is not None and resolved.refs is admission.scopes \
            else tuple([r.scope for r in admission.scopes])
        # positional, in the order CallRecord declares its fields: a call's keyword
        # arguments are matched by name, one by one (about 400 instructions each);
        # CallRecord has no __post_init__, so its fields_maker builds the same object
        return _new_record(
            call.session,
            call.run_id,
            model or call.model,
            call.provider,
            # usage: a frozen Usage is kept as is; a subclass is copied to the plain type
            usage if type(usage) is Usage else Usage(
                usage.input_tokens, usage.output_tokens, usage.cache_read_tokens,
                usage.cache_creation_tokens, usage.reasoning_tokens),
            cost_nano,
            admission.reserved_nano,
            estimated,  # usage_estimated
            outcome,
            admission.started_at,
            guard.clock(),  # ended_at
            # unpriced
            (admission.price is None or admission.price is guard._unknown_price)
            if priced is None else not priced,
            saved_nano,
            admission.max_output_tokens,
            call.node,
            call.tags,
            call.tier,
            call.route,
            "model",  # kind
            None,  # tool
            admission.attributes,
            names,  # scopes
            admission.reservation.id,  # record_id
        )

    def emit(self, record: CallRecord) -> None:
        for hook in self.hooks:
            try:
                hook(record)
            except Exception:  # a reporting hook must never break the agent
                logger.exception("agent-guard: record hook %r failed", hook)


def cost_nano(price: ModelPrice | None, usage: Usage,
              during: tuple[float, float] | None = None) -> int:
    """``during``: the call's start and end (off-peak rates apply to a call that ran
    wholly inside an off-peak window)."""
    return 0 if price is None else price.cost_nano(usage, during)


def amounts_of(usage: Usage, cost_nano: int) -> dict[str, int]:
    """The amounts a model call's settle charges: its cost, its tokens, one call."""
    # the Dimension names written out: constant keys build the dict in one step (a
    # third fewer instructions than looking each name up on Dimension)
    return {
        "usd_nano": cost_nano,
        "tokens": usage.input_tokens + usage.output_tokens,  # usage.total_tokens
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "cache_creation_tokens": usage.cache_creation_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "model_calls": 1,
    }
