"""Cost of a scripted 100-task agent workload: routed vs all-strong vs all-cheap, and the
router's added time per call.

    python benchmarks/bench_routing.py [--tasks 100]

Each task is one planning call and three execution calls, made from LangGraph
nodes named ``planner`` and ``executor`` with growing context, on scripted
models that report realistic usage (gpt-4o-mini and gpt-4o list prices).
All three configurations run the same workload in the same process; cost is
what the guard's ledger settled.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AnyMessage, HumanMessage, SystemMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from agent_guard import Guard, Limits, ModelRouter, guarded_graph
from agent_guard.testing import ScriptedChatModel

SYSTEM = "You are a careful engineering agent. Follow the plan; report results precisely. " * 8
PLAN = "1. Read the ticket. 2. Find the failing test. 3. Patch the code. 4. Re-run tests. " * 3
RESULT = "Step done: inspected the module, applied the change, all checks passed. " * 6
EXECUTION_STEPS = 3


class TaskState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    step: int


def tiers() -> dict[str, ScriptedChatModel]:
    return {
        "cheap": ScriptedChatModel(model_name="gpt-4o-mini", max_tokens=512,
                                   respond=lambda m: PLAN if len(m) < 3 else RESULT),
        "strong": ScriptedChatModel(model_name="gpt-4o", max_tokens=512,
                                    respond=lambda m: PLAN if len(m) < 3 else RESULT),
    }


def workload(router: ModelRouter, guard: Guard) -> Any:
    def planner(state: TaskState) -> dict:
        return {"messages": [router.invoke(state["messages"])], "step": 0}

    def executor(state: TaskState) -> dict:
        return {"messages": [router.invoke(state["messages"])], "step": state["step"] + 1}

    builder = StateGraph(TaskState)
    builder.add_node("planner", planner)
    builder.add_node("executor", executor)
    builder.add_edge(START, "planner")
    builder.add_edge("planner", "executor")
    builder.add_conditional_edges(
        "executor", lambda s: "executor" if s["step"] < EXECUTION_STEPS else END,
        ["executor", END])
    return guarded_graph(builder, guard=guard, router=router)


def run_config(name: str, roles: dict[str, str], default: str, tasks: int) -> dict[str, Any]:
    guard = Guard(Limits(max_cost_usd=10_000))
    records: list = []
    guard.add_record_hook(records.append)
    router = ModelRouter(tiers=tiers(), roles=roles, default=default)
    app = workload(router, guard)
    for i in range(tasks):
        app.invoke({"messages": [SystemMessage(SYSTEM),
                                 HumanMessage(f"Ticket #{i}: the nightly build fails.")],
                    "step": 0}, {"configurable": {"thread_id": f"{name}-{i}"}})
    cost = sum((r.cost_usd for r in records), Decimal(0))
    mix: dict[str, int] = {}
    for r in records:
        mix[r.tier or "?"] = mix.get(r.tier or "?", 0) + 1
    return {"cost_usd": cost, "calls": len(records), "tier_mix": mix}


def router_overhead(rounds: int = 7, calls: int = 300) -> dict[str, float]:
    model = tiers()["strong"]
    router = ModelRouter(tiers={"cheap": tiers()["cheap"], "strong": model},
                         roles={"planner": "cheap", "executor": "strong"})
    prompt = [SystemMessage(SYSTEM), HumanMessage("do the next step")]
    cfg = {"tags": ["executor"]}
    direct, routed = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            model.invoke(prompt, config=cfg)
        direct.append((time.perf_counter() - t0) / calls)
        t0 = time.perf_counter()
        for _ in range(calls):
            router.invoke(prompt, config=cfg)
        routed.append((time.perf_counter() - t0) / calls)
    d, r = statistics.median(direct), statistics.median(routed)
    return {"direct_us": round(d * 1e6, 1), "routed_us": round(r * 1e6, 1),
            "added_us": round((r - d) * 1e6, 1), "ratio": round(r / d, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/routing.json"))
    args = parser.parse_args()
    results = {
        "all strong": run_config("strong", {}, "strong", args.tasks),
        "all cheap": run_config("cheap", {}, "cheap", args.tasks),
        "routed (plan cheap, execute strong)": run_config(
            "routed", {"planner": "cheap", "executor": "strong"}, "strong", args.tasks),
    }
    base = results["all strong"]["cost_usd"]
    print(f"{args.tasks} tasks x (1 planning + {EXECUTION_STEPS} execution calls):")
    print(f"{'configuration':<38}{'cost USD':>12}{'vs all strong':>15}  tier mix")
    for name, r in results.items():
        print(f"{name:<38}{r['cost_usd']:>12.4f}{r['cost_usd'] / base:>15.3f}  {r['tier_mix']}")
    overhead = router_overhead()
    print(f"router: {overhead['routed_us']} us per call vs {overhead['direct_us']} us calling "
          f"the tier directly (+{overhead['added_us']} us, x{overhead['ratio']})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(
        {"results": {k: {**v, "cost_usd": str(v["cost_usd"])} for k, v in results.items()},
         "router_overhead": overhead}, indent=2))


if __name__ == "__main__":
    main()
