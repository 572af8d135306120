"""Caching on a scripted agent workload with repeated sub-tasks.

    python benchmarks/bench_cache.py [--subtasks 400] [--redis redis://127.0.0.1:6379/15]

Each sub-task asks the model one of 40 questions (gpt-4o prices, realistic
usage) and calls a paid search tool ($0.005 a call) with one of 40 queries,
drawn with a fixed seed, so later sub-tasks repeat earlier ones. The same
workload runs uncached, then with the LLM and tool caches on memory and on
Redis, in one process. Reported per configuration: cost as the guard settled
it, hit rates, dollars saved, time per sub-task as a ratio to the uncached
run, and the median latency of one cache lookup.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

from langchain_core.tools import tool

from agent_guard import Guard, GuardCallbackHandler, Limits
from agent_guard.cache import LLMCache, ResultCache, cached_tool
from agent_guard.testing import ScriptedChatModel

SEARCH_COST = Decimal("0.005")
QUESTIONS = [f"Summarise the refund policy for product line {i} in two sentences."
             for i in range(40)]
QUERIES = [f"warranty terms product {i}" for i in range(40)]


@tool
def search(query: str) -> str:
    """A paid web search."""
    time.sleep(0.0005)  # a remote API, kept short
    return f"Top result for {query}: 24-month warranty, parts and labour."


def workload(n: int) -> list[tuple[str, str]]:
    rng = random.Random(7)
    return [(rng.choice(QUESTIONS), rng.choice(QUERIES)) for _ in range(n)]


def run(name: str, subtasks: list[tuple[str, str]], store: str | None) -> dict[str, Any]:
    guard = Guard(Limits(max_cost_usd=1000))
    records: list = []
    guard.add_record_hook(records.append)
    llm_cache = tool_cache = None
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    if store is not None:
        llm_cache = LLMCache(store, namespace=namespace)
        tool_cache = ResultCache(store, namespace=namespace, ttl={"web": 3600})
    model = ScriptedChatModel(model_name="gpt-4o", max_tokens=300, cache=llm_cache or False,
                              responses=["Refunds within 30 days; keep the receipt. " * 4])
    tool_ = cached_tool(search, tool_cache, "web", cost_usd=SEARCH_COST) if tool_cache else search
    cfg = {"callbacks": [GuardCallbackHandler(guard, session_id="bench")]}
    tool_runs = 0
    t0 = time.perf_counter()
    for question, query in subtasks:
        model.invoke(question, config=cfg)
        tool_.invoke({"query": query}, config=cfg)
    elapsed = time.perf_counter() - t0
    llm_hits = sum(r.outcome == "cache_hit" for r in records)
    if tool_cache is not None:
        stats = tool_cache.stats()["search"]
        tool_hits, tool_saved = stats.hits, stats.saved_usd
        tool_runs = stats.misses
    else:
        tool_hits, tool_saved, tool_runs = 0, Decimal(0), len(subtasks)
    llm_cost = sum((r.cost_usd for r in records), Decimal(0))
    result = {
        "llm_cost_usd": llm_cost,
        "tool_cost_usd": tool_runs * SEARCH_COST,
        "total_cost_usd": llm_cost + tool_runs * SEARCH_COST,
        "llm_hit_rate": llm_hits / len(subtasks),
        "tool_hit_rate": tool_hits / len(subtasks),
        "saved_usd": sum((r.saved_usd for r in records), Decimal(0)) + tool_saved,
        "ms_per_subtask": elapsed / len(subtasks) * 1000,
    }
    if llm_cache is not None:
        lat = []
        for question in QUESTIONS:
            t = time.perf_counter()
            llm_cache.lookup(question, "llm-string-not-cached")
            lat.append(time.perf_counter() - t)
        result["lookup_us"] = statistics.median(lat) * 1e6
        llm_cache.clear()
        assert tool_cache is not None
        tool_cache.clear()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subtasks", type=int, default=400)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/cache.json"))
    args = parser.parse_args()
    subtasks = workload(args.subtasks)
    configs = {"uncached": None, "memory://": "memory://"}
    if args.redis:
        configs["redis://"] = args.redis
    results = {name: run(name, subtasks, store) for name, store in configs.items()}
    base = results["uncached"]
    print(f"{args.subtasks} sub-tasks (40 distinct questions, 40 distinct searches):")
    print(f"{'configuration':<12}{'cost USD':>10}{'vs uncached':>13}{'LLM hits':>10}"
          f"{'tool hits':>11}{'saved USD':>11}{'time/subtask':>14}{'lookup us':>11}")
    for name, r in results.items():
        lookup = f"{r['lookup_us']:.1f}" if "lookup_us" in r else "-"
        print(f"{name:<12}{r['total_cost_usd']:>10.4f}"
              f"{r['total_cost_usd'] / base['total_cost_usd']:>13.3f}"
              f"{r['llm_hit_rate']:>10.0%}{r['tool_hit_rate']:>11.0%}{r['saved_usd']:>11.4f}"
              f"{r['ms_per_subtask'] / base['ms_per_subtask']:>13.2f}x{lookup:>11}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
