"""What a Redis ledger costs a guarded model call, against one redis-py EVALSHA.

    python benchmarks/bench_redis.py [--calls 2000] [--rounds 40] [--redis URL] [--instructions]
    python benchmarks/bench_redis.py --server-instructions

Starts its own ``redis-server`` on a free loopback port (no persistence), so the
server's ``INFO commandstats`` counts this benchmark's commands only (``--redis URL``
uses a running server instead; other clients then blur the counts). In interleaved
rounds, so machine noise hits every row alike, it times:

- ``EVALSHA round trip``: redis-py's ``client.evalsha(sha, 0)`` of ``return 1`` on a
  plain ``redis.Redis`` (the floor of any ledger operation);
- ``no callbacks``: the in-process chat model on a 5-message prompt;
- ``guard memory://``, ``guard redis://`` (the settle rides with the next reserve;
  the client polls for each reply, ``reply_spin_us``, before it would block),
  ``guard redis:// reply_spin_us=0`` (the same, blocking for each reply as redis-py
  does), ``guard redis:// settle_delay=0`` (reserve and settle: two scripts per call);
- ``guard memory:// + EVALSHA``: the memory guard's call followed by that plain
  EVALSHA, the floor of any Redis ledger (the in-process guard and one round trip).
  It takes longer than the two rows it is made of: after the process waited for a
  reply, the Python work after it runs slower (the other process ran on the core:
  caches and branch predictors start cold), which a round trip alone does not show.

Printed ratios, from this run (for the median round and for the fastest round, the
one least disturbed by other load; then each round's own ratio, its median over the
rounds): each guard's added time over one EVALSHA round trip, and the Redis ledger's
own share (redis guard - memory guard, and redis guard - the floor) over it; beside
each row, this process's CPU time per call.
Then per call (the plain EVALSHA's, then each guarded call's): the commands the server
ran (``INFO commandstats`` deltas of every command a client sent, i.e. not counting
those the Lua scripts run inside), EVALSHA calls and their server time; and the spend
each ledger recorded, which must be equal (deferring a settle changes no charge).

``--instructions`` counts this process's instructions per call under callgrind;
``--server-instructions`` the server's (a private ``redis-server`` under callgrind):
both load-independent, unlike the wall times.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from typing import Any

import _checkout  # noqa: F401  (this checkout's agent_guard)
import _instructions
import redis
from bench_overhead import PROMPT, make_model

from agent_guard import Guard, GuardCallbackHandler, Limits
from agent_guard.ledger.redis import RedisLedger

# commands the ledger's Lua scripts run inside (commandstats counts them too)
IN_SCRIPTS = {"get", "set", "hget", "hmget", "hincrby", "hset", "hdel", "hexists", "zadd",
              "zrem", "zrangebyscore", "zscore", "exists", "expire", "time"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(under: Sequence[str] = (), wait_seconds: float = 20
                 ) -> tuple[subprocess.Popen[bytes], str]:
    """A private ``redis-server`` on a free loopback port (run by the command ``under``,
    if any, e.g. valgrind), once it answers a PING, and its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (or pass --redis URL)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="agent-guard-bench-redis-")
    proc = subprocess.Popen([*under, binary, "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", workdir, "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            redis.Redis.from_url(url, socket_timeout=1).ping()
            return proc, url
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.05)


def commandstats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """command -> (calls, usec) as the server counts them."""
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
            for name, v in client.info("commandstats").items()}


def delta(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
          ) -> dict[str, tuple[int, int]]:
    out = {}
    for name, (calls, usec) in after.items():
        c0, u0 = before.get(name, (0, 0))
        if calls - c0:
            out[name] = (calls - c0, usec - u0)
    out.pop("info", None)  # this benchmark's own reads
    return out


FLOOR = "guard memory:// + EVALSHA"
BLOCKING = "guard redis:// reply_spin_us=0"
REDIS_ROWS = ("guard redis://", BLOCKING, "guard redis:// settle_delay=0")


def run(calls: int, rounds: int, url: str) -> dict[str, Any]:
    model = make_model()
    big = Limits(max_cost_usd=10**6, max_tokens=10**12, max_model_calls=10**9)
    ns = uuid.uuid4().hex[:8]
    deferred = RedisLedger.from_url(url, namespace=f"bench-{ns}-d")
    blocking = RedisLedger.from_url(url, namespace=f"bench-{ns}-b", reply_spin_us=0)
    immediate = RedisLedger.from_url(url, namespace=f"bench-{ns}-i", settle_delay=0)
    guards = {"guard memory://": Guard(big, "memory://"),
              "guard redis://": Guard(big, deferred),
              BLOCKING: Guard(big, blocking),
              "guard redis:// settle_delay=0": Guard(big, immediate)}
    plain = redis.Redis.from_url(url)
    sha = plain.script_load("return 1")

    def evalsha(n: int) -> None:
        for _ in range(n):
            plain.evalsha(sha, 0)

    def invoking(handlers: list[Any]) -> Any:
        cfg = {"callbacks": handlers}

        def go(n: int) -> None:
            for _ in range(n):
                model.invoke(PROMPT, config=cfg)
        return go

    rows = {"EVALSHA round trip": evalsha, "no callbacks": invoking([])}
    for name, guard in guards.items():
        rows[name] = invoking([GuardCallbackHandler(guard, session_id="b")])
    in_memory = invoking([GuardCallbackHandler(guards["guard memory://"], session_id="b")])

    def floor(n: int) -> None:  # any Redis ledger's floor: one round trip per call
        for _ in range(n):
            in_memory(1)
            plain.evalsha(sha, 0)

    rows[FLOOR] = floor
    for go in rows.values():  # warm up: imports, encodings, scripts, connections
        go(100)

    per_round = max(1, calls // rounds)
    times: dict[str, list[float]] = {name: [] for name in rows}
    cpu: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, go in rows.items():
            c0, t0 = time.process_time(), time.perf_counter()
            go(per_round)
            times[name].append((time.perf_counter() - t0) / per_round)
            cpu[name].append((time.process_time() - c0) / per_round)
    out: dict[str, Any] = {"calls_per_row": per_round * rounds, "rounds": rounds}
    # median round: the typical call; fastest round: the least disturbed by other load
    for stat, pick in (("median", statistics.median), ("fastest round", min)):
        t = {name: pick(v) for name, v in times.items()}
        c = {name: pick(v) for name, v in cpu.items()}
        rt, base = t["EVALSHA round trip"], t["no callbacks"]
        row: dict[str, Any] = {"us": {}, "client cpu us": {}, "ratios": {}}
        for name in rows:
            row["us"][name] = round(t[name] * 1e6, 1)
            row["client cpu us"][name] = round(c[name] * 1e6, 1)
        for name in (*guards, FLOOR):
            row["us"][f"{name} added"] = round((t[name] - base) * 1e6, 1)
            row["ratios"][f"{name} added / EVALSHA"] = round((t[name] - base) / rt, 2)
        for name in REDIS_ROWS:
            row["ratios"][f"{name} - memory guard / EVALSHA"] = round(
                (t[name] - t["guard memory://"]) / rt, 2)
            row["ratios"][f"{name} - floor / EVALSHA"] = round((t[name] - t[FLOOR]) / rt, 2)
        out[stat] = row
    # each round's own ratio (rows timed moments apart share that round's machine state),
    # then the median over rounds
    paired: dict[str, float] = {}
    for name in (*guards, FLOOR):
        per_round = [(g - b) / e for g, b, e in zip(
            times[name], times["no callbacks"], times["EVALSHA round trip"], strict=True)]
        paired[f"{name} added / EVALSHA"] = round(statistics.median(per_round), 2)
    out["per round"] = paired
    # the denominator's own spread: where idle CPUs sleep between requests a round trip
    # pays two wake-ups; on busy ones it does not (on the 2-core VMs measured: ~35 us
    # busy against 100-130 us idle), so every ratio above moves with it
    trips = sorted(times["EVALSHA round trip"])
    out["EVALSHA spread us"] = {"min": round(trips[0] * 1e6, 1),
                                "median": round(statistics.median(trips) * 1e6, 1),
                                "max": round(trips[-1] * 1e6, 1)}

    # what the server ran per call, for the plain EVALSHA and each Redis guard alone
    n = 500
    out["per_call"] = {}
    for name in ("EVALSHA round trip", *REDIS_ROWS):
        go = rows[name]
        for other in REDIS_ROWS:
            guards[other].ledger.flush()  # none lands (in the background) inside this row
        before = commandstats(plain)
        go(n)
        if name in guards:
            guards[name].ledger.flush()  # the last call's settle lands too
        d = delta(before, commandstats(plain))
        sent = {k: v for k, v in d.items() if k not in IN_SCRIPTS}
        evals = d.get("evalsha", (0, 0))
        out["per_call"][name] = {
            "commands sent": round(sum(c for c, _ in sent.values()) / n, 3),
            "evalsha": round(evals[0] / n, 3),
            "evalsha server us": round(evals[1] / n, 1),
            "sent": {k: c for k, (c, _) in sent.items()},
        }

    spent = {}
    for name in REDIS_ROWS:
        ledger = guards[name].ledger
        ledger.flush()
        scope = guards[name].scope_refs("b")[0].scope
        t = ledger.totals(scope)
        calls_made = t.get_spent("model_calls")
        spent[name] = {"model_calls": calls_made, "usd_nano": t.get_spent("usd_nano"),
                       "usd_nano_per_call": t.get_spent("usd_nano") / max(1, calls_made),
                       "reserved_usd_nano": t.get_reserved("usd_nano")}
    out["spent"] = spent
    for guard in guards.values():
        guard.close()
    return out


COUNTED = 200  # calls per row under callgrind


def count_instructions(url: str) -> None:
    """(In the callgrind child) this process's instructions per call: one EVALSHA, the
    bare call, and the guard on memory:// and on redis:// (whose settle rides with the
    next reserve: ``settle_delay`` long enough that no background flush takes it, as in
    an agent loop), blocking for each reply (``reply_spin_us=0``: polling would count
    the wait). The server's work is not counted here (see the server time)."""
    model = make_model()
    big = Limits(max_cost_usd=10**6, max_tokens=10**12, max_model_calls=10**9)
    ledger = RedisLedger.from_url(url, namespace=f"bench-{uuid.uuid4().hex[:8]}-c",
                                  settle_delay=30, reply_spin_us=0)
    plain = redis.Redis.from_url(url)
    sha = plain.script_load("return 1")
    rows: dict[str, Any] = {"EVALSHA round trip": lambda: plain.evalsha(sha, 0)}
    for name, handlers in (("no callbacks", []),
                           ("guard memory://", [GuardCallbackHandler(Guard(big, "memory://"),
                                                                     session_id="b")]),
                           ("guard redis://", [GuardCallbackHandler(Guard(big, ledger),
                                                                    session_id="b")])):
        cfg = {"callbacks": handlers}
        rows[name] = lambda cfg=cfg: model.invoke(PROMPT, config=cfg)
    for name, go in rows.items():
        for _ in range(50):
            go()
        gc.collect()
        gc.freeze()
        with _instructions.region(name):
            for _ in range(COUNTED):
                go()
    ledger.flush()  # the last call's settle lands before the server stops


def show_instructions(argv: list[str]) -> None:
    dumps = _instructions.rerun_under_callgrind(argv)
    if dumps is None:
        raise SystemExit("valgrind not available (x86-64 Linux)")
    counts = {k: v[-1] / COUNTED for k, v in _instructions.read_regions(dumps).items()}
    shutil.rmtree(dumps, ignore_errors=True)
    parser_name = "hiredis" if redis.utils.HIREDIS_AVAILABLE else "pure Python (no hiredis)"
    print(f"instructions per call (callgrind, main thread, {COUNTED} calls each; "
          f"redis-py's parser: {parser_name}):")
    for name, value in counts.items():
        print(f"  {name:40s} {value:12,.0f}")
    rt, base = counts["EVALSHA round trip"], counts["no callbacks"]
    for name in ("guard memory://", "guard redis://"):
        print(f"  {name + ' added / EVALSHA':52s} {(counts[name] - base) / rt:6.2f}x")
    print(f"  {'guard redis:// - memory guard / EVALSHA':52s} "
          f"{(counts['guard redis://'] - counts['guard memory://']) / rt:6.2f}x")


def server_instructions(calls: int) -> None:
    """The server's instructions per call (``--server-instructions``): a private
    ``redis-server`` under callgrind, its counters zeroed before each row's calls and
    read after them (``callgrind_control``); load-independent, like ``--instructions``
    for the client."""
    control = shutil.which("callgrind_control")
    if shutil.which("valgrind") is None or control is None:
        raise SystemExit("needs valgrind and callgrind_control")
    workdir = tempfile.mkdtemp(prefix="agent-guard-bench-redis-cg-")
    proc, url = start_server(["valgrind", "--tool=callgrind",
                              f"--callgrind-out-file={workdir}/cg"], wait_seconds=60)
    try:
        plain = redis.Redis.from_url(url)

        def counted() -> int:  # instructions of every thread since the last zeroing
            out = subprocess.run([control, "-e", "Ir", str(proc.pid)], capture_output=True,
                                 text=True, check=True).stdout
            return sum(int(n.replace(",", "")) for n in re.findall(r"Th \d+\s+([\d,]+)", out))

        model = make_model()
        big = Limits(max_cost_usd=10**6, max_tokens=10**12, max_model_calls=10**9)
        sha = plain.script_load("return 1")
        rows: dict[str, Any] = {"EVALSHA round trip": lambda: plain.evalsha(sha, 0)}
        ledgers = []
        for name, options in (("guard redis://", {}),
                              ("guard redis:// settle_delay=0", {"settle_delay": 0})):
            ledger = RedisLedger.from_url(url, namespace=f"bench-{uuid.uuid4().hex[:8]}-s",
                                          **({"settle_delay": 30} | options))
            ledgers.append(ledger)
            cfg = {"callbacks": [GuardCallbackHandler(Guard(big, ledger), session_id="b")]}
            rows[name] = lambda cfg=cfg: model.invoke(PROMPT, config=cfg)
        per_call = {}
        for name, go in rows.items():
            for _ in range(20):
                go()
            subprocess.run([control, "-z", str(proc.pid)], capture_output=True, check=True)
            for _ in range(calls):
                go()
            per_call[name] = counted() / calls
        for ledger in ledgers:
            ledger.close()
    finally:
        proc.kill()
        proc.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"the server's instructions per call (redis-server under callgrind, {calls} calls "
          "each, every thread):")
    for name, value in per_call.items():
        print(f"  {name:40s} {value:12,.0f}")
    rt = per_call["EVALSHA round trip"]
    for name in ("guard redis://", "guard redis:// settle_delay=0"):
        print(f"  {name + ' / EVALSHA':52s} {per_call[name] / rt:6.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--redis", default="", help="a running server's URL (default: "
                        "start a private redis-server)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--instructions", action="store_true",
                        help="this process's instructions per call under callgrind instead "
                        "of wall time (load-independent; the server's work is not in them)")
    parser.add_argument("--server-instructions", action="store_true",
                        help="the server's instructions per call: a private redis-server "
                        "under callgrind (load-independent)")
    args = parser.parse_args()
    if args.server_instructions:
        server_instructions(min(args.calls, 500))
        return
    if args.instructions and not _instructions.active():
        show_instructions([sys.argv[0], *sys.argv[1:]])
        return
    proc = None
    url = args.redis
    if not url:
        proc, url = start_server()
    try:
        if args.instructions:  # the callgrind child
            count_instructions(url)
            return
        result = run(args.calls, args.rounds, url)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    parser_name = "hiredis" if redis.utils.HIREDIS_AVAILABLE else "pure Python (no hiredis)"
    print(f"{result['calls_per_row']} calls per row in {result['rounds']} interleaved "
          f"rounds; redis-py's parser: {parser_name}; per call (wall, and this process's "
          "CPU):")
    for stat in ("median", "fastest round"):
        row = result[stat]
        print(f" {stat}:")
        for name, us in row["us"].items():
            mine = row["client cpu us"].get(name)
            print(f"  {name:40s} {us:8.1f} us" + (f"  (cpu {mine:.1f} us)" if mine else ""))
        for name, ratio in row["ratios"].items():
            print(f"  {name:52s} {ratio:6.2f}x")
    print(" median of the rounds' own ratios:")
    for name, ratio in result["per round"].items():
        print(f"  {name:52s} {ratio:6.2f}x")
    spread = result["EVALSHA spread us"]
    print(f" EVALSHA round trip over the rounds: min {spread['min']} us, median "
          f"{spread['median']} us, max {spread['max']} us (idle CPUs: wake-ups in it; busy "
          "ones: none; the ratios move with it)")
    print("per call, counted by the server (INFO commandstats):")
    for name, row in result["per_call"].items():
        print(f"  {name:30s} commands sent {row['commands sent']:g} "
              f"(EVALSHA {row['evalsha']:g}, {row['evalsha server us']:g} us of server "
              f"time) {row['sent']}")
    print("spent (must match: deferring changes no charge):")
    for name, row in result["spent"].items():
        print(f"  {name:30s} {row}")


if __name__ == "__main__":
    main()
