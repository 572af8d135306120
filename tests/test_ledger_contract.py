"""The ledger contract, run against every backend (memory, SQLite, real Redis)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from agent_guard.ledger import Denial, Ledger, Reservation, ScopeCaps

from .conftest import FakeClock

USD = "usd_nano"
CALLS = "model_calls"


def session(name: str = "s1", **caps: int) -> ScopeCaps:
    return ScopeCaps(f"session:{name}", caps)


def test_reserve_holds_and_settle_spends(ledger: Ledger) -> None:
    res = ledger.reserve([session(usd_nano=1000)], {USD: 400, CALLS: 1}, lease_seconds=60)
    assert isinstance(res, Reservation)
    t = ledger.totals("session:s1")
    assert (t.get_reserved(USD), t.get_spent(USD)) == (400, 0)
    settled = ledger.settle(res, {USD: 250, CALLS: 1})
    assert settled and settled.spent == {"session:s1": {USD: 250, CALLS: 1}}
    again = ledger.reserve([session(usd_nano=1000)], {USD: 100}, lease_seconds=60)
    assert isinstance(again, Reservation)
    assert ledger.settle(again, {USD: 100}).spent == {"session:s1": {USD: 350}}
    ledger.charge([session()], {USD: 0})  # zero amounts are accepted and change nothing
    ledger.extend("session:s1", USD, 0)
    t = ledger.totals("session:s1")
    assert (t.get_reserved(USD), t.get_spent(USD), t.get_spent(CALLS)) == (0, 350, 1)


def test_settle_twice_counts_once(ledger: Ledger) -> None:
    res = ledger.reserve([session(usd_nano=1000)], {USD: 400}, lease_seconds=60)
    assert isinstance(res, Reservation)
    assert ledger.settle(res, {USD: 300})
    assert not ledger.settle(res, {USD: 300})
    assert ledger.release(res) is False
    assert ledger.totals("session:s1").get_spent(USD) == 300
    assert ledger.totals("session:s1").get_reserved(USD) == 0


def test_denial_changes_nothing_and_explains(ledger: Ledger) -> None:
    ok = ledger.reserve([session(usd_nano=1000)], {USD: 700}, lease_seconds=60)
    assert isinstance(ok, Reservation)
    ledger.settle(ok, {USD: 600})
    denied = ledger.reserve([session(usd_nano=1000)], {USD: 401}, lease_seconds=60)
    assert isinstance(denied, Denial)
    assert not denied
    assert (denied.scope, denied.dimension, denied.cap, denied.spent, denied.reserved,
            denied.requested) == ("session:s1", USD, 1000, 600, 0, 401)
    t = ledger.totals("session:s1")
    assert (t.get_spent(USD), t.get_reserved(USD)) == (600, 0)
    # exactly what is left still fits
    assert isinstance(ledger.reserve([session(usd_nano=1000)], {USD: 400}, lease_seconds=60),
                      Reservation)


def test_multi_scope_reservation_is_atomic(ledger: Ledger) -> None:
    team = ScopeCaps("team:acme", {USD: 500})
    first = ledger.reserve([session("a", usd_nano=10_000), team], {USD: 400}, lease_seconds=60)
    assert isinstance(first, Reservation)
    denied = ledger.reserve([session("b", usd_nano=10_000), team], {USD: 200}, lease_seconds=60)
    assert isinstance(denied, Denial)
    assert denied.scope == "team:acme"
    # the session scope that did fit was not touched
    assert ledger.totals("session:b").get_reserved(USD) == 0
    assert ledger.totals("team:acme").get_reserved(USD) == 400


def test_release_gives_back(ledger: Ledger) -> None:
    res = ledger.reserve([session(usd_nano=100)], {USD: 100}, lease_seconds=60)
    assert isinstance(res, Reservation)
    assert isinstance(ledger.reserve([session(usd_nano=100)], {USD: 1}, lease_seconds=60), Denial)
    assert ledger.release(res) is True
    assert ledger.release(res) is False
    assert not ledger.settle(res, {USD: 100})
    assert ledger.totals("session:s1").get_reserved(USD) == 0
    assert ledger.totals("session:s1").get_spent(USD) == 0


def test_charge_checks_and_spends_atomically(ledger: Ledger) -> None:
    caps = [session(tool_calls=2)]
    assert ledger.charge(caps, {"tool_calls": 1}) is None
    assert ledger.charge(caps, {"tool_calls": 1}) is None
    denied = ledger.charge(caps, {"tool_calls": 1})
    assert isinstance(denied, Denial)
    assert (denied.cap, denied.spent) == (2, 2)
    assert ledger.totals("session:s1").get_spent("tool_calls") == 2


def test_uncapped_and_zero_amounts_are_not_checked(ledger: Ledger) -> None:
    res = ledger.reserve([session(usd_nano=10)], {USD: 10, "tokens": 10**12}, lease_seconds=60)
    assert isinstance(res, Reservation)
    ledger.settle(res, {USD: 15, "tokens": 10**12})  # provider overran: recorded as is
    # a capped dimension already over its cap does not block a call that needs none of it
    assert ledger.charge([session(usd_nano=10)], {"tool_calls": 1}) is None
    assert isinstance(ledger.charge([session(usd_nano=10)], {USD: 1}), Denial)
    assert ledger.totals("session:s1").get_spent("tokens") == 10**12


def test_extend_raises_the_cap(ledger: Ledger) -> None:
    assert ledger.charge([session(usd_nano=100)], {USD: 100}) is None
    assert isinstance(ledger.charge([session(usd_nano=100)], {USD: 50}), Denial)
    ledger.extend("session:s1", USD, 50)
    assert ledger.charge([session(usd_nano=100)], {USD: 50}) is None
    assert ledger.totals("session:s1").get_extra(USD) == 50
    denied = ledger.charge([session(usd_nano=100)], {USD: 1})
    assert isinstance(denied, Denial)
    assert denied.cap == 150


def test_expired_lease_is_reclaimed_and_late_settle_counts_once(make_ledger) -> None:
    clock = FakeClock()
    ledger = make_ledger(clock=clock)
    caps = [session(usd_nano=1000)]
    crashed = ledger.reserve(caps, {USD: 800}, lease_seconds=30)
    assert isinstance(crashed, Reservation)
    assert isinstance(ledger.reserve(caps, {USD: 800}, lease_seconds=30), Denial)
    clock.advance(31)
    assert ledger.reclaim_expired() == 1
    assert ledger.totals("session:s1").get_reserved(USD) == 0
    fresh = ledger.reserve(caps, {USD: 800}, lease_seconds=30)
    assert isinstance(fresh, Reservation)
    # the crashed worker comes back and settles after all: counted once, never twice
    assert ledger.settle(crashed, {USD: 100})
    assert not ledger.settle(crashed, {USD: 100})
    t = ledger.totals("session:s1")
    assert (t.get_spent(USD), t.get_reserved(USD)) == (100, 800)


def test_reserve_reclaims_lazily(make_ledger) -> None:
    clock = FakeClock()
    ledger = make_ledger(clock=clock)
    caps = [session(usd_nano=1000)]
    assert isinstance(ledger.reserve(caps, {USD: 1000}, lease_seconds=5), Reservation)
    clock.advance(6)
    assert isinstance(ledger.reserve(caps, {USD: 1000}, lease_seconds=5), Reservation)


def test_scope_names_do_not_collide(ledger: Ledger) -> None:
    odd = ["session:a", "session:a:b", "session:a}b{", "session:ü\n*?", "session:a%3Ab"]
    for i, name in enumerate(odd):
        assert ledger.charge([ScopeCaps(name, {})], {USD: i + 1}) is None
    for i, name in enumerate(odd):
        assert ledger.totals(name).get_spent(USD) == i + 1


def test_bad_amounts_are_rejected(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        ledger.reserve([session()], {USD: -1}, lease_seconds=60)
    with pytest.raises(TypeError, match="must be an int"):
        ledger.reserve([session()], {USD: 1.5}, lease_seconds=60)  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        ledger.charge([session()], {USD: "3"})  # type: ignore[dict-item]


def test_reservation_ids_are_single_use(ledger: Ledger) -> None:
    res = ledger.reserve([session()], {USD: 1}, lease_seconds=60, reservation_id="fixed-id")
    assert isinstance(res, Reservation)
    assert res.id == "fixed-id"
    with pytest.raises(ValueError, match="already used"):
        ledger.reserve([session()], {USD: 1}, lease_seconds=60, reservation_id="fixed-id")


def test_unknown_scope_totals_are_zero(ledger: Ledger) -> None:
    t = ledger.totals("session:never-seen")
    assert t.get_spent(USD) == t.get_reserved(USD) == t.get_extra(USD) == 0


def test_charge_read_returns_the_spent_totals_after_the_charge(ledger: Ledger) -> None:
    from agent_guard.ledger import Settlement

    caps = [session("cr", steps=5), ScopeCaps("team:t", {})]
    assert ledger.charge(caps, {"steps": 2}) is None
    first = ledger.charge_read(caps, {"steps": 2, "tool_calls": 0})
    assert isinstance(first, Settlement) and first
    assert first.spent["session:cr"]["steps"] == 4 and first.spent["team:t"]["steps"] == 4
    denied = ledger.charge_read(caps, {"steps": 2})
    assert isinstance(denied, Denial) and denied.spent == 4  # nothing spent
    again = asyncio.run(ledger.acharge_read(caps, {"steps": 1}))
    assert isinstance(again, Settlement) and again.spent["session:cr"]["steps"] == 5
    assert ledger.totals("team:t").get_spent("steps") == 5


def test_totals_many_reads_each_scope_in_order(ledger: Ledger) -> None:
    assert ledger.charge([session("a")], {USD: 5}) is None
    res = ledger.reserve([session("b")], {USD: 7}, lease_seconds=60)
    assert isinstance(res, Reservation)
    ledger.extend("session:c", USD, 9)
    names = ["session:c", "session:never", "session:b", "session:a"]
    many = ledger.totals_many(names)
    assert many == [ledger.totals(n) for n in names]
    assert [(t.scope, t.get_spent(USD), t.get_reserved(USD), t.get_extra(USD))
            for t in many] == [("session:c", 0, 0, 9), ("session:never", 0, 0, 0),
                               ("session:b", 0, 7, 0), ("session:a", 5, 0, 0)]
    assert asyncio.run(ledger.atotals_many(names)) == many
    assert ledger.totals_many([]) == []


def test_a_settle_above_its_hold_shrinks_the_room_of_every_later_call(ledger: Ledger) -> None:
    """Spend above the hold counts at once for every caller of the scope (on the cells
    layout the sessions below sit in cells other than the team's and each other's)."""
    team = ScopeCaps("team:over", {USD: 1000})
    first = ledger.reserve([session("o1"), team], {USD: 100}, lease_seconds=60)
    assert isinstance(first, Reservation)
    ledger.settle(first, {USD: 700})  # the provider billed 600 above the worst case
    refused = ledger.reserve([session("o4"), team], {USD: 400}, lease_seconds=60)
    assert isinstance(refused, Denial)
    assert (refused.scope, refused.spent, refused.reserved) == ("team:over", 700, 0)
    assert ledger.reserve([session("o5"), team], {USD: 300}, lease_seconds=60)
    assert isinstance(ledger.charge([team], {USD: 1}), Denial)


def test_a_rolling_window_counts_its_past_buckets_from_every_caller(ledger: Ledger) -> None:
    """A window's past bucket, spent from one session, counts against the current bucket
    for calls from other sessions (on the cells layout: from cells other than the
    team's, through allowances lent against the whole window)."""
    past, now = "team:w@2h:b1", "team:w@2h:b2"
    assert ledger.charge([session("w1"), ScopeCaps(past, {USD: 100})], {USD: 60}) is None
    window = ScopeCaps(now, {USD: 100}, (past,))
    refused = ledger.reserve([session("w4"), window], {USD: 50}, lease_seconds=60)
    assert isinstance(refused, Denial) and refused.scope == now
    fits = ledger.reserve([session("w5"), window], {USD: 40}, lease_seconds=60)
    assert isinstance(fits, Reservation)
    assert isinstance(ledger.charge([session("w6"), window], {USD: 1}), Denial)
    ledger.release(fits)
    assert ledger.charge([session("w6"), window], {USD: 40}) is None
    assert ledger.totals(now).get_spent(USD) == 40


def test_concurrent_reservations_never_overshoot(ledger: Ledger) -> None:
    """64 threads race for a $1.00 cap with $0.07 calls: exactly 14 fit."""
    cap, each = 1_000_000_000, 70_000_000
    caps = [session("race", usd_nano=cap)]
    barrier = threading.Barrier(64)

    def call() -> bool:
        barrier.wait()
        res = ledger.reserve(caps, {USD: each, CALLS: 1}, lease_seconds=60)
        if isinstance(res, Denial):
            return False
        assert ledger.settle(res, {USD: each, CALLS: 1})
        return True

    with ThreadPoolExecutor(64) as pool:
        admitted = sum(pool.map(lambda _: call(), range(64)))
    t = ledger.totals("session:race")
    assert admitted == cap // each == 14
    assert t.get_spent(USD) == admitted * each <= cap
    assert t.get_spent(CALLS) == admitted
    assert t.get_reserved(USD) == 0


async def test_async_twins(ledger: Ledger) -> None:
    caps = [session("async", usd_nano=100)]
    results = await asyncio.gather(
        *[ledger.areserve(caps, {USD: 30}, lease_seconds=60) for _ in range(5)]
    )
    granted = [r for r in results if isinstance(r, Reservation)]
    assert len(granted) == 3
    assert await ledger.asettle(granted[0], {USD: 10})
    assert not await ledger.asettle(granted[0], {USD: 10})
    assert await ledger.arelease(granted[1]) is True
    assert await ledger.acharge(caps, {USD: 200}) is not None
    await ledger.aextend("session:async", USD, 1000)
    assert await ledger.acharge(caps, {USD: 200}) is None
    t = await ledger.atotals("session:async")
    assert (t.get_spent(USD), t.get_reserved(USD)) == (210, 30)


def test_the_hot_path_builds_the_same_reservation_and_settlement() -> None:
    """The memory ledger's reserve and settle build their Reservation and Settlement
    through plain slotted twins (its hot path): what they return is what the class calls
    build, field by field and in every way they are used."""
    import copy
    import pickle
    from dataclasses import FrozenInstanceError, fields, replace

    from agent_guard.ledger.base import Settlement
    from agent_guard.ledger.memory import MemoryLedger

    ledger = MemoryLedger(clock=FakeClock())
    res = ledger.reserve([session("a")], {USD: 5}, lease_seconds=30)
    assert isinstance(res, Reservation)
    settled = ledger.settle_valid(res, {USD: 4})
    pairs = [(res, Reservation(res.id, ("session:a",), {USD: 5}, res.expires_at)),
             (settled, Settlement(True, {"session:a": {USD: 4}}))]
    for made, called in pairs:
        cls = type(called)
        assert type(made) is cls
        assert ([getattr(made, f.name) for f in fields(cls)]
                == [getattr(called, f.name) for f in fields(cls)])
        assert made == called and repr(made) == repr(called) and bool(made) == bool(called)
        assert pickle.loads(pickle.dumps(made)) == called and copy.copy(made) == called
        assert replace(made) == replace(called)
        for f in fields(cls):
            with pytest.raises(FrozenInstanceError):
                setattr(made, f.name, None)
        with pytest.raises(TypeError):  # unhashable (a dict field), as the class call's
            hash(made)


@pytest.mark.parametrize("scopes", [("session:a", "session:b"), ("session:b", "session:c")])
def test_memory_ledger_settle_gives_the_hold_back_where_it_is_held(
        scopes: tuple[str, ...]) -> None:
    """A settle gives the hold back on the scopes the ledger holds it on and spends on
    those of the reservation it is given: in one pass when they are the same (the
    reservation handed out), in two when a copy names other scopes; the same totals."""
    from dataclasses import replace

    from agent_guard.ledger.memory import MemoryLedger

    ledger = MemoryLedger(clock=FakeClock())
    res = ledger.reserve([session("a"), session("b")], {USD: 100, CALLS: 1}, lease_seconds=30)
    assert isinstance(res, Reservation)
    settled = ledger.settle(replace(res, scopes=scopes), {USD: 40})
    assert settled and settled.spent == {name: {USD: 40} for name in scopes}
    for name in ("session:a", "session:b", "session:c"):
        t = ledger.totals(name)
        assert (t.get_spent(USD), t.get_reserved(USD), t.get_reserved(CALLS)) == (
            40 if name in scopes else 0, 0, 0)
    assert not ledger.release(res)


def test_memory_ledger_forgets_finished_ids_after_retention_only() -> None:
    """Finished ids are remembered for DONE_RETENTION_SECONDS (a repeated settle stays a
    no-op) and then dropped from the oldest end, without rescanning the rest."""
    from agent_guard.ledger.base import DONE_RETENTION_SECONDS
    from agent_guard.ledger.memory import MemoryLedger

    clock = FakeClock()
    ledger = MemoryLedger(clock=clock)
    caps = [session()]
    old = []
    for _ in range(5000):
        res = ledger.reserve(caps, {CALLS: 1}, lease_seconds=30)
        assert isinstance(res, Reservation)
        ledger.settle(res, {CALLS: 1})
        old.append(res)
    clock.advance(DONE_RETENTION_SECONDS - 1)
    ledger.reserve(caps, {CALLS: 1}, lease_seconds=30)
    assert len(ledger._done) == 5000  # nothing is old enough yet
    assert not ledger.settle(old[0], {CALLS: 1})  # still a no-op
    clock.advance(2)
    recent = ledger.reserve(caps, {CALLS: 1}, lease_seconds=30)
    assert isinstance(recent, Reservation)
    ledger.settle(recent, {CALLS: 1})
    ledger.reserve(caps, {CALLS: 1}, lease_seconds=30)
    assert list(ledger._done) == [recent.id]
    assert ledger.totals("session:s1").get_spent(CALLS) == 5001


def test_reservation_ids_are_unique_across_blocks_and_threads() -> None:
    """Ids come in blocks of 256 handed out by one iterator: across block ends and from
    many threads at once, none repeats and each is 32 hex digits."""
    from agent_guard.ledger.base import new_reservation_id

    def draw(n: int) -> list[str]:
        return [new_reservation_id() for _ in range(n)]

    with ThreadPoolExecutor(8) as pool:
        ids = [rid for batch in pool.map(draw, [700] * 8) for rid in batch]
    assert len(set(ids)) == len(ids)
    assert all(len(rid) == 32 and int(rid, 16) >= 0 for rid in ids)
