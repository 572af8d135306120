"""Memory bound: idle scopes are evicted (memory://) or expire (Redis scope TTL).

The trade-off these tests pin down: an evicted session's budget starts again from
zero; a scope with an open reservation is never evicted by the memory ledger.
"""

from __future__ import annotations

import uuid

import pytest

from agent_guard.ledger import MemoryLedger, Reservation, ScopeCaps, from_url

from .conftest import FakeClock

USD = "usd_nano"


def caps(session: str, cap: int = 1000) -> list[ScopeCaps]:
    return [ScopeCaps(f"session:{session}", {USD: cap})]


def test_without_a_policy_every_scope_is_kept() -> None:
    clock = FakeClock(1_000.0)
    ledger = MemoryLedger(clock=clock)
    for i in range(50):
        assert ledger.charge(caps(str(i)), {USD: 1}) is None
    clock.advance(10**8)
    ledger.reclaim_expired()
    assert ledger.scope_count == 50 and ledger.evicted == 0


def test_idle_scopes_are_evicted_and_their_budget_resets() -> None:
    clock = FakeClock(1_000.0)
    ledger = MemoryLedger(clock=clock, max_idle_seconds=60)
    assert ledger.charge(caps("old"), {USD: 900}) is None
    clock.advance(30)
    assert ledger.charge(caps("recent"), {USD: 5}) is None
    clock.advance(31)  # "old" idle 61 s, "recent" 31 s
    ledger.reclaim_expired()
    assert ledger.scope_count == 1 and ledger.evicted == 1
    assert ledger.totals("session:old").get_spent(USD) == 0  # the documented trade-off
    assert ledger.totals("session:recent").get_spent(USD) == 5
    assert ledger.charge(caps("old"), {USD: 900}) is None  # a fresh budget


def test_a_scope_with_an_open_reservation_is_never_evicted() -> None:
    clock = FakeClock(1_000.0)
    ledger = MemoryLedger(clock=clock, max_idle_seconds=60, max_scopes=1)
    held = ledger.reserve(caps("busy"), {USD: 800}, lease_seconds=3600)
    assert isinstance(held, Reservation)
    clock.advance(600)
    assert ledger.charge(caps("other"), {USD: 1}) is None
    assert ledger.scope_count == 2  # over max_scopes, but "busy" holds a reservation
    assert ledger.totals("session:busy").get_reserved(USD) == 800
    assert ledger.settle(held, {USD: 700})
    clock.advance(1)
    ledger.reclaim_expired()
    assert ledger.scope_count == 1  # the least recently used one went
    assert ledger.totals("session:busy").get_spent(USD) == 700
    assert ledger.totals("session:other").get_spent(USD) == 0


def test_max_scopes_keeps_the_most_recently_used() -> None:
    clock = FakeClock(1_000.0)
    ledger = MemoryLedger(clock=clock, max_scopes=100)
    for i in range(1000):
        assert ledger.charge(caps(str(i)), {USD: 1}) is None
        clock.advance(0.001)
    assert ledger.scope_count <= 101
    assert ledger.totals("session:999").get_spent(USD) == 1
    assert ledger.totals("session:0").get_spent(USD) == 0
    assert ledger.evicted >= 899


def test_an_expired_lease_lets_its_scope_be_evicted() -> None:
    clock = FakeClock(1_000.0)
    ledger = MemoryLedger(clock=clock, max_idle_seconds=60)
    crashed = ledger.reserve(caps("crash"), {USD: 100}, lease_seconds=30)
    assert isinstance(crashed, Reservation)
    clock.advance(100)
    assert ledger.reclaim_expired() == 1
    clock.advance(10)  # the reclaim ran before the sweep's next turn
    ledger.reclaim_expired()
    assert ledger.scope_count == 0


def test_finished_ids_are_bounded() -> None:
    clock = FakeClock(1_000.0)
    ledger = MemoryLedger(clock=clock, max_scopes=10)  # at most 16 * 10, floor 4096
    for i in range(6000):
        res = ledger.reserve(caps(str(i % 10)), {USD: 0}, lease_seconds=60,
                             reservation_id=f"r{i}")
        assert isinstance(res, Reservation)
        assert ledger.settle(res, {USD: 0})
    assert len(ledger._done) <= 4096 + 1
    # a recent id is still remembered: settling it again is still a no-op
    assert not ledger.settle(Reservation("r5999", ("session:9",), {}, 0.0), {USD: 1})


def test_the_policy_comes_from_the_url() -> None:
    ledger = from_url("memory://?max_idle_seconds=3600&max_scopes=5000")
    assert isinstance(ledger, MemoryLedger)
    assert (ledger.max_idle_seconds, ledger.max_scopes) == (3600.0, 5000)
    with pytest.raises(ValueError, match="unknown memory:// option 'bogus'"):
        from_url("memory://?bogus=1")
    with pytest.raises(ValueError, match="max_idle_seconds must be > 0"):
        MemoryLedger(max_idle_seconds=0)


# -- Redis: scope hashes get an expiry -----------------------------------------------------


@pytest.fixture
def ttl_ledger(redis_url: str, redis_namespace: str):
    from agent_guard.ledger.redis import RedisLedger

    ledger = RedisLedger.from_url(redis_url + "?scope_ttl_seconds=3600",
                                  namespace=redis_namespace)
    yield ledger
    ledger.close()


def test_redis_scope_ttl_is_set_and_refreshed_on_every_write(ttl_ledger) -> None:
    assert ttl_ledger.scope_ttl_seconds == 3600
    key = ttl_ledger.scope_key("session:t")
    client = ttl_ledger.client
    res = ttl_ledger.reserve(caps("t"), {USD: 100}, lease_seconds=60)
    assert isinstance(res, Reservation)
    assert 3590 <= client.ttl(key) <= 3600
    for step in (lambda: ttl_ledger.settle(res, {USD: 40}),
                 lambda: ttl_ledger.charge(caps("t"), {USD: 1}),
                 lambda: ttl_ledger.extend("session:t", USD, 10)):
        client.expire(key, 100)
        step()
        assert client.ttl(key) > 100
    done = ttl_ledger._done_key(res.id)
    assert 0 < client.ttl(done) <= 3600  # finished ids kept min(ttl, 7 days)
    t = ttl_ledger.totals("session:t")
    assert (t.get_spent(USD), t.get_reserved(USD), t.get_extra(USD)) == (41, 0, 10)


def test_redis_a_hold_on_an_expired_scope_is_dropped_not_negative(ttl_ledger) -> None:
    key = ttl_ledger.scope_key("session:gone")
    res = ttl_ledger.reserve(caps("gone"), {USD: 300}, lease_seconds=60)
    other = ttl_ledger.reserve(caps("gone"), {USD: 200}, lease_seconds=60)
    assert isinstance(res, Reservation) and isinstance(other, Reservation)
    ttl_ledger.client.delete(key)  # what an expiry does
    assert ttl_ledger.release(other)
    assert ttl_ledger.client.exists(key) == 0  # no key recreated without an expiry
    assert ttl_ledger.settle(res, {USD: 50})  # spend after expiry: a fresh budget
    t = ttl_ledger.totals("session:gone")
    assert (t.get_spent(USD), t.get_reserved(USD)) == (50, 0)
    assert ttl_ledger.client.ttl(key) > 0


def test_redis_without_a_policy_scopes_do_not_expire(redis_url: str,
                                                     redis_namespace: str) -> None:
    from agent_guard.ledger.redis import RedisLedger

    ledger = RedisLedger(redis_url, namespace=redis_namespace)
    try:
        assert ledger.charge(caps("forever"), {USD: 1}) is None
        assert ledger.client.ttl(ledger.scope_key("session:forever")) == -1
        with pytest.raises(ValueError, match="scope_ttl_seconds must be an int >= 1"):
            RedisLedger(redis_url, namespace=uuid.uuid4().hex, scope_ttl_seconds=0)
    finally:
        ledger.close()
