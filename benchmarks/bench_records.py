"""What keeping every call record costs: usage store appends vs the same guard without a store.

    python benchmarks/bench_records.py [--calls 2000] [--redis redis://127.0.0.1:6379/15]

Two measurements, both in one run:

1. **Per guarded model call**: the same in-process chat model and 5-message
   prompt as ``bench_overhead.py``, through a ``GuardCallbackHandler`` on each
   ledger, without a store (the baseline) and with a ``UsageStore`` attached as
   a record hook (synchronous, and ``background=True``). Interleaved rounds, so
   machine noise hits every configuration alike; medians of the rounds.
   Run twice: with an instant model (CPU-bound: a background writer competes
   with the agent for the GIL) and with 2 ms of model latency (as a network call:
   a background writer works while the agent waits).
2. **Per append**: ``store.append(record)`` alone, on each backend.

For background stores the time excludes the writer thread's work (which runs
beside the agent) but a final ``flush()`` is included in the per-append figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench_overhead import PROMPT, make_model

from agent_guard import Guard, GuardCallbackHandler, Limits
from agent_guard.engine.records import CallRecord
from agent_guard.engine.usage import Usage
from agent_guard.finops import UsageStore
from agent_guard.finops.store import SQLiteUsageStore

BIG = Limits(max_cost_usd=10**6, max_tokens=10**12, max_model_calls=10**9)


def sample_record(i: int) -> CallRecord:
    now = time.time()
    return CallRecord(
        session="bench", run_id=None, model="gpt-4o-mini", provider="openai",
        usage=Usage(180, 20, 128), cost_nano=20_000, reserved_nano=60_000,
        usage_estimated=False, outcome="ok", started_at=now, ended_at=now,
        node="agent", attributes={"team": "acme", "feature": "search"},
        scopes=("session:bench",), record_id=f"{uuid.uuid4().hex}{i}")


def guarded_configs(tmp: Path, redis_url: str | None
                    ) -> tuple[dict[str, list[Any]], dict[str, str], list[UsageStore]]:
    """name -> callbacks; name -> its baseline's name; the stores to close."""
    configs: dict[str, list[Any]] = {}
    baseline: dict[str, str] = {}
    stores: list[UsageStore] = []

    def add(name: str, ledger: Any, store: UsageStore | None, base: str) -> None:
        guard = Guard(BIG, ledger)
        if store is not None:
            store.attach(guard)
            stores.append(store)
        configs[name] = [GuardCallbackHandler(guard, session_id="b")]
        baseline[name] = base

    add("memory", "memory://", None, "memory")
    add("memory + memory store", "memory://", UsageStore.from_url("memory://"), "memory")
    db = tmp / "bench.db"
    add("sqlite", f"sqlite:///{db}", None, "sqlite")
    add("sqlite + sqlite store", f"sqlite:///{db}", SQLiteUsageStore(str(db)), "sqlite")
    add("sqlite + sqlite store (bg)", f"sqlite:///{db}",
        SQLiteUsageStore(str(db), background=True), "sqlite")
    if redis_url:
        from agent_guard.ledger.redis import RedisLedger

        ns = f"bench-{uuid.uuid4().hex[:8]}"
        for name, store_opts in (("redis", None), ("redis + redis store", {}),
                                 ("redis + redis store (bg)", {"background": True})):
            ledger = RedisLedger.from_url(redis_url, namespace=ns)
            store = None if store_opts is None else UsageStore.for_ledger(ledger, **store_opts)
            add(name, ledger, store, "redis")
    return configs, baseline, stores


def per_call(calls: int, rounds: int, redis_url: str | None,
             latency_s: float = 0.0) -> dict[str, Any]:
    model = make_model()
    model.latency_s = latency_s
    tmp = Path(tempfile.mkdtemp(prefix="agent-guard-bench-"))
    configs, baseline, stores = guarded_configs(tmp, redis_url)
    for handlers in configs.values():  # warm up
        for _ in range(50):
            model.invoke(PROMPT, config={"callbacks": handlers})
    times: dict[str, list[float]] = {name: [] for name in configs}
    per_round = max(1, calls // rounds)
    for _ in range(rounds):
        for name, handlers in configs.items():
            cfg = {"callbacks": handlers}
            t0 = time.perf_counter()
            for _ in range(per_round):
                model.invoke(PROMPT, config=cfg)
            times[name].append((time.perf_counter() - t0) / per_round)
    for store in stores:
        store.close()
    med = {name: statistics.median(v) for name, v in times.items()}
    return {name: {"us_per_call": round(t * 1e6, 1),
                   "added_us_vs_no_store": round((t - med[baseline[name]]) * 1e6, 1),
                   "vs_no_store": round(t / med[baseline[name]], 3)}
            for name, t in med.items()}


def per_append(n: int, redis_url: str | None) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="agent-guard-bench-"))
    stores: dict[str, UsageStore] = {
        "memory": UsageStore.from_url("memory://"),
        "sqlite": UsageStore.from_url(f"sqlite:///{tmp / 'a.db'}"),
        "sqlite (bg)": UsageStore.from_url(f"sqlite:///{tmp / 'b.db'}", background=True),
    }
    if redis_url:
        ns = f"bench-{uuid.uuid4().hex[:8]}"
        stores["redis"] = UsageStore.from_url(redis_url, namespace=ns)
        stores["redis (bg)"] = UsageStore.from_url(redis_url, namespace=ns + "b",
                                                   background=True)
    out: dict[str, float] = {}
    for name, store in stores.items():
        records = [sample_record(i) for i in range(n)]
        for r in records[:50]:
            store.append(r)
        store.flush()
        t0 = time.perf_counter()
        for r in records[50:]:
            store.append(r)
        hook_only = time.perf_counter() - t0
        store.flush()
        with_flush = time.perf_counter() - t0
        out[name] = round(hook_only / (n - 50) * 1e6, 2)
        if store.background:
            out[name + ", incl. flush"] = round(with_flush / (n - 50) * 1e6, 2)
        assert store.failed == 0 and store.dropped == 0, name
        store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--appends", type=int, default=5000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15",
                        help="Redis URL, or '' to skip Redis")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/records.json"))
    args = parser.parse_args()
    redis_url = args.redis or None
    calls = per_call(args.calls, args.rounds, redis_url)
    slow = per_call(args.calls // 2, args.rounds, redis_url, latency_s=0.002)
    appends = per_append(args.appends, redis_url)
    for title, result in (("instant model", calls), ("model with 2 ms latency", slow)):
        print(f"per guarded model call, {title}, median of {args.rounds} rounds:")
        print(f"{'configuration':<28}{'us/call':>10}{'added us':>10}{'x no store':>12}")
        for name, r in result.items():
            print(f"{name:<28}{r['us_per_call']:>10.1f}{r['added_us_vs_no_store']:>10.1f}"
                  f"{r['vs_no_store']:>12.3f}")
    print(f"per store.append ({args.appends - 50} records):")
    for name, us in appends.items():
        print(f"  {name:<26}{us:>8.2f} us")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"per_call": calls, "per_call_2ms_model": slow,
                                            "per_append_us": appends}, indent=2))


if __name__ == "__main__":
    main()
