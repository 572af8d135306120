"""guarded_graph(): a 50-branch plan-and-execute graph under a dollar cap, with each action."""

from __future__ import annotations

import logging
import operator
import os
import subprocess
import sys
import textwrap
from decimal import Decimal
from typing import Annotated, TypedDict

import pytest
from langchain_core.messages import AIMessage, AnyMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import Command, Send

from agent_guard import (
    BudgetExceeded,
    Guard,
    Limits,
    StepLimitExceeded,
    budget_gate,
    guarded_graph,
)
from agent_guard.langgraph import GuardedStateGraph
from agent_guard.testing import ScriptedChatModel

CAP = Decimal("0.01")


class PlanState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    results: Annotated[list[str], operator.add]


class Models:
    def __init__(self) -> None:
        self.planner = ScriptedChatModel(model_name="gpt-4o-mini", responses=["1..50"],
                                         max_tokens=50)
        self.worker = ScriptedChatModel(model_name="gpt-4o", responses=["done " * 40],
                                        max_tokens=100)


def plan_and_execute(models: Models, fanout: int = 50) -> StateGraph:
    def plan(state: PlanState) -> dict:
        return {"messages": [models.planner.invoke("Plan the work")]}

    def route(state: PlanState) -> list[Send]:
        return [Send("execute", {"task": i}) for i in range(fanout)]

    def execute(task: dict) -> dict:
        return {"results": [f"{task['task']}:{models.worker.invoke(f'do {task}').content[:4]}"]}

    builder = StateGraph(PlanState)
    builder.add_node("plan", plan)
    builder.add_node("execute", execute)
    builder.add_edge(START, "plan")
    builder.add_conditional_edges("plan", route, ["execute"])
    builder.add_edge("execute", END)
    return builder


def start(thread: str = "T") -> tuple[dict, dict]:
    return {"messages": [("user", "do 50 things")], "results": []}, {
        "configurable": {"thread_id": thread}}


@pytest.fixture(autouse=True)
def _quiet(caplog):
    caplog.set_level(logging.ERROR, logger="langchain_core.callbacks.manager")


def recorded(guard: Guard) -> list:
    records: list = []
    guard.add_record_hook(records.append)
    return records


def test_end_returns_the_partial_state_with_the_reason() -> None:
    models = Models()
    guard = Guard(Limits(max_cost_usd=CAP))
    records = recorded(guard)
    app = guarded_graph(plan_and_execute(models), guard=guard, on_exceed="end",
                        checkpointer=InMemorySaver())
    assert isinstance(app, GuardedStateGraph)
    inputs, cfg = start()
    out = app.invoke(inputs, cfg)
    usage = guard.usage("T")
    assert 0 < usage.cost_usd <= CAP and usage.reserved_nano == 0
    assert usage.cost_nano == sum(r.cost_nano for r in records)
    assert 0 < len(out["results"]) == models.worker.calls < 50
    stops = [m for m in out["messages"] if m.name == "agent-guard"]
    assert len(stops) == 1  # once, although many branches were refused
    assert "BudgetExceeded" in stops[0].content
    details = stops[0].response_metadata["agent_guard"]
    assert details["dimension"] == "usd_nano" and Decimal(details["cap"]) == CAP


def test_raise_reaches_the_caller() -> None:
    app = guarded_graph(plan_and_execute(Models()), limits=Limits(max_cost_usd=CAP))
    inputs, cfg = start()
    with pytest.raises(BudgetExceeded):
        app.invoke(inputs, cfg)


def test_interrupt_pauses_and_resumes_with_a_larger_cap_without_paying_twice() -> None:
    models = Models()
    guard = Guard(Limits(max_cost_usd=CAP))
    records = recorded(guard)
    app = guarded_graph(plan_and_execute(models), guard=guard, on_exceed="interrupt",
                        checkpointer=InMemorySaver())
    inputs, cfg = start()
    paused = app.invoke(inputs, cfg)
    pauses = paused["__interrupt__"]
    assert len(pauses) >= 1
    payload = pauses[0].value
    assert Decimal(payload["cap_usd"]) == CAP
    assert Decimal(payload["spent_usd"]) <= CAP and Decimal(payload["next_step_usd"]) > 0
    done_before = models.worker.calls
    assert 0 < done_before < 50

    out = app.invoke(Command(resume={"extend_usd": 1.0}), cfg)
    assert "__interrupt__" not in out
    assert len(out["results"]) == 50
    assert models.worker.calls == 50  # branches finished before the pause did not run again
    assert models.planner.calls == 1
    usage = guard.usage("T")
    assert usage.cap_usd == CAP + 1  # extended once, although several branches had paused
    assert usage.cost_nano == sum(r.cost_nano for r in records) <= usage.cap_nano
    assert len([r for r in records if r.outcome == "ok"]) == 51


def test_interrupt_then_stop_ends_with_the_reason() -> None:
    models = Models()
    app = guarded_graph(plan_and_execute(models), limits=Limits(max_cost_usd=CAP),
                        on_exceed="interrupt", checkpointer=InMemorySaver())
    inputs, cfg = start()
    app.invoke(inputs, cfg)
    out = app.invoke(Command(resume={"stop": True}), cfg)
    assert "__interrupt__" not in out
    assert out["messages"][-1].name == "agent-guard"
    assert len(out["results"]) == models.worker.calls < 50


async def test_async_end_and_interrupt() -> None:
    models = Models()
    guard = Guard(Limits(max_cost_usd=CAP))
    app = guarded_graph(plan_and_execute(models), guard=guard, on_exceed="interrupt",
                        checkpointer=InMemorySaver())
    inputs, cfg = start("A")
    paused = await app.ainvoke(inputs, cfg)
    assert paused["__interrupt__"]
    out = await app.ainvoke(Command(resume={"extend_usd": "0.5"}), cfg)
    assert len(out["results"]) == 50
    assert guard.usage("A").cost_usd <= CAP + Decimal("0.5")

    ended = guarded_graph(plan_and_execute(Models()), limits=Limits(max_cost_usd=CAP),
                          on_exceed="end", checkpointer=InMemorySaver())
    out = await ended.ainvoke(*start("B"))
    assert out["messages"][-1].name == "agent-guard"


def test_counts_persist_across_invocations_of_a_thread_and_reset_for_a_new_one() -> None:
    models = Models()
    guard = Guard(Limits(max_model_calls=8, max_steps=100))
    app = guarded_graph(plan_and_execute(models, fanout=3), guard=guard, on_exceed="end",
                        checkpointer=InMemorySaver())
    inputs, cfg = start("P")
    app.invoke(inputs, cfg)
    assert guard.usage("P").model_calls == 4 and guard.usage("P").steps == 4
    out = app.invoke(inputs, cfg)  # 4 more fit exactly
    assert guard.usage("P").model_calls == 8 and len(out["results"]) == 6
    out = app.invoke(inputs, cfg)  # nothing fits any more
    assert guard.usage("P").model_calls == 8
    assert out["messages"][-1].name == "agent-guard"
    app.invoke(*start("Q"))
    assert guard.usage("Q").model_calls == 4


def test_max_steps_counts_node_runs() -> None:
    app = guarded_graph(plan_and_execute(Models(), fanout=5), limits=Limits(max_steps=4))
    with pytest.raises(StepLimitExceeded, match="cap on steps"):
        app.invoke(*start())


def test_a_compiled_graph_keeps_its_checkpointer_and_config() -> None:
    compiled = plan_and_execute(Models(), fanout=2).compile(checkpointer=InMemorySaver())
    compiled = compiled.with_config({"tags": ["mine"]})
    app = guarded_graph(compiled, limits=Limits(max_cost_usd=1))
    assert app.checkpointer is compiled.checkpointer
    assert "mine" in app.config["tags"]
    inputs, cfg = start("K")
    app.invoke(inputs, cfg)
    assert len(app.get_state(cfg).values["results"]) == 2


def test_budget_gate_routes_to_a_fallback_when_little_is_left() -> None:
    guard = Guard(Limits(max_cost_usd="0.002"))
    llm = ScriptedChatModel(model_name="gpt-4o", responses=["x " * 50], max_tokens=60)

    class S(TypedDict):
        messages: Annotated[list[AnyMessage], add_messages]
        route: list[str]

    def work(state: S) -> dict:
        return {"messages": [llm.invoke("work")], "route": [*state.get("route", []), "work"]}

    def cheap(state: S) -> dict:
        return {"messages": [AIMessage("summary from what we have")],
                "route": [*state.get("route", []), "cheap"]}

    builder = StateGraph(S)
    builder.add_node("work", work)
    builder.add_node("cheap", cheap)
    builder.add_edge(START, "work")
    builder.add_conditional_edges("work", budget_gate(guard, next="work", otherwise="cheap",
                                                      min_remaining_usd="0.0007"),
                                  ["work", "cheap"])
    builder.add_edge("cheap", END)
    app = guarded_graph(builder, guard=guard)
    out = app.invoke({"messages": [], "route": []}, {"configurable": {"thread_id": "G"}})
    assert out["route"][-1] == "cheap" and out["route"].count("work") >= 2
    usage = guard.usage("G")
    assert usage.cap_nano - usage.cost_nano < 700_000  # it stopped when less than that was left


def test_a_second_process_shares_the_thread_budget_on_redis(redis_url, redis_namespace) -> None:
    from agent_guard.ledger.redis import RedisLedger

    ledger = RedisLedger.from_url(redis_url, namespace=redis_namespace)
    guard = Guard(Limits(max_model_calls=6), ledger=ledger)
    app = guarded_graph(plan_and_execute(Models(), fanout=3), guard=guard, on_exceed="end")
    app.invoke(*start("R"))
    assert guard.usage("R").model_calls == 4
    script = textwrap.dedent(f"""
        import logging; logging.disable(logging.WARNING)
        from tests.test_guarded_graph import Models, plan_and_execute, start
        from agent_guard import Guard, Limits, guarded_graph
        from agent_guard.ledger.redis import RedisLedger
        ledger = RedisLedger.from_url({redis_url!r}, namespace={redis_namespace!r})
        guard = Guard(Limits(max_model_calls=6), ledger=ledger)
        models = Models()
        app = guarded_graph(plan_and_execute(models, fanout=3), guard=guard, on_exceed="end")
        out = app.invoke(*start("R"))
        print(models.planner.calls + models.worker.calls, out["messages"][-1].name)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=root, timeout=120)
    assert proc.returncode == 0, proc.stderr
    calls, last = proc.stdout.split()
    assert int(calls) == 2 and last == "agent-guard"  # only 2 of the 6 calls were left
    assert guard.usage("R").model_calls == 6
    ledger.close()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="on_exceed"):
        guarded_graph(plan_and_execute(Models()), on_exceed="explode")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="StateGraph"):
        guarded_graph(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_remaining_usd"):
        budget_gate(Guard(), next="a")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_handler_of_the_same_guard_given_per_run_does_not_count_twice(mode: str) -> None:
    import asyncio

    from agent_guard import GuardCallbackHandler

    guard = Guard(Limits(max_cost_usd=1))
    other = Guard(Limits(max_cost_usd=1))
    graph = guarded_graph(plan_and_execute(Models(), fanout=3), guard=guard)
    config = {"configurable": {"thread_id": "dup"},
              "callbacks": [GuardCallbackHandler(guard), GuardCallbackHandler(other)]}
    inputs = {"messages": [("user", "go")], "results": []}
    if mode == "sync":
        graph.invoke(inputs, config)
    else:
        asyncio.run(graph.ainvoke(inputs, config))
    # one planner call and three workers, counted once by this guard, once by the other
    assert guard.usage("dup").model_calls == 4
    assert other.usage("dup").model_calls == 4
    assert guard.usage("dup").steps == 4
