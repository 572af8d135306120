"""Load: thousands of concurrent sessions reserving and settling, memory and Redis ledgers.

    python benchmarks/bench_load.py [--sessions 5000] [--calls 4] [--threads 32]
        [--processes 2] [--redis redis://127.0.0.1:6379/15]

Every session makes ``--calls`` model-call-shaped reserve + settle pairs (the
guard's two ledger operations per model call, with the guard's amounts: cost,
tokens, model calls) against a $1 cap. The sessions are interleaved, so all of
them are open at once: threads walk their share of the sessions round-robin, and
the asyncio variant runs one task per session (at most 64 ledger calls in
flight). Redis runs in ``--processes`` processes of ``--threads`` threads each.

Reported per configuration: sessions, reserve+settle pairs per second, p50/p99
latency of one pair, and a baseline measured in the same run with the same
concurrency: a plain dict increment under a lock for memory, one raw redis-py
``INCRBY`` round trip for Redis (a pair is two round trips, so 0.5 is the ceiling
of that ratio). Memory: the process RSS before / after / after eviction
(``MemoryLedger(max_idle_seconds=...)``) and Redis ``INFO memory`` used_memory
before / after / after the scope TTL (``RedisLedger(scope_ttl_seconds=...)``)
ran out. Results go to benchmarks/results/load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent_guard.ledger import Ledger, MemoryLedger, Reservation, ScopeCaps

CAP = 10**9  # $1 in nano-USD
RESERVE = {"usd_nano": 46_500, "tokens": 155, "model_calls": 1}  # gpt-4o-mini, 100 in / 50 out
SETTLE = {"usd_nano": 30_000, "tokens": 125, "input_tokens": 100, "output_tokens": 25,
          "model_calls": 1}
IN_FLIGHT = 64  # below redis-py asyncio pool's connection limit


def rss_mb() -> float:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return 0.0
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def caps(session: str) -> list[ScopeCaps]:
    return [ScopeCaps(f"session:{session}", {"usd_nano": CAP})]


def pair(ledger: Ledger, session: str) -> float:
    """One reserve + settle; returns its latency in seconds."""
    t0 = time.perf_counter()
    res = ledger.reserve(caps(session), RESERVE, lease_seconds=60)
    assert isinstance(res, Reservation), res
    ledger.settle(res, SETTLE)
    return time.perf_counter() - t0


def threaded(op: Callable[[str], float], sessions: list[str], calls: int, threads: int
             ) -> tuple[float, list[float]]:
    """Run ``calls`` ops per session from ``threads`` threads, sessions interleaved;
    returns (wall seconds, latencies)."""
    shares = [sessions[i::threads] for i in range(threads)]
    start = threading.Barrier(threads + 1)

    def work(share: list[str]) -> list[float]:
        start.wait()
        return [op(s) for _ in range(calls) for s in share]

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(work, share) for share in shares]
        start.wait()
        t0 = time.perf_counter()
        lat = [x for f in futures for x in f.result()]
        wall = time.perf_counter() - t0
    return wall, lat


async def one_task_per_session(ledger: Ledger, sessions: list[str], calls: int
                               ) -> tuple[float, list[float]]:
    gate = asyncio.Semaphore(IN_FLIGHT)
    lat: list[float] = []

    async def session_task(session: str) -> None:
        for _ in range(calls):
            async with gate:
                t0 = time.perf_counter()
                res = await ledger.areserve(caps(session), RESERVE, lease_seconds=60)
                assert isinstance(res, Reservation), res
                await ledger.asettle(res, SETTLE)
                lat.append(time.perf_counter() - t0)
            await asyncio.sleep(0)

    t0 = time.perf_counter()
    await asyncio.gather(*(session_task(s) for s in sessions))
    return time.perf_counter() - t0, lat


def summary(n_sessions: int, wall: float, lat: list[float], base_per_s: float | None,
            base_name: str) -> dict[str, Any]:
    lat = sorted(lat)
    out: dict[str, Any] = {
        "sessions": n_sessions,
        "pairs": len(lat),
        "pairs_per_s": round(len(lat) / wall),
        "p50_us": round(lat[len(lat) // 2] * 1e6, 1),
        "p99_us": round(lat[int(len(lat) * 0.99)] * 1e6, 1),
    }
    if base_per_s:
        out[f"baseline_{base_name}_per_s"] = round(base_per_s)
        out["ratio_vs_baseline"] = round(len(lat) / wall / base_per_s, 4)
    return out


# -- memory ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def bench_memory(n_sessions: int, calls: int, threads: int) -> dict[str, Any]:
    result: dict[str, Any] = {"rss_mb_start": rss_mb()}
    # baseline: a dict increment under a lock, the same number of ops and threads
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def incr(key: str) -> float:
        t0 = time.perf_counter()
        with lock:
            counts[key] = counts.get(key, 0) + 1
        return time.perf_counter() - t0

    base_sessions = [f"b{i}" for i in range(n_sessions)]
    wall, lat = threaded(incr, base_sessions, calls, threads)
    base = len(lat) / wall
    result["baseline_dict_increment"] = summary(n_sessions, wall, lat, None, "")
    counts.clear()

    clock = Clock()
    ledger = MemoryLedger(clock=clock, max_idle_seconds=600)
    sessions = [f"t{i}-{uuid.uuid4().hex[:6]}" for i in range(n_sessions)]
    before = rss_mb()
    wall, lat = threaded(lambda s: pair(ledger, s), sessions, calls, threads)
    result["threads"] = summary(n_sessions, wall, lat, base, "dict_increment")
    result["threads"]["threads"] = threads

    asessions = [f"a{i}-{uuid.uuid4().hex[:6]}" for i in range(n_sessions)]
    wall, lat = asyncio.run(one_task_per_session(ledger, asessions, calls))
    result["asyncio"] = summary(n_sessions, wall, lat, base, "dict_increment")
    result["rss_mb_before"] = before
    result["rss_mb_after"] = rss_mb()
    result["scopes_after"] = ledger.scope_count
    clock.offset += 601  # every session idle past max_idle_seconds
    ledger.reclaim_expired()
    result["scopes_after_eviction"] = ledger.scope_count
    result["rss_mb_after_eviction"] = rss_mb()
    result["evicted"] = ledger.evicted
    return result


# -- redis ----------------------------------------------------------------------------------


def redis_worker(url: str, namespace: str, sessions: list[str], calls: int, threads: int,
                 mode: str, ttl: int, barrier: Any, spin: float | None
                 ) -> tuple[float, list[float], float]:
    """One process: ``mode`` is "pairs" (the ledger) or "incrby" (the baseline).
    Returns (wall seconds, latencies, CPU seconds of this process while it ran)."""
    import redis

    from agent_guard.ledger.redis import RedisLedger

    if mode == "incrby":
        client = redis.Redis.from_url(url, max_connections=threads + 4)
        key = f"bench:{namespace}:"

        def op(session: str) -> float:
            t0 = time.perf_counter()
            client.incrby(key + session, 1)
            return time.perf_counter() - t0
        closer: Callable[[], None] = client.close
    else:
        ledger = RedisLedger(url, namespace=namespace, scope_ttl_seconds=ttl,
                             reply_spin_us=spin)
        op = lambda s: pair(ledger, s)  # noqa: E731
        closer = ledger.close
    op("warmup")  # connect, load the scripts
    barrier.wait()
    try:
        cpu = time.process_time()
        wall, lat = threaded(op, sessions, calls, threads)
        return wall, lat, time.process_time() - cpu
    finally:
        closer()


def used_memory(client: Any) -> int:
    return int(client.info("memory")["used_memory"])


def count_keys(client: Any, pattern: str) -> int:
    return sum(1 for _ in client.scan_iter(match=pattern, count=1000))


def bench_redis(url: str, n_sessions: int, calls: int, threads: int, processes: int,
                ttl: int, spin: float | None = None) -> dict[str, Any]:
    import redis

    from agent_guard.ledger.redis import RedisLedger

    admin = redis.Redis.from_url(url)
    ns = f"load-{uuid.uuid4().hex[:8]}"
    sessions = [f"r{i}" for i in range(n_sessions)]
    shares = [sessions[i::processes] for i in range(processes)]
    ctx = multiprocessing.get_context("spawn")
    out: dict[str, Any] = {"processes": processes, "threads_per_process": threads,
                           "scope_ttl_seconds": ttl, "reply_spin_us": spin}
    cpu: dict[str, float] = {}

    def run(mode: str) -> tuple[float, list[float]]:
        with ctx.Manager() as manager, ctx.Pool(processes) as pool:
            barrier = manager.Barrier(processes)
            results = pool.starmap(redis_worker, [
                (url, ns, share, calls, threads, mode, ttl, barrier, spin)
                for share in shares])
        cpu[mode] = sum(c for _, _, c in results)
        return max(w for w, _, _ in results), [x for _, lat, _ in results for x in lat]

    wall, lat = run("incrby")
    base = len(lat) / wall
    out["baseline_incrby"] = summary(n_sessions, wall, lat, None, "")
    admin.delete(*admin.keys(f"bench:{ns}:*") or ["-"])
    out["used_memory_mb_before"] = round(used_memory(admin) / 2**20, 2)
    wall, lat = run("pairs")
    out["threads"] = summary(n_sessions, wall, lat, base, "incrby")
    out["threads"]["client_cpu_us_per_pair"] = round(cpu["pairs"] / len(lat) * 1e6, 1)

    async def async_run() -> tuple[float, list[float]]:
        ledger = RedisLedger(url, namespace=ns, scope_ttl_seconds=ttl, reply_spin_us=spin)
        try:
            await ledger.areserve(caps("warmup"), RESERVE, lease_seconds=60)
            return await one_task_per_session(ledger, [f"ra{i}" for i in range(n_sessions)],
                                              calls)
        finally:
            await ledger.aclose()

    wall, lat = asyncio.run(async_run())
    out["asyncio_one_process"] = summary(n_sessions, wall, lat, base, "incrby")
    out["used_memory_mb_after"] = round(used_memory(admin) / 2**20, 2)
    out["keys_after"] = count_keys(admin, f"ag:{{{ns}}}:*")
    deadline = time.monotonic() + ttl + 30  # let the TTL run out and active expiry work
    time.sleep(ttl + 1)
    while count_keys(admin, f"ag:{{{ns}}}:s:*") and time.monotonic() < deadline:
        time.sleep(0.5)
    out["keys_after_ttl"] = count_keys(admin, f"ag:{{{ns}}}:*")
    out["used_memory_mb_after_ttl"] = round(used_memory(admin) / 2**20, 2)
    leftovers = list(admin.scan_iter(match=f"ag:{{{ns}}}:*", count=1000))
    if leftovers:
        admin.delete(*leftovers)
    admin.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--calls", type=int, default=4, help="reserve+settle pairs per session")
    parser.add_argument("--threads", type=int, default=32, help="threads (per process)")
    parser.add_argument("--processes", type=int, default=2, help="processes for Redis")
    parser.add_argument("--ttl", type=int, default=5,
                        help="Redis scope_ttl_seconds for the eviction measurement")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15",
                        help="Redis URL ('' to skip Redis)")
    parser.add_argument("--reply-spin-us", type=float, default=None,
                        help="RedisLedger reply_spin_us (default: the ledger's own; 0 blocks)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/load.json"))
    args = parser.parse_args()

    result: dict[str, Any] = {"sessions": args.sessions, "calls_per_session": args.calls,
                              "cpus": os.cpu_count()}
    result["memory"] = bench_memory(args.sessions, args.calls, args.threads)
    if args.redis:
        result["redis"] = bench_redis(args.redis, args.sessions, args.calls, args.threads,
                                      args.processes, args.ttl, args.reply_spin_us)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
