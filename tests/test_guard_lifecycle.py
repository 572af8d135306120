"""Guard as a context manager, sync and async: it closes what it opened (a ledger it
made from a URL) and leaves a ledger the caller passed in open; FailOpenLedger's close
and aclose do the same thing."""

from __future__ import annotations

import logging

import pytest

from agent_guard import Guard, Limits
from agent_guard.errors import LedgerUnavailable
from agent_guard.ledger import from_url
from agent_guard.ledger.failover import FailOpenLedger

from .test_failover import CAPS, USD, make


def _steps(ledger) -> int:
    return ledger.totals("session:s").get_spent("steps")


def test_closing_a_guard_leaves_a_ledger_the_caller_passed_in_open() -> None:
    ledger = from_url("sqlite:///:memory:")  # closing it would lose every count
    with Guard(Limits(max_steps=5), ledger=ledger) as guard:
        guard.before_step("s", 2)
    guard.close()  # twice is harmless
    assert _steps(ledger) == 2
    with Guard(Limits(max_steps=5), ledger=ledger, fail="open") as guard:
        guard.before_step("s", 1)  # wrapped in a FailOpenLedger of the guard's own
    assert _steps(ledger) == 3
    ledger.close()


async def test_async_with_leaves_a_passed_ledger_open_too() -> None:
    ledger = from_url("sqlite:///:memory:")
    async with Guard(Limits(max_steps=5), ledger=ledger) as guard:
        await guard.abefore_step("s", 2)
    async with Guard(Limits(max_steps=5), ledger=ledger, fail="open") as guard:
        await guard.abefore_step("s", 1)
    assert _steps(ledger) == 3
    await ledger.aclose()


def test_a_guard_closes_the_ledger_it_opened_from_a_url() -> None:
    with Guard(Limits(max_steps=5), ledger="sqlite:///:memory:") as guard:
        guard.before_step("s", 2)
        assert guard.usage("s").steps == 2
    with pytest.raises(LedgerUnavailable):  # its in-memory database went with it
        guard.usage("s")


async def test_async_with_closes_the_ledger_it_opened() -> None:
    async with Guard(Limits(max_steps=5), ledger="sqlite:///:memory:") as guard:
        await guard.abefore_step("s", 2)
    with pytest.raises(LedgerUnavailable):
        await guard.ausage("s")


@pytest.mark.parametrize("how", ["close", "aclose"])
async def test_fail_open_close_and_aclose_agree(how: str, caplog: pytest.LogCaptureFixture
                                                ) -> None:
    """Both reconcile, both report what the backend never took with the same words,
    both close the backend (and only when the wrapper owns it)."""
    ledger, inner, _ = make()
    inner.down = True
    assert ledger.charge(CAPS, {USD: 1}) is None
    with caplog.at_level(logging.ERROR, logger="agent_guard"):
        if how == "close":
            ledger.close()
        else:
            await ledger.aclose()
    assert ("closing with 1 journaled entries not reconciled into switch:// (the backend "
            "did not answer); their spend is lost to the shared ledger") in caplog.text
    db = from_url("sqlite:///:memory:")
    wrapper = FailOpenLedger(db, owns_inner=False)
    assert wrapper.charge(CAPS, {USD: 2}) is None
    if how == "close":
        wrapper.close()
    else:
        await wrapper.aclose()
    assert db.totals("session:s").get_spent(USD) == 2  # not closed: still there
