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
most 45%, and the commands per pair; the pairs per second this client reached; and the
server's capacity, independent of the client: per node, the CPU the redis-server spent
per pair (``used_cpu_user + used_cpu_sys`` of ``INFO cpu``, before and after; and of
that, the scripts' ``usec`` in ``INFO commandstats``), and the pairs per second at which the
busiest node would be saturated (one second of CPU / the largest CPU per pair: one node
bounds the one-slot layout and one Redis, the busiest of three bounds cells). And the
machine's load average. Results also go to benchmarks/results/cluster.json.
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


_OWN = ("cmdstat_config", "cmdstat_info", "cmdstat_cluster")
_SCRIPTS = ("cmdstat_evalsha", "cmdstat_eval")


def server_stats(port: int) -> tuple[int, int, float]:
    """A server's commands run (``INFO commandstats``, since ``CONFIG RESETSTAT``, without
    the benchmark's own; a script's commands count too), the ``usec`` of its scripts
    (``EVALSHA``, which includes the commands they run), and its CPU seconds so far
    (``INFO cpu``)."""
    with redis.Redis(port=port) as client:
        stats = client.info("commandstats")
        cpu = client.info("cpu")
    calls = sum(int(v["calls"]) for k, v in stats.items() if k not in _OWN)
    usec = sum(int(v["usec"]) for k, v in stats.items() if k in _SCRIPTS)
    return calls, usec, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def measure(ledger: Ledger, ports: list[int], pairs: int, later: bool,
            args: argparse.Namespace) -> dict[str, Any]:
    """Run the workload on ``ledger``; its rate, and per server (``ports``) the commands,
    their share and the CPU spent per pair, with the rate at which the busiest saturates."""
    for port in ports:
        with redis.Redis(port=port) as c:
            c.config_resetstat()
    before = {p: server_stats(p)[2] for p in ports}
    rate = run(ledger, args.sessions, args.tenants, pairs, args.threads, later)
    after = {p: server_stats(p) for p in ports}
    calls = {f"127.0.0.1:{p}": after[p][0] for p in ports}
    total = sum(calls.values()) or 1
    shares = {k: round(v / total, 3) for k, v in calls.items()}
    cpu_us = {f"127.0.0.1:{p}": round((after[p][2] - before[p]) * 1e6 / pairs, 1)
              for p in ports}
    usec = {f"127.0.0.1:{p}": round(after[p][1] / pairs, 1) for p in ports}
    busiest = max(cpu_us.values()) or 1.0
    return {"pairs_per_s": round(rate), "commands_per_node": calls,
            "share_per_node": shares, "max_share": max(shares.values()),
            "max_share_at_most_45pct": max(shares.values()) <= 0.45,
            "commands_per_pair": round(total / pairs, 1),
            "server_cpu_us_per_pair": cpu_us, "script_usec_per_pair": usec,
            "saturates_at_pairs_per_s": round(1e6 / busiest)}


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
                found: dict[str, Any] = {
                    name: measure(ledger, list(cluster.ports), args.pairs, later, args)
                    for name, ledger in layouts.items()}
                found["one Redis"] = measure(one, [single_port], args.pairs, later, args)
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
            where = name if name == "one Redis" else f"cluster, {name}"
            verdict = "yes" if layout["max_share_at_most_45pct"] else "NO"
            print(f"  {where}: client reached {layout['pairs_per_s']} pairs/s; servers "
                  f"saturate at {layout['saturates_at_pairs_per_s']} pairs/s; "
                  f"{layout['commands_per_pair']} commands/pair"
                  + ("" if name == "one Redis" else
                     f"; largest share {layout['max_share']:.1%} (at most 45%: {verdict})"))
            for node, n in layout["commands_per_node"].items():
                print(f"    {node}: {n:>7} commands {layout['share_per_node'][node]:6.1%}  "
                      f"CPU {layout['server_cpu_us_per_pair'][node]:6.1f} us/pair  "
                      f"(in scripts {layout['script_usec_per_pair'][node]:5.1f})")
    print(f"load average (1 min) {out['load_before']:.1f} before, {out['load_after']:.1f} after")
    results = Path(__file__).with_name("results")
    results.mkdir(exist_ok=True)
    (results / "cluster.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
