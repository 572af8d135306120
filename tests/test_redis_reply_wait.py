"""How the sync Redis ledger waits for a script's reply: it polls for up to
``reply_spin_us`` before it blocks, and backs off when replies take longer than that.

Spinning changes when the client reads a reply, never what it reads: the same calls
give the same answers and the same totals with and without it, including a reply that
arrives long after the spin gave up (a server busy with another client's command).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from agent_guard.ledger import Denial, Reservation, ScopeCaps
from agent_guard.ledger import redis as redis_ledger
from agent_guard.ledger.redis import RedisLedger
from agent_guard.stores import open_store

from .test_redis_faults import RedisServer, require_redis_server, sleep_server

CAPS = [ScopeCaps("session:w", {"usd_nano": 1_000, "model_calls": 5})]


def ledger(url: str, ns: str, spin: float | None) -> RedisLedger:
    return RedisLedger(url, namespace=ns, settle_delay=59.0, reply_spin_us=spin)


def count_spins(led: RedisLedger) -> list[str]:
    """The name of the thread of each spin ``led``'s wire makes from now on."""
    wire = led._wire
    assert wire is not None
    spins: list[str] = []
    spin = wire._spin

    def counted(conn: object) -> None:
        spins.append(threading.current_thread().name)
        spin(conn)

    wire._spin = counted  # type: ignore[method-assign]
    return spins


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private server that ``sleep_server`` can block (``DEBUG SLEEP``): every command
    sent meanwhile waits, as behind another client's long script."""
    server = RedisServer(require_redis_server(), tmp_path_factory.mktemp("reply-wait"),
                         persistent=False)
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("bad", [-1, True, "200", 100_001, float("nan")])
def test_reply_spin_us_must_be_a_number_of_microseconds(redis_url: str, bad: object) -> None:
    with pytest.raises(ValueError, match="reply_spin_us"):
        RedisLedger(redis_url, reply_spin_us=bad)  # type: ignore[arg-type]


def test_reply_spin_us_comes_from_the_url(redis_url: str, redis_namespace: str) -> None:
    off = open_store(f"{redis_url}?reply_spin_us=0&namespace={redis_namespace}", "ledger")
    on = open_store(f"{redis_url}?reply_spin_us=350&namespace={redis_namespace}", "ledger")
    try:
        assert isinstance(off, RedisLedger) and isinstance(on, RedisLedger)
        assert off._wire is not None and off._wire.spin_ns == 0
        assert on._wire is not None and on._wire.spin_ns == 350_000
    finally:
        off.close()
        on.close()
    with pytest.raises(ValueError, match="reply_spin_us"):
        open_store(f"{redis_url}?reply_spin_us=soon", "ledger")


def test_one_cpu_spins_by_default_never(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_ledger.os, "sched_getaffinity", lambda _pid: {0}, raising=False)
    assert redis_ledger.default_reply_spin_us() == 0.0
    monkeypatch.setattr(redis_ledger.os, "sched_getaffinity", lambda _pid: {0, 1},
                        raising=False)
    assert redis_ledger.default_reply_spin_us() == (
        redis_ledger.REPLY_SPIN_US if redis_ledger._CAN_POLL else 0.0)


def _run(led: RedisLedger) -> list[object]:
    """A fixed sequence of admitted and refused reserves, deferred settles that ride
    along, and a read: what each step answered. The last item also checks the totals
    against the settles sent."""
    out: list[object] = []
    held: list[Reservation] = []
    settled = 0

    def settle(res: Reservation, usd: int) -> None:
        nonlocal settled
        settled += usd
        led.settle_later(res, {"usd_nano": usd, "model_calls": 1})

    for i in range(12):
        res = led.reserve(CAPS, {"usd_nano": 150, "model_calls": 1}, lease_seconds=60)
        if isinstance(res, Denial):
            out.append(("denied", res.scope, res.dimension, res.spent, res.reserved))
            if held:
                settle(held.pop(0), 100 + i)
            continue
        out.append(("held", sorted(res.amounts.items())))
        held.append(res)
        if i % 3:
            settle(held.pop(0), 90 + i)
    for res in held:
        settle(res, 7)
    t = led.totals("session:w")
    out.append((t.get_spent("usd_nano"), t.get_reserved("usd_nano"),
                t.get_spent("model_calls")))
    assert out[-1] == (settled, 0, 5)  # the model_calls cap (5) admits five
    return out


def test_spinning_or_blocking_the_answers_are_the_same(redis_url: str,
                                                      redis_namespace: str) -> None:
    blocking = ledger(redis_url, redis_namespace + "-b", 0)
    spinning = ledger(redis_url, redis_namespace + "-s", 100_000)  # 0.1 s: no reply misses it
    try:
        assert blocking._wire is not None and spinning._wire is not None
        spins = count_spins(spinning)
        expected = _run(blocking)
        assert _run(spinning) == expected
        assert any(step[0] == "denied" for step in expected[:-1])
        assert len(spins) >= 12  # every reserve polled for its reply
    finally:
        blocking.close()
        spinning.close()


def test_a_reply_slower_than_the_spin_is_read_and_the_spin_backs_off(
        busy_server: RedisServer, redis_namespace: str) -> None:
    led = ledger(busy_server.url, redis_namespace, 100)
    wire = led._wire
    assert wire is not None
    try:
        assert isinstance(led.reserve(CAPS, {"model_calls": 1}, lease_seconds=60),
                          Reservation)
        wire.skip = wire.backoff = 0  # a cold first call may outlast a 100 us spin
        busy = sleep_server(busy_server, 0.3)  # returns once the server sleeps
        started = time.monotonic()
        res = led.reserve(CAPS, {"model_calls": 1}, lease_seconds=60)
        waited = time.monotonic() - started
        busy.join()
        assert isinstance(res, Reservation)  # the spin gave up; the blocking read got it
        assert waited > 0.1
        assert (wire.skip, wire.backoff) == (2, 2)
        for left in (1, 0):  # the next 2 replies: no spin
            assert isinstance(led.reserve(CAPS, {"model_calls": 0, "usd_nano": 1},
                                          lease_seconds=60), Reservation)
            assert wire.skip == left
        # a spin that finds its reply (generous budget) resets the back-off
        wire.spin_ns = 1_000_000_000
        led.reserve(CAPS, {"usd_nano": 1}, lease_seconds=60)
        assert (wire.skip, wire.backoff) == (0, 0)
        assert led.totals("session:w").get_reserved("model_calls") == 2
    finally:
        led.close()


def test_spins_in_vain_back_off_longer_and_longer(busy_server: RedisServer,
                                                  redis_namespace: str) -> None:
    led = ledger(busy_server.url, redis_namespace, 100)
    wire = led._wire
    assert wire is not None
    try:
        led.reserve(CAPS, {"usd_nano": 1}, lease_seconds=60)  # connected, script loaded
        wire.backoff = 0  # a cold first call may outlast a 100 us spin
        seen = []
        for _ in range(11):
            wire.skip = 0  # spin at the next reply
            busy = sleep_server(busy_server, 0.15)  # asleep for 0.05 s more
            led.reserve(CAPS, {"usd_nano": 1}, lease_seconds=60)
            busy.join()
            seen.append(wire.backoff)
        assert seen == [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1024]
    finally:
        led.close()


def test_no_spin_while_another_thread_of_the_ledger_waits_for_a_reply(
        busy_server: RedisServer, redis_namespace: str) -> None:
    """Threads sharing a ledger: a thread that would spin while another one waits for
    its reply takes a core (and the GIL, between polls) the other needs when its reply
    comes; with 32 threads on two cores, spinning cost about a third of the pairs per
    second. So a call spins only while no other call of the ledger is on the wire."""
    led = ledger(busy_server.url, redis_namespace, 100)
    wire = led._wire
    assert wire is not None
    spins = count_spins(led)
    try:
        led.reserve(CAPS, {"usd_nano": 1}, lease_seconds=60)  # connected, script loaded
        assert spins == [threading.current_thread().name]
        spins.clear()
        wire.skip = wire.backoff = 0  # (a cold first call may outlast a 100 us spin)
        wire.idle.append(wire.pool.get_connection())  # a second one, connected: a
        # connection made while the server is busy would wait in its handshake
        busy = sleep_server(busy_server, 0.3)  # returns once the server sleeps
        wire.skip = 1  # the other thread's call waits blocking (no spin)
        other = threading.Thread(
            target=led.reserve, args=(CAPS, {"usd_nano": 1}), kwargs={"lease_seconds": 60},
            name="other")
        other.start()
        time.sleep(0.05)  # it is waiting for its reply
        assert wire.skip == 0
        assert isinstance(led.reserve(CAPS, {"usd_nano": 1}, lease_seconds=60), Reservation)
        other.join()
        busy.join()
        assert spins == []  # neither spun: this one because the other waited
        assert (wire.skip, wire.backoff) == (0, 0)
        assert isinstance(led.reserve(CAPS, {"usd_nano": 1}, lease_seconds=60), Reservation)
        assert spins == [threading.current_thread().name]  # alone again: it spins
        assert led.totals("session:w").get_reserved("usd_nano") == 4
    finally:
        led.close()


class _RacedSkip(int):
    """A ``skip`` of 1 that two threads both read as non-zero before either one takes
    one off (as can happen between two bytecodes): the second takes it below zero."""

    def __new__(cls, value: int, barrier: threading.Barrier) -> _RacedSkip:
        made = super().__new__(cls, value)
        made.barrier = barrier  # type: ignore[attr-defined]
        return made

    def __bool__(self) -> bool:
        if self.barrier.wait() == 0:  # type: ignore[attr-defined]
            time.sleep(0.05)  # the other thread stores its 0 first
        return int(self) != 0

    def __gt__(self, other: object) -> bool:
        return bool(self) and int(self) > other  # type: ignore[operator]


def test_a_raced_back_off_count_does_not_stop_spinning_for_good(
        redis_url: str, redis_namespace: str) -> None:
    """``skip`` is counted down without a lock; two threads that both see the last one
    left must not take it below zero, where a spin would never come again."""
    led = ledger(redis_url, redis_namespace, 100)
    wire = led._wire
    assert wire is not None
    try:
        led.reserve(CAPS, {"usd_nano": 1}, lease_seconds=60)
        wire.skip = _RacedSkip(1, threading.Barrier(2))
        threads = [threading.Thread(target=led.reserve, args=(CAPS, {"usd_nano": 1}),
                                    kwargs={"lease_seconds": 60}) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        spins = count_spins(led)
        for _ in range(3):
            led.reserve(CAPS, {"usd_nano": 1}, lease_seconds=60)
        assert wire.skip >= 0
        assert len(spins) >= 1  # spinning came back
    finally:
        led.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")
def test_a_fork_child_spins_though_a_parent_thread_was_waiting_at_the_fork(
        redis_url: str, redis_namespace: str) -> None:
    """The calls on the wire at a fork are the parent's threads': none of them ends in
    the child, which would otherwise never spin (never alone on the wire)."""
    led = ledger(redis_url, redis_namespace, 5_000)
    wire = led._wire
    assert wire is not None
    led.reserve(CAPS, {"usd_nano": 1}, lease_seconds=60)
    wire.skip = wire.backoff = 0
    spins = count_spins(led)
    wire.waiting.add(object())  # another thread's call, waiting for its reply
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports by its exit status
            code = 3
            try:
                res = led.reserve(CAPS, {"usd_nano": 1}, lease_seconds=60)
                code = 0 if isinstance(res, Reservation) and len(spins) == 1 else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0  # 1: the child did not spin
    finally:
        wire.waiting.clear()
        led.close()
