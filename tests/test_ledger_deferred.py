"""Deferred settles on Redis: a guarded call costs one script, and nothing is lost.

The guard hands a finished call's settle to ``RedisLedger.settle_later``; it rides with
the ledger's next reserve or charge script (applied before that script's own work), or
lands by ``flush``/``totals``/``close``, by a background thread after ``settle_delay``,
or at process exit. Until it lands the reservation's hold keeps counting. Tests here
use a ``settle_delay`` no test waits for, so what lands when is decided by the test,
not by timing, except the one that checks the background flush itself.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from typing import Any

import pytest

from agent_guard import Guard, Limits
from agent_guard.engine.admission import ModelCall
from agent_guard.engine.usage import Usage
from agent_guard.ledger import Denial, Reservation, ScopeCaps
from agent_guard.ledger.redis import RedisLedger

CAP = 1_000
LONG = 59.0  # seconds: longer than any test here waits
CALL = ModelCall(session="s", model="gpt-4o-mini", input_tokens=100, max_output_tokens=50)
USAGE = Usage(input_tokens=80, output_tokens=20)


@pytest.fixture(params=["redis", "redis_cluster"])
def url(request: pytest.FixtureRequest) -> str:
    if request.param == "redis_cluster":
        return request.getfixturevalue("redis_cluster_url")
    return request.getfixturevalue("redis_url")


def ledger_of(url: str, ns: str, delay: float = LONG) -> RedisLedger:
    return RedisLedger.from_url(url, namespace=ns, settle_delay=delay)


def scripts_sent(ledger: RedisLedger) -> list[str]:
    """Record which script each round trip of ``ledger`` ran."""
    sent: list[str] = []
    names = {id(getattr(ledger._sync, n)): n for n in ("reserve", "settle", "release",
                                                       "charge", "reclaim", "renew")}
    run = ledger._run

    def counting(script: Any, keys: list[str], args: list[str]) -> Any:
        sent.append(names[id(script)])
        return run(script, keys, args)

    ledger._run = counting  # type: ignore[method-assign]
    return sent


def raw(url: str, ns: str, scope: str) -> tuple[int, int]:
    """(spent, reserved) in USD of ``scope`` as stored, read by another client (no flush)."""
    other = RedisLedger.from_url(url, namespace=ns, settle_delay=0)
    try:
        t = other.totals(scope)
        return t.get_spent("usd_nano"), t.get_reserved("usd_nano")
    finally:
        other.close()


def test_a_guarded_call_is_one_script(url: str, redis_namespace: str) -> None:
    ledger = ledger_of(url, redis_namespace)
    guard = Guard(Limits(max_cost_usd=1), ledger)
    sent = scripts_sent(ledger)
    records = []
    for _ in range(10):
        records.append(guard.after_model_call(guard.before_model_call(CALL), USAGE))
    # the first call settles at once (the guard has not seen the session's spend, so a
    # threshold may be near); every later settle rides with the next reserve
    assert sent == ["reserve", "settle"] + ["reserve"] * 9
    assert guard.pending_settles == 1  # the last one waits
    guard.close()  # ... and lands here
    assert sent == ["reserve", "settle"] + ["reserve"] * 9 + ["settle"]
    spent, reserved = raw(url, redis_namespace, "session:s")
    assert (spent, reserved) == (sum(r.cost_nano for r in records), 0)


def test_a_deferred_settle_holds_until_it_lands(url: str, redis_namespace: str) -> None:
    """Another process sees the worst case held until the settle lands: spend + holds
    never pass the cap, whatever the settle later frees."""
    ledger = ledger_of(url, redis_namespace)
    other = ledger_of(url, redis_namespace)
    caps = [ScopeCaps("session:h", {"usd_nano": CAP})]
    first = ledger.reserve(caps, {"usd_nano": 600}, lease_seconds=60)
    assert isinstance(first, Reservation)
    ledger.settle_later(first, {"usd_nano": 100})
    assert raw(url, redis_namespace, "session:h") == (0, 600)  # still held
    denied = other.reserve(caps, {"usd_nano": 600}, lease_seconds=60)
    assert isinstance(denied, Denial) and (denied.spent, denied.reserved) == (0, 600)
    # the next reserve of the same ledger carries it, before its own admission check
    second = ledger.reserve(caps, {"usd_nano": 600}, lease_seconds=60)
    assert isinstance(second, Reservation)
    assert raw(url, redis_namespace, "session:h") == (100, 600)
    ledger.close()
    other.close()


def test_a_charge_carries_deferred_settles(url: str, redis_namespace: str) -> None:
    ledger = ledger_of(url, redis_namespace)
    sent = scripts_sent(ledger)
    caps = [ScopeCaps("session:c", {"usd_nano": CAP, "tool_calls": 5})]
    res = ledger.reserve(caps, {"usd_nano": 900}, lease_seconds=60)
    assert isinstance(res, Reservation)
    ledger.settle_later(res, {"usd_nano": 300})
    assert ledger.charge(caps, {"tool_calls": 1}) is None
    assert sent == ["reserve", "charge"] and ledger.pending_settles == 0
    assert raw(url, redis_namespace, "session:c") == (300, 0)
    ledger.close()


@pytest.mark.parametrize("refused", [False, True])
@pytest.mark.parametrize("carrier", ["reserve", "charge_read", "areserve", "acharge_read"])
def test_settles_land_alike_whether_the_script_they_ride_with_is_admitted_or_refused(
        url: str, redis_namespace: str, carrier: str, refused: bool) -> None:
    """The script's own reply and those of the settles riding with it come back in one
    reply (a string for an admission, a table for a refusal): both read alike."""
    ledger = ledger_of(url, redis_namespace)
    caps = [ScopeCaps("session:w", {"usd_nano": CAP}),
            ScopeCaps("team:w", {"usd_nano": CAP, "tokens": CAP})]
    res = ledger.reserve(caps, {"usd_nano": 500, "tokens": 10}, lease_seconds=60)
    assert isinstance(res, Reservation)
    landed: list[Any] = []
    ledger.settle_later(res, {"usd_nano": 200, "tokens": 7}, then=landed.append)
    ledger.settle_later(res, {"usd_nano": 1}, then=landed.append)  # settled already
    ask = {"usd_nano": CAP - 199 if refused else 5}
    options = {"lease_seconds": 60} if "reserve" in carrier else {}
    run = getattr(ledger, carrier)
    got = asyncio.run(run(caps, ask, **options)) if carrier[0] == "a" else run(caps, ask,
                                                                                **options)
    assert ledger.pending_settles == 0
    assert landed[0].spent == {"session:w": {"usd_nano": 200, "tokens": 7},
                               "team:w": {"usd_nano": 200, "tokens": 7}}
    assert [bool(s) for s in landed] == [True, False]
    if refused:
        assert got == Denial("session:w", "usd_nano", CAP, 200, 0, CAP - 199)
    elif "reserve" in carrier:
        assert isinstance(got, Reservation) and got.expires_at > time.time()
    else:
        assert got.spent == {"session:w": {"usd_nano": 205}, "team:w": {"usd_nano": 205}}
    ledger.close()


def test_a_batch_sent_twice_counts_once(url: str, redis_namespace: str) -> None:
    """A queued settle keeps its token: a batch resent after an error (its reply lost,
    whether or not it ran) counts once."""
    ledger = ledger_of(url, redis_namespace)
    caps = [ScopeCaps("session:r", {"usd_nano": CAP})]
    res = ledger.reserve(caps, {"usd_nano": 500}, lease_seconds=60)
    assert isinstance(res, Reservation)
    landed: list[Any] = []
    ledger.settle_later(res, {"usd_nano": 200}, then=landed.append)
    items = ledger._take()
    keys, args = ledger._settle_call(items)
    ledger._run(ledger._sync.settle, keys, args)  # ran, but say the reply was lost:
    ledger._landed(items, None)  # back in the queue, as after an error
    assert ledger.pending_settles == 1
    ledger.flush()
    assert ledger.pending_settles == 0
    assert [bool(s) for s in landed] == [True]
    assert landed[0].spent == {"session:r": {"usd_nano": 200}}
    assert raw(url, redis_namespace, "session:r") == (200, 0)
    assert not ledger.settle(res, {"usd_nano": 200})  # another settle: a no-op
    ledger.close()


def test_reads_flush_first_and_only_asked_dimensions_come_back(
        url: str, redis_namespace: str) -> None:
    ledger = ledger_of(url, redis_namespace)
    caps = [ScopeCaps("session:a", {"usd_nano": CAP}), ScopeCaps("team:a", {"tokens": CAP})]
    res = ledger.reserve(caps, {"usd_nano": 500, "tokens": 50}, lease_seconds=60)
    assert isinstance(res, Reservation)
    landed: list[Any] = []
    ledger.settle_later(res, {"usd_nano": 200, "tokens": 40, "input_tokens": 30},
                        reads={"session:a": ["usd_nano"], "team:a": ["tokens"]},
                        then=landed.append)
    assert ledger.totals("session:a").get_spent("usd_nano") == 200  # totals flushed
    assert landed[0].spent == {"session:a": {"usd_nano": 200}, "team:a": {"tokens": 40}}
    assert ledger.totals("team:a").get_spent("input_tokens") == 30  # written, not read
    ledger.close()


def test_the_background_flush_lands_a_settle_nothing_carries(
        url: str, redis_namespace: str) -> None:
    ledger = ledger_of(url, redis_namespace, delay=0.01)
    caps = [ScopeCaps("session:t", {"usd_nano": CAP})]
    res = ledger.reserve(caps, {"usd_nano": 500}, lease_seconds=60)
    assert isinstance(res, Reservation)
    ledger.settle_later(res, {"usd_nano": 70})
    deadline = time.monotonic() + 30  # a bound on a loaded machine, not a timing claim
    # the totals show the settle as soon as the script ran; the ledger counts it as landed
    # once the reply is back, a moment later: wait for both
    while (raw(url, redis_namespace, "session:t") != (70, 0)
           or ledger.pending_settles != 0):
        assert time.monotonic() < deadline, "the background flush never landed it"
        time.sleep(0.01)
    assert raw(url, redis_namespace, "session:t") == (70, 0)
    ledger.close()


def test_async_calls_carry_settles_too(url: str, redis_namespace: str) -> None:
    ledger = ledger_of(url, redis_namespace)
    guard = Guard(Limits(max_cost_usd=1), ledger)
    sent: list[str] = []
    arun = ledger._arun

    async def counting(script: Any, keys: list[str], args: list[str]) -> Any:
        sent.append("script")
        return await arun(script, keys, args)

    ledger._arun = counting  # type: ignore[method-assign]

    async def run() -> int:
        total = 0
        for _ in range(5):
            admission = await guard.abefore_model_call(CALL)
            total += (await guard.aafter_model_call(admission, USAGE)).cost_nano
        assert len(sent) == 6 and guard.pending_settles == 1  # the first settled at once
        await guard.aclose()
        assert len(sent) == 7
        return total

    total = asyncio.run(run())
    assert raw(url, redis_namespace, "session:s") == (total, 0)


def test_a_threshold_fires_at_the_call_that_crosses_it(
        url: str, redis_namespace: str) -> None:
    """Near a threshold the guard settles at once (as without deferral), so the event
    fires when the crossing call ends, not one call later."""
    events: list[Any] = []
    limits = Limits(max_cost_usd="0.0001", thresholds=(0.5,))
    guard = Guard(limits, ledger_of(url, redis_namespace), on_threshold=[events.append])
    call = ModelCall(session="s", model="gpt-4o-mini", input_tokens=10,
                     max_output_tokens=10)
    fired_at = None
    for i in range(200):
        guard.after_model_call(guard.before_model_call(call), Usage(10, 10))
        if events:
            fired_at = i
            break
    assert fired_at is not None
    spent = raw(url, redis_namespace, "session:s")[0]
    assert spent >= 100_000 * 0.5  # the call that fired it had crossed it ...
    each = spent // (fired_at + 1)
    assert spent - each < 100_000 * 0.5  # ... and the call before had not
    guard.close()


def _exit_with_a_queued_settle(url: str, ns: str) -> None:
    ledger = ledger_of(url, ns)
    res = ledger.reserve([ScopeCaps("session:x", {"usd_nano": CAP})], {"usd_nano": 500},
                         lease_seconds=60)
    assert isinstance(res, Reservation)
    ledger.settle_later(res, {"usd_nano": 123})
    assert ledger.pending_settles == 1  # and the process ends without close()


def test_a_process_that_exits_lands_its_queued_settles(redis_url: str,
                                                       redis_namespace: str) -> None:
    for method in ("fork", "spawn"):
        ns = f"{redis_namespace}-{method}"
        proc = multiprocessing.get_context(method).Process(
            target=_exit_with_a_queued_settle, args=(redis_url, ns))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
        assert raw(redis_url, ns, "session:x") == (123, 0), method


def test_settle_delay_zero_settles_at_once(redis_url: str, redis_namespace: str) -> None:
    ledger = RedisLedger.from_url(f"{redis_url}?settle_delay=0", namespace=redis_namespace)
    assert not ledger.defers_settles
    guard = Guard(Limits(max_cost_usd=1), ledger)
    sent = scripts_sent(ledger)
    guard.after_model_call(guard.before_model_call(CALL), USAGE)
    assert sent == ["reserve", "settle"] and guard.pending_settles == 0
    guard.close()
    with pytest.raises(ValueError, match="settle_delay"):
        RedisLedger(redis_url, settle_delay=-1)


def test_a_kept_connection_the_server_closed_is_replaced(redis_url: str,
                                                         redis_namespace: str) -> None:
    """The ledger keeps its connection between scripts: one the server dropped
    meanwhile (restart, idle ``timeout``, ``CLIENT KILL``) is reopened, not an error."""
    import redis as redis_py

    name = f"ag-{redis_namespace}"
    ledger = RedisLedger(redis_url, namespace=redis_namespace, client_name=name)
    caps = [ScopeCaps("session:k", {"usd_nano": CAP})]
    admin = redis_py.Redis.from_url(redis_url)
    for _ in range(3):
        res = ledger.reserve(caps, {"usd_nano": 1}, lease_seconds=60)
        assert isinstance(res, Reservation)
        mine = [c for c in admin.client_list() if c.get("name") == name]
        assert len(mine) == 1
        admin.client_kill_filter(_id=mine[0]["id"])
        assert ledger.settle(res, {"usd_nano": 1})
    assert ledger.totals("session:k").get_spent("usd_nano") == 3
    ledger.close()
    admin.close()
