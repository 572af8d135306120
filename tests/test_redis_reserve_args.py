"""A reserve's arguments that depend on its scopes alone are kept for the last scopes
tuple (``RedisLedger._scoped``): every reserve still reaches the scopes, caps and past
buckets it names, whether the same tuple comes again, another one does, or a list
changes between calls."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from agent_guard.ledger import Denial, Reservation, ScopeCaps
from agent_guard.ledger.redis import RedisLedger


@pytest.fixture
def ledger(redis_url: str, redis_namespace: str) -> Iterator[RedisLedger]:
    led = RedisLedger(redis_url, namespace=redis_namespace, settle_delay=0)
    yield led
    led.close()


def reserve(led: RedisLedger, scopes: object, usd: int) -> Reservation | Denial:
    return led.reserve(scopes, {"usd_nano": usd}, lease_seconds=60)  # type: ignore[arg-type]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_the_same_tuple_again_holds_and_refuses_on_its_own_scopes(ledger: RedisLedger,
                                                                  asynchronous: bool) -> None:
    scopes = (ScopeCaps("session:a", {"usd_nano": 10}), ScopeCaps("team:t", {"usd_nano": 25}))

    def once() -> Reservation | Denial:
        if asynchronous:
            return asyncio.run(ledger.areserve(scopes, {"usd_nano": 5}, lease_seconds=60))
        return reserve(ledger, scopes, 5)

    for _ in range(2):
        assert isinstance(once(), Reservation)
    denial = once()
    assert isinstance(denial, Denial) and denial.scope == "session:a"
    assert ledger.totals("session:a").get_reserved("usd_nano") == 10
    assert ledger.totals("team:t").get_reserved("usd_nano") == 10


def test_another_tuple_reaches_its_own_scopes_and_past_buckets(ledger: RedisLedger) -> None:
    first = (ScopeCaps("session:a", {"usd_nano": 100}),)
    assert isinstance(reserve(ledger, first, 7), Reservation)
    # the next window period: another tuple, whose past bucket is session:a
    later = (ScopeCaps("session:b", {"usd_nano": 10}, history=("session:a",)),)
    denial = reserve(ledger, later, 5)  # 7 held in the past bucket + 5 > 10
    assert isinstance(denial, Denial) and denial.reserved == 7
    assert isinstance(reserve(ledger, later, 3), Reservation)
    assert ledger.totals("session:b").get_reserved("usd_nano") == 3
    assert isinstance(reserve(ledger, first, 1), Reservation)  # and back again
    assert ledger.totals("session:a").get_reserved("usd_nano") == 8


def test_a_list_changed_between_calls_is_read_again(ledger: RedisLedger) -> None:
    scopes = [ScopeCaps("session:a", {"usd_nano": 100})]
    assert isinstance(reserve(ledger, scopes, 4), Reservation)
    scopes[0] = ScopeCaps("session:c", {"usd_nano": 3})
    denial = reserve(ledger, scopes, 4)
    assert isinstance(denial, Denial) and denial.scope == "session:c" and denial.cap == 3
    scopes[0] = ScopeCaps("session:c", {"usd_nano": 100})
    assert isinstance(reserve(ledger, scopes, 4), Reservation)
    assert ledger.totals("session:a").get_reserved("usd_nano") == 4
    assert ledger.totals("session:c").get_reserved("usd_nano") == 4
