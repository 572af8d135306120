"""Fail policy: Guard(fail="closed" | "open") and the FailOpenLedger decorator.

The backend here is a MemoryLedger behind a switch that raises LedgerUnavailable
while "down" (and can lose a reply after applying an operation, like a timeout), so
every transition is deterministic; tests/test_redis_faults.py does the same against
a real redis-server that is killed, paused and made to answer errors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from agent_guard import Guard, Limits
from agent_guard.engine.admission import ModelCall
from agent_guard.engine.usage import Usage
from agent_guard.errors import LedgerUnavailable
from agent_guard.ledger import Denial, Ledger, MemoryLedger, Reservation, ScopeCaps
from agent_guard.ledger.base import ScopeTotals, Settlement
from agent_guard.ledger.failover import FailOpenLedger

from .conftest import FakeClock

USD = "usd_nano"
CAPS = [ScopeCaps("session:s", {USD: 1000})]


class Switch(Ledger):
    """A MemoryLedger that can be down (raises before doing anything) or lose replies
    (does the operation, then raises, as a timeout after the server acted would)."""

    def __init__(self) -> None:
        self.store = MemoryLedger()
        self.url = "switch://"
        self.down = False
        self.lose_replies = 0  # how many next operations apply and then raise
        self.fail_after = -1  # go down after this many more successful operations
        self.calls = 0

    def _gate(self) -> None:
        self.calls += 1
        if self.fail_after == 0:
            self.down = True
        if self.fail_after > 0:
            self.fail_after -= 1
        if self.down:
            raise LedgerUnavailable(self.url, ConnectionError("down"))

    def _after(self) -> None:
        if self.lose_replies > 0:
            self.lose_replies -= 1
            raise LedgerUnavailable(self.url, TimeoutError("reply lost"))

    def reserve(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int], *,
                lease_seconds: float, reservation_id: str | None = None
                ) -> Reservation | Denial:
        self._gate()
        result = self.store.reserve(scopes, amounts, lease_seconds=lease_seconds,
                                    reservation_id=reservation_id)
        self._after()
        return result

    def settle(self, reservation: Reservation, actual: Mapping[str, int]) -> Settlement:
        self._gate()
        result = self.store.settle(reservation, actual)
        self._after()
        return result

    def release(self, reservation: Reservation) -> bool:
        self._gate()
        result = self.store.release(reservation)
        self._after()
        return result

    def charge(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
               ) -> Denial | None:
        self._gate()
        result = self.store.charge(scopes, amounts)
        self._after()
        return result

    def extend(self, scope: str, dimension: str, amount: int) -> None:
        self._gate()
        self.store.extend(scope, dimension, amount)

    def totals(self, scope: str) -> ScopeTotals:
        self._gate()
        return self.store.totals(scope)

    def reclaim_expired(self) -> int:
        self._gate()
        return self.store.reclaim_expired()


def make(retry: float = 5.0, **options: Any) -> tuple[FailOpenLedger, Switch, FakeClock]:
    inner, clock = Switch(), FakeClock(0.0)
    return FailOpenLedger(inner, retry_interval=retry, clock=clock, **options), inner, clock


def spent(ledger: Ledger, dim: str = USD) -> int:
    return ledger.totals("session:s").get_spent(dim)


# -- Guard wiring ---------------------------------------------------------------------------


def test_fail_closed_is_the_default_and_says_what_to_do() -> None:
    inner = Switch()
    inner.down = True
    guard = Guard(Limits(max_cost_usd=1), ledger=inner)
    assert guard.ledger is inner
    with pytest.raises(LedgerUnavailable) as err:
        guard.before_model_call(ModelCall("s", "gpt-4o-mini", input_tokens=10))
    message = str(err.value)
    assert "switch://" in message and "down" in message
    assert "refused" in message and "fail='open'" in message


def test_fail_must_be_closed_or_open() -> None:
    with pytest.raises(ValueError, match="fail must be"):
        Guard(fail="maybe")  # type: ignore[arg-type]


def test_fail_open_guard_admits_through_an_outage_and_reconciles() -> None:
    guard = Guard(Limits(max_cost_usd=1), ledger=Switch(), fail="open")
    ledger = guard.ledger
    assert isinstance(ledger, FailOpenLedger)
    assert Guard(ledger=ledger, fail="open").ledger is ledger  # never wrapped twice
    inner = ledger.inner
    assert isinstance(inner, Switch)
    call = ModelCall("s", "gpt-4o-mini", input_tokens=100, max_output_tokens=50)
    before = guard.before_model_call(call)
    inner.down = True
    guard.after_model_call(before, Usage(100, 20))  # settle while down: journaled
    during = guard.before_model_call(call)
    guard.after_model_call(during, Usage(100, 30))
    guard.before_tool_call("s", "search")
    assert ledger.is_open and ledger.pending == 3
    inner.down = False
    assert ledger.reconcile() and not ledger.is_open
    usage = guard.usage("s")
    assert usage.cost_nano == 2 * 100 * 150 + 50 * 600  # exact nano-USD, gpt-4o-mini
    assert inner.store.totals("session:s").get_spent("tool_calls") == 1
    assert inner.store.totals("session:s").get_reserved(USD) == 0


# -- the decorator ---------------------------------------------------------------------------


def test_going_open_and_reconciling_are_logged_and_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    ledger, inner, clock = make()
    inner.down = True
    with caplog.at_level(logging.WARNING, logger="agent_guard"):
        res = ledger.reserve(CAPS, {USD: 100}, lease_seconds=60)
        assert isinstance(res, Reservation)
        assert ledger.settle(res, {USD: 60})
        assert ledger.is_open and ledger.pending == 1 and ledger.admitted_open == 1
        inner.down = False
        clock.advance(5)
        assert ledger.charge(CAPS, {USD: 1}) is None  # replays, then goes to the backend
    assert not ledger.is_open and ledger.pending == 0 and ledger.reconciled == 1
    assert spent(inner.store) == 61
    messages = [r.getMessage() for r in caplog.records]
    assert any("failing open" in m for m in messages)
    assert any("answers again" in m and "reconciled" in m for m in messages)
    assert ledger.outages == 1


def test_local_admission_applies_the_caps_to_this_process_s_view() -> None:
    ledger, inner, _ = make()
    first = ledger.reserve(CAPS, {USD: 500}, lease_seconds=60)
    assert isinstance(first, Reservation)
    assert ledger.settle(first, {USD: 700})  # the backend reports spent = 700
    held = ledger.reserve(CAPS, {USD: 200}, lease_seconds=60)  # open on the backend
    assert isinstance(held, Reservation)
    inner.down = True
    # local view: 700 spent (seeded from the last settle) + 200 held (mirrored)
    denied = ledger.reserve(CAPS, {USD: 101}, lease_seconds=60)
    assert isinstance(denied, Denial)
    assert (denied.spent, denied.reserved, denied.cap) == (700, 200, 1000)
    fits = ledger.reserve(CAPS, {USD: 100}, lease_seconds=60)
    assert isinstance(fits, Reservation)
    assert isinstance(ledger.charge(CAPS, {USD: 1}), Denial)
    t = ledger.totals("session:s")  # while open: the local view
    assert (t.get_spent(USD), t.get_reserved(USD)) == (700, 300)


def test_a_backend_reservation_settled_during_the_outage_is_replayed_once() -> None:
    ledger, inner, _ = make()
    res = ledger.reserve(CAPS, {USD: 400}, lease_seconds=60)
    assert isinstance(res, Reservation)
    inner.down = True
    assert ledger.settle(res, {USD: 250})
    assert not ledger.settle(res, {USD: 250})  # a repeated settle is still a no-op
    assert ledger.pending == 1
    assert inner.store.totals("session:s").get_reserved(USD) == 400  # backend: still held
    inner.down = False
    assert ledger.reconcile()
    t = inner.store.totals("session:s")
    assert (t.get_spent(USD), t.get_reserved(USD)) == (250, 0)


def test_a_release_during_the_outage_frees_the_backend_hold() -> None:
    ledger, inner, _ = make()
    res = ledger.reserve(CAPS, {USD: 400}, lease_seconds=60)
    assert isinstance(res, Reservation)
    inner.down = True
    assert ledger.release(res)
    inner.down = False
    assert ledger.reconcile()
    assert inner.store.totals("session:s").get_reserved(USD) == 0
    assert spent(inner.store) == 0


def test_the_backend_is_retried_at_most_once_per_interval() -> None:
    ledger, inner, clock = make(retry=10)
    inner.down = True
    assert ledger.charge(CAPS, {USD: 1}) is None
    attempts = inner.calls
    for _ in range(20):
        assert ledger.charge(CAPS, {USD: 1}) is None
        clock.advance(0.4)
    assert inner.calls == attempts  # 8 s later: still not retried
    clock.advance(2)
    assert ledger.charge(CAPS, {USD: 1}) is None
    assert inner.calls == attempts + 1  # one replay attempt, it failed: still local
    assert ledger.is_open and ledger.pending == 22


def test_an_interrupted_replay_never_counts_an_entry_twice() -> None:
    ledger, inner, clock = make(retry=1)
    inner.down = True
    for i in range(10):
        assert ledger.charge(CAPS, {USD: i + 1}) is None
    assert ledger.pending == 10
    inner.down = False
    inner.fail_after = 4  # the backend dies again after 4 replayed entries
    assert not ledger.reconcile()
    assert ledger.pending == 6 and ledger.reconciled == 4
    inner.down, inner.fail_after = False, -1
    inner.lose_replies = 1  # the next replayed settle is applied but its reply is lost
    clock.advance(1)
    assert not ledger.reconcile()
    assert ledger.pending == 6  # the entry stays journaled ...
    assert ledger.reconcile()
    assert spent(inner.store) == sum(range(1, 11))  # ... and is still counted once
    assert ledger.pending == 0 and ledger.reconciled == 10


def test_a_full_journal_refuses_new_calls_but_keeps_settlements() -> None:
    ledger, inner, _ = make(max_journal=2)
    inner.down = True
    a = ledger.reserve(CAPS, {USD: 10}, lease_seconds=60)
    b = ledger.reserve(CAPS, {USD: 10}, lease_seconds=60)
    assert isinstance(a, Reservation) and isinstance(b, Reservation)
    assert ledger.charge(CAPS, {USD: 1}) is None
    assert ledger.settle(a, {USD: 5})  # journal now full (2)
    with pytest.raises(LedgerUnavailable, match="journal of 2 unreconciled"):
        ledger.reserve(CAPS, {USD: 10}, lease_seconds=60)
    with pytest.raises(LedgerUnavailable, match="raise FailOpenLedger"):
        ledger.charge(CAPS, {USD: 1})
    assert ledger.settle(b, {USD: 7})  # an admitted call is still journaled
    assert ledger.pending == 3
    inner.down = False
    assert ledger.reconcile()
    assert spent(inner.store) == 13


def test_a_reserve_whose_reply_was_lost_does_not_leave_a_hold() -> None:
    ledger, inner, _ = make()
    inner.lose_replies = 1  # the backend holds 100, the client sees a timeout
    res = ledger.reserve(CAPS, {USD: 100}, lease_seconds=60)
    assert isinstance(res, Reservation) and ledger.is_open
    assert inner.store.totals("session:s").get_reserved(USD) == 100
    assert ledger.settle(res, {USD: 40})
    assert ledger.reconcile()  # the settle reuses the id: it drops the backend's hold
    t = inner.store.totals("session:s")
    assert (t.get_spent(USD), t.get_reserved(USD)) == (40, 0)


def test_a_call_admitted_while_open_and_settled_after_recovery_counts_once() -> None:
    ledger, inner, _ = make()
    inner.down = True
    res = ledger.reserve(CAPS, {USD: 100}, lease_seconds=60)
    assert isinstance(res, Reservation)
    inner.down = False
    assert ledger.reconcile() and not ledger.is_open
    assert ledger.settle(res, {USD: 90})  # straight to the backend (an unknown id adds)
    assert not ledger.settle(res, {USD: 90})
    assert spent(inner.store) == 90


def test_extend_is_journaled_and_close_reports_what_is_lost(
        caplog: pytest.LogCaptureFixture) -> None:
    """An extend while the backend is away raises the local cap and is replayed (a
    guard gives back an identical-call count this way); entries still pending at close
    are reported."""
    ledger, inner, clock = make()
    inner.down = True
    ledger.extend("session:s", USD, 10)
    assert ledger.totals("session:s").get_extra(USD) == 10
    assert ledger.charge(CAPS, {USD: 3}) is None
    assert ledger.pending == 2
    inner.down = False
    clock.advance(5)
    assert ledger.reconcile()
    t = inner.totals("session:s")
    assert (t.get_extra(USD), t.get_spent(USD)) == (10, 3)
    inner.down = True
    assert ledger.charge(CAPS, {USD: 1}) is None
    with caplog.at_level(logging.ERROR, logger="agent_guard"):
        ledger.close()
    assert "1 journaled entries not reconciled" in caplog.text


async def test_the_async_path_fails_open_and_reconciles() -> None:
    ledger, inner, clock = make()
    inner.down = True
    reservations = await asyncio.gather(*(
        ledger.areserve(CAPS, {USD: 100}, lease_seconds=60) for _ in range(12)))
    admitted = [r for r in reservations if isinstance(r, Reservation)]
    assert len(admitted) == 10  # the local caps hold in the async path too
    for i, res in enumerate(admitted):
        assert await ledger.asettle(res, {USD: i})
    assert await ledger.acharge(CAPS, {USD: 1}) is None
    # 10 settles + 1 charge, + a release of each of the 2 denied ids: those reserves
    # went to the backend (all 12 started before the first failure), which may have
    # taken their hold before failing
    assert ledger.pending == 13
    inner.down = False
    clock.advance(5)
    t = await ledger.atotals("session:s")  # while open: the local view
    assert t.get_spent(USD) == sum(range(10)) + 1
    assert await ledger.acharge(CAPS, {USD: 1}) is None  # due: replays, then the backend
    assert not ledger.is_open and ledger.pending == 0
    assert spent(inner.store) == sum(range(10)) + 2
    assert inner.store.totals("session:s").get_reserved(USD) == 0
    await ledger.aclose()


def test_open_mode_counts_a_rolling_window_s_past_buckets_and_never_forgets_them() -> None:
    """Review findings: the local view is seeded with a rolling window's past buckets,
    and does not forget a scope's spend while the backend is down."""
    backend = Switch()
    ledger = FailOpenLedger(backend, retry_interval=3600)
    past = ScopeCaps("team:a@24h:T10", {USD: 100})
    res = ledger.reserve([past], {USD: 90}, lease_seconds=60)
    assert isinstance(res, Reservation)
    ledger.settle(res, {USD: 90})  # the backend reports 90 spent in bucket T10
    backend.down = True
    now = ScopeCaps("team:a@24h:T11", {USD: 100}, history=("team:a@24h:T10",))
    assert isinstance(ledger.reserve([now], {USD: 90}, lease_seconds=60), Denial)
    small = ledger.reserve([now], {USD: 10}, lease_seconds=60)
    assert isinstance(small, Reservation)
    ledger.settle(small, {USD: 10})
    assert isinstance(ledger.reserve([now], {USD: 1}, lease_seconds=60), Denial)


def test_counts_charged_before_an_outage_are_not_granted_again() -> None:
    """Steps, tool calls and identical-call counters are charged, not settled: what the
    backend reported for them seeds the local view, so an outage does not hand a
    session that used up its step cap a fresh one (sync and async)."""
    ledger, inner, clock = make()
    steps = [ScopeCaps("session:s", {"steps": 3})]
    for _ in range(2):
        assert ledger.charge(steps, {"steps": 1}) is None
    assert asyncio.run(ledger.acharge(steps, {"steps": 1})) is None
    inner.down = True
    assert isinstance(ledger.charge(steps, {"steps": 1}), Denial)
    assert isinstance(asyncio.run(ledger.acharge(steps, {"steps": 1})), Denial)
    inner.down = False
    clock.advance(5)
    assert ledger.reconcile()
    assert inner.totals("session:s").get_spent("steps") == 3


@pytest.mark.parametrize("path", ["sync", "async"])
def test_a_settle_that_finds_the_ledger_down_is_kept_and_counted_later(path: str) -> None:
    """fail='closed': the model answered (the provider billed it), then the ledger blips
    at settle time. The call returns its record, the spend is kept, and it is settled
    before the next call, after the reservation's lease has run out too."""
    from agent_guard import Guard, Limits
    from agent_guard.engine.admission import ModelCall
    from agent_guard.engine.usage import Usage

    inner = Switch()
    guard = Guard(Limits(max_cost_usd=1, lease_seconds=0.01), inner)
    call = ModelCall(session="s", model="gpt-4o", input_tokens=100, max_output_tokens=50)

    async def arun() -> object:
        admission = await guard.abefore_model_call(call)
        inner.down = True
        record = await guard.aafter_model_call(admission, Usage(100, 50))
        inner.down = False
        await asyncio.sleep(0.05)
        inner.reclaim_expired()  # the hold is given back at lease expiry...
        await guard.abefore_model_call(call)  # ...and the spend settled before this one
        return record

    if path == "sync":
        admission = guard.before_model_call(call)
        inner.down = True
        record = guard.after_model_call(admission, Usage(100, 50))
        assert guard.pending_settles == 1
        with pytest.raises(LedgerUnavailable):  # closed: no new call while it is down
            guard.before_model_call(call)
        inner.down = False
        time.sleep(0.05)
        inner.reclaim_expired()
        guard.before_model_call(call)
    else:
        record = asyncio.run(arun())
    assert record.cost_nano > 0  # type: ignore[attr-defined]
    assert guard.pending_settles == 0
    assert inner.totals("session:s").get_spent("usd_nano") == record.cost_nano  # type: ignore[attr-defined]


def test_calls_admitted_in_an_outage_are_held_on_the_backend_when_it_returns() -> None:
    """A call admitted locally during the outage is still running when the backend
    answers again: its hold is placed there before closing, so the backend does not
    admit another call into the same room; its settle then finishes that hold."""
    ledger, inner, clock = make()
    inner.down = True
    running = ledger.reserve(CAPS, {USD: 800}, lease_seconds=600)
    assert isinstance(running, Reservation)
    inner.down = False
    clock.advance(5)
    assert isinstance(ledger.reserve(CAPS, {USD: 800}, lease_seconds=600), Denial)
    assert not ledger.is_open
    assert inner.totals("session:s").get_reserved(USD) == 800
    assert ledger.settle(running, {USD: 700})
    t = inner.totals("session:s")
    assert (t.get_spent(USD), t.get_reserved(USD)) == (700, 0)
    assert isinstance(ledger.reserve(CAPS, {USD: 300}, lease_seconds=60), Reservation)
