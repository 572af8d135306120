"""Processes sharing one ledger: 4 processes x 16 threads against a $1.00 cap, and a worker
killed between reserve and settle."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent_guard.ledger import Denial, ScopeCaps, from_url

from .ledger_workers import CAP, EACH, race

PROCESSES, THREADS = 4, 16


@pytest.fixture(params=["sqlite", "redis"])
def shared(request, tmp_path, redis_namespace) -> tuple[str, str | None]:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}", None
    from .conftest import REDIS_URL, require_redis

    require_redis()
    return REDIS_URL, redis_namespace


@pytest.mark.parametrize("partial", [False, True], ids=["full-settle", "partial-settle"])
def test_processes_and_threads_never_overshoot(shared, partial: bool) -> None:
    url, namespace = shared
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(PROCESSES)
    with ctx.Pool(PROCESSES) as pool:
        results = pool.starmap(
            race, [(url, namespace, barrier, THREADS, partial, seed) for seed in range(PROCESSES)]
        )
    admitted = sum(n for n, _ in results)
    settled = sum(s for _, s in results)
    ledger = from_url(url, **({} if namespace is None else {"namespace": namespace}))
    totals = ledger.totals("session:shared")
    ledger.close()
    assert totals.get_spent("usd_nano") == settled <= CAP
    assert totals.get_reserved("usd_nano") == 0
    assert totals.get_spent("model_calls") == admitted
    if not partial:
        assert admitted == CAP // EACH == 14  # the most that fits, exactly
    else:
        assert admitted >= CAP // EACH  # smaller settlements leave room for more calls


def test_a_killed_worker_s_hold_comes_back_after_its_lease(shared) -> None:
    url, namespace = shared
    worker = Path(__file__).with_name("ledger_workers.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(worker.parents[1]), *sys.path])}
    proc = subprocess.Popen([sys.executable, str(worker), url, namespace or "", "1.0"],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "reserved"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    ledger = from_url(url, **({} if namespace is None else {"namespace": namespace}))
    caps = [ScopeCaps("session:crash", {"usd_nano": CAP})]
    assert ledger.totals("session:crash").get_reserved("usd_nano") == 800_000_000
    assert isinstance(ledger.reserve(caps, {"usd_nano": 800_000_000}, lease_seconds=60), Denial)
    deadline = time.monotonic() + 30
    while ledger.reclaim_expired() == 0 and time.monotonic() < deadline:
        time.sleep(0.1)  # the lease is 1 s
    assert ledger.totals("session:crash").get_reserved("usd_nano") == 0
    assert not isinstance(ledger.reserve(caps, {"usd_nano": 800_000_000}, lease_seconds=60),
                          Denial)
    ledger.close()
