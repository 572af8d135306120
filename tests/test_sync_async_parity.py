"""Each decision of the guard is written once (agent_guard.engine.drive): the sync and
async methods are drivers of the same steps, so one conversation gives the same
records, threshold events, refusals and totals through either."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent_guard import BudgetExceeded, Guard, Limits, LoopDetected, StepLimitExceeded
from agent_guard.engine.admission import ModelCall
from agent_guard.engine.drive import Op, adrive, drive
from agent_guard.engine.usage import Usage
from agent_guard.errors import LedgerUnavailable

from .conftest import FakeClock
from .test_failover import Switch


class Recorder:
    def __init__(self) -> None:
        self.records: list[tuple[Any, ...]] = []
        self.events: list[str] = []
        self.refusals: list[str] = []


def _guard(ledger: Switch, seen: Recorder) -> Guard:
    return Guard(Limits(max_cost_usd=0.01, max_steps=4, max_repeats=2, thresholds=(0.5,)),
                 ledger=ledger, clock=FakeClock(),
                 on_record=[lambda r: seen.records.append(
                     (r.kind, r.tool, r.outcome, r.cost_nano, r.usage.total_tokens))],
                 on_threshold=[lambda e: seen.events.append(str(e))])


CALL = ModelCall(session="s", model="gpt-4o-mini", input_tokens=1_000,
                 max_output_tokens=500, can_shrink=True)


def conversation_sync(guard: Guard, ledger: Switch, seen: Recorder) -> tuple[Any, ...]:
    for _ in range(3):
        admission = guard.before_model_call(CALL)
        guard.after_model_call(admission, Usage(input_tokens=1_000, output_tokens=400))
    admission = guard.before_model_call(CALL)
    ledger.down = True  # the settle of a finished call finds the ledger away
    guard.after_model_call(admission, Usage(input_tokens=1_000, output_tokens=400))
    kept = guard.pending_settles
    ledger.down = False
    for _ in range(3):
        try:
            guard.before_tool_call("s", "search", {"q": "x"})
        except LoopDetected as exc:
            seen.refusals.append(type(exc).__name__)
    for _ in range(5):
        try:
            guard.before_step("s")
        except StepLimitExceeded as exc:
            seen.refusals.append(type(exc).__name__)
    big = ModelCall(session="s", model="gpt-4o-mini", input_tokens=60_000,
                    max_output_tokens=4_000, can_shrink=True)
    try:
        guard.before_model_call(big)
    except BudgetExceeded as exc:
        seen.refusals.append(type(exc).__name__)
    usage = guard.usage("s")
    guard.close()
    return kept, guard.pending_settles, usage


async def conversation_async(guard: Guard, ledger: Switch, seen: Recorder
                             ) -> tuple[Any, ...]:
    for _ in range(3):
        admission = await guard.abefore_model_call(CALL)
        await guard.aafter_model_call(admission, Usage(input_tokens=1_000, output_tokens=400))
    admission = await guard.abefore_model_call(CALL)
    ledger.down = True  # the settle of a finished call finds the ledger away
    await guard.aafter_model_call(admission, Usage(input_tokens=1_000, output_tokens=400))
    kept = guard.pending_settles
    ledger.down = False
    for _ in range(3):
        try:
            await guard.abefore_tool_call("s", "search", {"q": "x"})
        except LoopDetected as exc:
            seen.refusals.append(type(exc).__name__)
    for _ in range(5):
        try:
            await guard.abefore_step("s")
        except StepLimitExceeded as exc:
            seen.refusals.append(type(exc).__name__)
    big = ModelCall(session="s", model="gpt-4o-mini", input_tokens=60_000,
                    max_output_tokens=4_000, can_shrink=True)
    try:
        await guard.abefore_model_call(big)
    except BudgetExceeded as exc:
        seen.refusals.append(type(exc).__name__)
    usage = await guard.ausage("s")
    await guard.aclose()
    return kept, guard.pending_settles, usage


def test_one_conversation_is_decided_the_same_through_sync_and_async_methods() -> None:
    sync_ledger, sync_seen = Switch(), Recorder()
    sync = conversation_sync(_guard(sync_ledger, sync_seen), sync_ledger, sync_seen)
    async_ledger, async_seen = Switch(), Recorder()
    asyn = asyncio.run(conversation_async(_guard(async_ledger, async_seen), async_ledger,
                                          async_seen))
    assert sync == asyn
    kept, left, usage = sync
    assert (kept, left) == (1, 0)  # kept while the ledger was away, settled at the end
    assert usage.model_calls == 4 and usage.steps == 4
    assert sync_seen.refusals == async_seen.refusals == [
        "LoopDetected", "StepLimitExceeded", "BudgetExceeded"]
    assert sync_seen.events == async_seen.events and len(sync_seen.events) == 1
    assert sync_seen.records == async_seen.records and len(sync_seen.records) == 4
    assert sync_ledger.store.totals("session:s").spent == \
        async_ledger.store.totals("session:s").spent


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_a_ledger_error_is_raised_where_the_decision_waits_for_it(driver: str) -> None:
    """The drivers throw an operation's exception into the decision at its ``yield``:
    the decision may handle it (a settle kept for later) or let it through."""
    ledger = Switch()
    ledger.down = True

    def decision():
        try:
            yield Op("totals", "session:s")
        except LedgerUnavailable:
            handled = "handled"
        totals = yield Op("totals", "session:t")  # not handled: reaches the caller
        return handled, totals

    with pytest.raises(LedgerUnavailable):
        if driver == "sync":
            drive(ledger, decision())
        else:
            asyncio.run(adrive(ledger, decision()))
    ledger.down = False
    assert ledger.calls == 2  # both operations reached the ledger, one at a time
