"""``Ledger.renew``: a running call keeps its hold past its first lease (every backend)."""

from __future__ import annotations

import asyncio

import pytest

from agent_guard.ledger import Denial, Reservation, ScopeCaps
from agent_guard.ledger.failover import FailOpenLedger

from .test_ledger_contract import FakeClock

USD = "usd_nano"
CAPS = [ScopeCaps("session:s1", {USD: 1000})]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_renewed_hold_outlives_its_first_lease(make_ledger, mode: str) -> None:
    clock = FakeClock()
    ledger = make_ledger(clock=clock)
    held = ledger.reserve(CAPS, {USD: 800}, lease_seconds=30)
    assert isinstance(held, Reservation)

    def renew(res: Reservation) -> Reservation | None:
        if mode == "sync":
            return ledger.renew(res, 30)
        return asyncio.run(ledger.arenew(res, 30))

    for _ in range(3):  # 3 x 20 s: twice past the first lease
        clock.advance(20)
        renewed = renew(held)
        assert renewed is not None and renewed.expires_at == pytest.approx(clock() + 30)
        assert isinstance(ledger.reserve(CAPS, {USD: 800}, lease_seconds=30), Denial)
    assert ledger.reclaim_expired() == 0
    assert ledger.totals("session:s1").get_reserved(USD) == 800
    assert ledger.settle(held, {USD: 300})
    assert renew(held) is None  # finished: nothing is held again
    t = ledger.totals("session:s1")
    assert (t.get_spent(USD), t.get_reserved(USD)) == (300, 0)


def test_an_expired_or_released_hold_is_not_revived(make_ledger) -> None:
    clock = FakeClock()
    ledger = make_ledger(clock=clock)
    late = ledger.reserve(CAPS, {USD: 500}, lease_seconds=10)
    released = ledger.reserve(CAPS, {USD: 500}, lease_seconds=10)
    assert isinstance(late, Reservation) and isinstance(released, Reservation)
    assert ledger.release(released)
    assert ledger.renew(released, 10) is None
    clock.advance(11)
    assert ledger.renew(late, 10) is None  # its lease is over (reclaimed or about to be)
    ledger.reclaim_expired()
    assert ledger.totals("session:s1").get_reserved(USD) == 0


def test_fail_open_ledger_renews_on_its_backend(make_ledger) -> None:
    clock = FakeClock()
    ledger = FailOpenLedger(make_ledger(clock=clock))
    held = ledger.reserve(CAPS, {USD: 800}, lease_seconds=30)
    assert isinstance(held, Reservation)
    clock.advance(20)
    assert ledger.renew(held, 30) is not None
    clock.advance(20)
    assert isinstance(ledger.reserve(CAPS, {USD: 800}, lease_seconds=30), Denial)
