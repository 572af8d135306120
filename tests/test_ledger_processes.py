"""Processes sharing one ledger (one SQLite file, one Redis namespace).

- 4 processes x 16 threads (``spawn``) race to reserve a $0.07 worst case against a
  $1.00 session cap and settle it: exactly the 14 calls that fit are admitted, and
  spent never passes the cap. With random smaller settlements, spent is exactly what
  the workers settled and still within the cap.
- The same race settling with ``settle_later`` (on Redis the settle rides with the
  next reserve, as the guard's): the same exact counts.
- A worker SIGKILLed between reserve and settle, or after a deferred settle it had not
  sent yet: its hold blocks the budget until its lease (real clock) runs out, then the
  next reserve takes it back; the unsent spend is never counted.

Workers live in ``tests/ledger_workers.py`` so spawned children import nothing else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent_guard.ledger import Denial, Ledger, Reservation, ScopeCaps, from_url

from .ledger_workers import CAP, EACH, RACE_TIMEOUT_S, fails_before_the_barrier, race, run_racing

PROCESSES, THREADS = 4, 16
LEASE = 2.0  # seconds, for the killed worker
HELD = 800_000_000  # what the killed worker reserves ($0.80)


def open_ledger(url: str, namespace: str | None) -> Ledger:
    options: dict[str, Any] = {} if namespace is None else {"namespace": namespace}
    return from_url(url, **options)


@pytest.mark.timeout(RACE_TIMEOUT_S + 60)
@pytest.mark.parametrize("later", [False, True], ids=["settle", "settle-later"])
@pytest.mark.parametrize("partial", [False, True], ids=["full-settle", "partial-settle"])
def test_processes_and_threads_never_overshoot(shared_url: tuple[str, str | None],
                                               partial: bool, later: bool) -> None:
    url, namespace = shared_url
    results = run_racing(race, [(url, namespace, THREADS, partial, seed, later)
                                for seed in range(PROCESSES)])
    admitted = sum(n for n, _ in results)
    settled = sum(s for _, s in results)
    ledger = open_ledger(url, namespace)
    totals = ledger.totals("session:shared")
    ledger.close()
    assert totals.get_spent("usd_nano") == settled <= CAP
    assert totals.get_reserved("usd_nano") == 0
    assert totals.get_spent("model_calls") == admitted
    if partial:  # smaller settlements leave room for more calls, never for overshoot
        assert admitted >= CAP // EACH
    else:
        assert admitted == CAP // EACH == 14  # the most that fits, exactly


@pytest.mark.timeout(RACE_TIMEOUT_S + 60)
@pytest.mark.parametrize("later", [False, True], ids=["settle", "settle-later"])
def test_sessions_of_one_team_are_admitted_exactly_to_the_team_cap(
        shared_url: tuple[str, str | None], later: bool) -> None:
    """64 sessions (spread over cells on the cells layout: the team scope is then lent to
    each cell in allowances, and recalled at the cap) race on one team's cap."""
    url, namespace = shared_url
    results = run_racing(race, [(url, namespace, THREADS, False, seed, later, True)
                                for seed in range(PROCESSES)])
    admitted = sum(n for n, _ in results)
    ledger = open_ledger(url, namespace)
    totals = ledger.totals("team:shared")
    ledger.close()
    assert totals.get_reserved("usd_nano") == 0
    assert totals.get_spent("model_calls") == admitted
    assert totals.get_spent("usd_nano") == sum(s for _, s in results) == CAP // EACH * EACH
    assert admitted == CAP // EACH == 14  # the most that fits, exactly


def test_a_worker_that_fails_before_the_race_fails_the_test_instead_of_hanging_it() -> None:
    # before: the others waited at the barrier for ever and pytest-timeout killed the run
    # with no word of the worker's error
    with pytest.raises(ValueError, match="could not open its ledger"):
        run_racing(fails_before_the_barrier, [(i,) for i in range(3)])


@pytest.mark.parametrize("pending", [False, True], ids=["mid-call", "settle-queued"])
def test_a_killed_worker_s_hold_comes_back_after_its_lease(
        shared_url: tuple[str, str | None], pending: bool) -> None:
    url, namespace = shared_url
    if pending and namespace is None:
        pytest.skip("SQLite settles at once: nothing is queued")
    worker = Path(__file__).with_name("ledger_workers.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(worker.parents[1]), *sys.path])}
    proc = subprocess.Popen([sys.executable, str(worker), url, namespace or "", str(LEASE),
                             *(["later"] if pending else [])],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "reserved"
        reserved_at = time.monotonic()  # the lease started just before this
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    ledger = open_ledger(url, namespace)
    caps = [ScopeCaps("session:crash", {"usd_nano": CAP})]
    try:
        # the dead worker's hold still counts (totals never reclaim) ...
        assert ledger.totals("session:crash").get_reserved("usd_nano") == HELD
        blocked = ledger.reserve(caps, {"usd_nano": HELD}, lease_seconds=60)
        if time.monotonic() < reserved_at + LEASE - 0.5:  # (unless this machine is slow)
            assert isinstance(blocked, Denial)
            assert (blocked.spent, blocked.reserved) == (0, HELD)
        elif isinstance(blocked, Reservation):
            ledger.release(blocked)
        # ... until its lease runs out: the next reserve takes the budget back
        time.sleep(max(0.0, reserved_at + LEASE + 0.05 - time.monotonic()))
        fresh = ledger.reserve(caps, {"usd_nano": HELD}, lease_seconds=60)
        assert isinstance(fresh, Reservation)
        assert ledger.totals("session:crash").get_reserved("usd_nano") == HELD  # fresh only
        assert ledger.reclaim_expired() == 0
        assert ledger.settle(fresh, {"usd_nano": HELD})
        t = ledger.totals("session:crash")
        assert (t.get_spent("usd_nano"), t.get_reserved("usd_nano")) == (HELD, 0)
    finally:
        ledger.close()
