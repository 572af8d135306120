"""The Redis ledger on a 3-node Redis Cluster against one Redis, in the same run.

    python benchmarks/bench_cluster.py [--sessions 1000] [--tenants 10] [--pairs 6000]
        [--threads 16] [--cells 12]

Starts its own servers on free loopback ports (nothing else is touched): a 3-node
cluster (``redis-server --cluster-enabled yes`` x3 + ``redis-cli --cluster create``)
and one plain ``redis-server``. The workload: ``--sessions`` sessions spread over
``--tenants`` tenants; every call is one reserve + settle pair charged to three scopes,
the session (``$1``), its tenant's team budget (``$1,000``) and the global budget
(``$10,000``), the guard's amounts of a gpt-4o-mini call. ``--threads`` threads walk
the sessions round-robin until ``--pairs`` pairs ran.

The cluster runs the workload with the default layout (one hash tag per namespace) and
with ``?cells=N`` (the namespace spread over N cells, see docs/redis-cluster.md), and
one Redis with the default layout; each settles two ways: ``settle`` (at once, reading
back every settled dimension of every scope) and ``settle_later`` (as the guard does:
deferred, reading back the capped dimension). Printed, for each: per cluster node, the
commands it ran (the sum of ``calls`` in its ``INFO commandstats``, after ``CONFIG
RESETSTAT``) and its share of the cluster's total, with whether the largest share is at
most 45%, and the pairs per second; and the machine's load average. Results also go to
benchmarks/results/cluster.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from agent_guard.ledger import Ledger, ScopeCaps, from_url
from agent_guard.testing.redis_cluster import LocalRedisCluster

NANO = 10**9
RESERVE = {"usd_nano": 46_500, "tokens": 155, "model_calls": 1}
SETTLE = {"usd_nano": 30_000, "tokens": 125, "model_calls": 1}


def scopes(session: int, tenants: int) -> list[ScopeCaps]:
    tenant = session % tenants
    return [ScopeCaps(f"session:s{session}", {"usd_nano": NANO}),
            ScopeCaps(f"team:t{tenant}", {"usd_nano": 1000 * NANO}),
            ScopeCaps("global", {"usd_nano": 10_000 * NANO})]


def run(ledger: Ledger, sessions: int, tenants: int, pairs: int, threads: int,
        later: bool = False) -> float:
    """Pairs per second of ``pairs`` reserve + settle pairs over ``threads`` threads.
    ``later``: settle as the guard does (``settle_later``, reading back the capped
    dimension of every scope, with a callback; flushed before the clock stops)."""
    counter = iter(range(pairs))
    lock = threading.Lock()
    errors: list[BaseException] = []
    landed: list[bool] = []

    def work() -> None:
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            try:
                caps = scopes(n % sessions, tenants)
                r = ledger.reserve(caps, RESERVE, lease_seconds=60)
                assert r, r
                if later:
                    ledger.settle_later(r, SETTLE,  # type: ignore[arg-type]
                                        reads={sc.scope: ["usd_nano"] for sc in caps},
                                        then=lambda s: landed.append(bool(s)))
                else:
                    ledger.settle(r, SETTLE)  # type: ignore[arg-type]
            except BaseException as exc:
                errors.append(exc)
                return

    workers = [threading.Thread(target=work) for _ in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    ledger.flush()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    assert not later or (len(landed) == pairs and all(landed)), len(landed)
    return pairs / elapsed


def command_calls(port: int) -> int:
    with redis.Redis(port=port) as client:
        stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items()
               if k not in ("cmdstat_config", "cmdstat_info", "cmdstat_cluster"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=6000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--cells", type=int, default=12)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    single_port = free_port()
    single = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(single_port), "--bind",
         "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(work)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out: dict[str, Any] = {"sessions": args.sessions, "tenants": args.tenants,
                           "pairs": args.pairs, "threads": args.threads, "cells": args.cells}
    try:
        with LocalRedisCluster(work / "cluster") as cluster:
            for _ in range(100):
                try:
                    with redis.Redis(port=single_port) as c:
                        c.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            ns = uuid.uuid4().hex[:8]
            layouts = {"one slot": from_url(cluster.url, namespace=ns),
                       f"cells={args.cells}": from_url(f"{cluster.url}?cells={args.cells}",
                                                       namespace=ns + "c")}
            one = from_url(f"redis://127.0.0.1:{single_port}/0", namespace=ns)
            # warm up (scripts loaded, pools filled, stripes marked), then count from zero
            for ledger in (*layouts.values(), one):
                run(ledger, args.sessions, args.tenants, 200, args.threads)
            out["load_before"] = os.getloadavg()[0]
            for mode in ("settle", "settle_later"):
                later = mode == "settle_later"
                found: dict[str, Any] = {}
                for name, ledger in layouts.items():
                    for port in cluster.ports:
                        with redis.Redis(port=port) as c:
                            c.config_resetstat()
                    rate = run(ledger, args.sessions, args.tenants, args.pairs, args.threads,
                               later)
                    calls = {f"127.0.0.1:{p}": command_calls(p) for p in cluster.ports}
                    total = sum(calls.values()) or 1
                    shares = {k: round(v / total, 3) for k, v in calls.items()}
                    found[name] = {
                        "pairs_per_s": round(rate), "commands_per_node": calls,
                        "share_per_node": shares, "max_share": max(shares.values()),
                        "max_share_at_most_45pct": max(shares.values()) <= 0.45}
                found["one Redis"] = {"pairs_per_s": round(
                    run(one, args.sessions, args.tenants, args.pairs, args.threads, later))}
                out[mode] = found
            out["load_after"] = os.getloadavg()[0]
            for ledger in (*layouts.values(), one):
                ledger.close()
    finally:
        single.kill()
        single.wait()
        shutil.rmtree(work, ignore_errors=True)

    print(f"{args.sessions} sessions in {args.tenants} tenants, session + team + global "
          f"budgets, {args.pairs} reserve+settle pairs, {args.threads} threads")
    for mode in ("settle", "settle_later"):
        print(f"{mode}:")
        for name, layout in out[mode].items():
            if "commands_per_node" not in layout:
                print(f"  {name}: {layout['pairs_per_s']} pairs/s")
                continue
            verdict = "yes" if layout["max_share_at_most_45pct"] else "NO"
            print(f"  cluster, {name}: {layout['pairs_per_s']} pairs/s; largest share "
                  f"{layout['max_share']:.1%} (at most 45%: {verdict})")
            for node, n in layout["commands_per_node"].items():
                print(f"    {node}: {n:>7} commands  {layout['share_per_node'][node]:6.1%}")
    print(f"load average (1 min) {out['load_before']:.1f} before, {out['load_after']:.1f} after")
    results = Path(__file__).with_name("results")
    results.mkdir(exist_ok=True)
    (results / "cluster.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
