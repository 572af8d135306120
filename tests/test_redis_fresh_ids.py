"""A reserve whose id the Redis ledger made itself, on a client that never resends a
script, skips the two reads that answer a resent or reused id (an ``HGET`` of the open
reservations and an ``EXISTS`` of the id's done marker): such an id cannot be in use.
Every other reserve keeps them: an id the caller chose, a client given to the ledger
(it may resend after a timeout), ``retries=N``.

Counted by the server (``INFO commandstats`` counts the commands scripts run too), on a
private ``redis-server`` so nothing else moves the counts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis as redis_py

from agent_guard.ledger import Reservation, ScopeCaps
from agent_guard.ledger.redis import RedisLedger

from .test_redis_faults import RedisServer, require_redis_server

CAPS = [ScopeCaps("session:f", {"usd_nano": 10_000})]


@pytest.fixture(scope="module")
def private_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(require_redis_server(), tmp_path_factory.mktemp("fresh-ids"),
                         persistent=False)
    server.start()
    yield server.url
    server.stop()


def reads_of(url: str, reserve: object) -> tuple[int, int]:
    """(HGET, EXISTS) commands the server ran for one call of ``reserve``."""
    admin = redis_py.Redis.from_url(url)
    admin.config_resetstat()
    reserve()  # type: ignore[operator]
    stats = admin.info("commandstats")
    admin.close()
    return (stats.get("cmdstat_hget", {}).get("calls", 0),
            stats.get("cmdstat_exists", {}).get("calls", 0))


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_fresh_id_skips_the_reused_id_reads(private_url: str, asynchronous: bool) -> None:
    import asyncio

    led = RedisLedger(private_url, namespace=f"fresh-{asynchronous}", settle_delay=59.0)
    try:
        led.reserve(CAPS, {"usd_nano": 1}, lease_seconds=60)  # scripts loaded

        def fresh() -> None:
            if asynchronous:
                res = asyncio.run(led.areserve(CAPS, {"usd_nano": 1}, lease_seconds=60))
            else:
                res = led.reserve(CAPS, {"usd_nano": 1}, lease_seconds=60)
            assert isinstance(res, Reservation)

        def chosen() -> None:
            res = led.reserve(CAPS, {"usd_nano": 1}, lease_seconds=60,
                              reservation_id=f"mine-{time.monotonic_ns()}")
            assert isinstance(res, Reservation)

        assert reads_of(private_url, fresh) == (0, 0)
        assert reads_of(private_url, chosen) == (1, 1)
        # a chosen id used again is still refused
        led.reserve(CAPS, {"usd_nano": 1}, lease_seconds=60, reservation_id="twice")
        with pytest.raises(ValueError, match="already used"):
            led.reserve(CAPS, {"usd_nano": 1}, lease_seconds=60, reservation_id="twice")
        assert led.totals("session:f").get_reserved("usd_nano") == 4  # one each
    finally:
        led.close()


def test_a_client_that_may_resend_checks_every_id(private_url: str) -> None:
    given = RedisLedger(private_url, namespace="fresh-given",
                        client=redis_py.Redis.from_url(private_url))
    retrying = RedisLedger(private_url, namespace="fresh-retries", retries=2)
    try:
        for led in (given, retrying):
            led.reserve(CAPS, {"usd_nano": 1}, lease_seconds=60)
            assert reads_of(private_url, lambda led=led: led.reserve(
                CAPS, {"usd_nano": 1}, lease_seconds=60)) == (1, 1)
    finally:
        given.close()
        retrying.close()


def test_a_fresh_reserve_with_settles_riding_counts_as_before(private_url: str) -> None:
    """The fresh flag sits after the settle arguments: with and without settles riding,
    holds and spend come out the same as a ledger that checks every id."""
    fresh = RedisLedger(private_url, namespace="fresh-a", settle_delay=59.0)
    checked = RedisLedger(private_url, namespace="fresh-b", settle_delay=59.0,
                          client=redis_py.Redis.from_url(private_url))
    try:
        for led in (fresh, checked):
            held = []
            for i in range(6):
                res = led.reserve(CAPS, {"usd_nano": 900 + i}, lease_seconds=60)
                assert isinstance(res, Reservation)
                held.append(res)
                if i % 2:
                    led.settle_later(held.pop(0), {"usd_nano": 100 + i})
            t = led.totals("session:f")
            assert (t.get_spent("usd_nano"), t.get_reserved("usd_nano")) == (
                101 + 103 + 105, 903 + 904 + 905)
    finally:
        fresh.close()
        checked.close()
