"""GuardCallbackHandler under create_agent and compiled StateGraphs, sync and async."""

from __future__ import annotations

import asyncio
import operator
import threading
import time
from typing import Annotated, TypedDict

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

from agent_guard import BudgetExceeded, Guard, GuardCallbackHandler, Limits, StepLimitExceeded
from agent_guard.testing import ScriptedChatModel

tool_runs: list[str] = []
_lock = threading.Lock()


@tool
def lookup_order(order_id: str) -> str:
    """Look up an order by id."""
    with _lock:
        tool_runs.append(order_id)
    time.sleep(0.01)
    return f"order {order_id}: shipped"


def looping_model(**kw) -> ScriptedChatModel:
    """A model that asks for the same tool again and again (a runaway agent)."""

    def respond(messages):
        n = sum(isinstance(m, AIMessage) for m in messages)
        return AIMessage(content="", tool_calls=[
            {"name": "lookup_order", "args": {"order_id": f"A{n}"}, "id": f"call_{n}"}])

    kw.setdefault("model_name", "gpt-4o")
    kw.setdefault("max_tokens", 256)
    return ScriptedChatModel(respond=respond, **kw)


@pytest.fixture(autouse=True)
def _reset_tool_runs():
    tool_runs.clear()


def test_create_agent_is_stopped_by_the_dollar_cap() -> None:
    llm = looping_model()
    handler = GuardCallbackHandler(limits=Limits(max_cost_usd="0.02"), session_id="default")
    agent = create_agent(llm, [lookup_order], system_prompt="You are a support agent.")
    with pytest.raises(BudgetExceeded):
        agent.invoke({"messages": [("user", "where is my order?")]},
                     config={"callbacks": [handler], "configurable": {"thread_id": "x"}})
    usage = handler.guard.usage("x")
    assert usage.cost_nano <= 20_000_000 and usage.reserved_nano == 0
    assert usage.model_calls == llm.calls >= 2  # refused call never reached the model
    assert usage.tool_calls == len(tool_runs) == usage.model_calls


def test_tool_cap_refuses_before_the_tool_body_runs() -> None:
    handler = GuardCallbackHandler(limits=Limits(max_tool_calls=2), session_id="default")
    agent = create_agent(looping_model(), [lookup_order])
    with pytest.raises(StepLimitExceeded, match="cap on tool calls"):
        agent.invoke({"messages": [("user", "go")]}, config={"callbacks": [handler]})
    assert len(tool_runs) == 2
    assert handler.guard.usage("default").tool_calls == 2


async def test_create_agent_async_is_stopped_by_the_model_call_cap() -> None:
    llm = looping_model()
    handler = GuardCallbackHandler(limits=Limits(max_model_calls=3), session_id="async")
    agent = create_agent(llm, [lookup_order])
    with pytest.raises(StepLimitExceeded, match="cap on model calls"):
        await agent.ainvoke({"messages": [("user", "go")]}, config={"callbacks": [handler]})
    assert llm.calls == 3
    assert handler.guard.usage("async").model_calls == 3


def test_parallel_tool_calls_from_threads_are_counted_exactly() -> None:
    calls = [{"name": "lookup_order", "args": {"order_id": f"P{i}"}, "id": f"c{i}"}
             for i in range(8)]
    llm = ScriptedChatModel(model_name="gpt-4o",
                            responses=[AIMessage(content="", tool_calls=calls), "done"])
    handler = GuardCallbackHandler(limits=Limits(max_tool_calls=5), session_id="par")
    agent = create_agent(llm, [lookup_order])
    with pytest.raises(StepLimitExceeded):
        agent.invoke({"messages": [("user", "go")]}, config={"callbacks": [handler]})
    assert len(tool_runs) == 5  # the other three were refused before running
    assert handler.guard.usage("par").tool_calls == 5


class PlanState(TypedDict):
    task: str
    plan: str
    results: Annotated[list[str], operator.add]


def plan_and_execute(planner: ScriptedChatModel, worker: ScriptedChatModel, fanout: int):
    def plan(state: PlanState) -> dict:
        return {"plan": planner.invoke(f"Plan: {state['task']}").content}

    def route(state: PlanState) -> list[Send]:
        return [Send("execute", {"task": f"step {i}", "plan": state["plan"], "results": []})
                for i in range(fanout)]

    def execute(state: PlanState) -> dict:
        return {"results": [worker.invoke(f"Do {state['task']}").content]}

    builder = StateGraph(PlanState)
    builder.add_node("plan", plan)
    builder.add_node("execute", execute)
    builder.add_edge(START, "plan")
    builder.add_conditional_edges("plan", route, ["execute"])
    builder.add_edge("execute", END)
    return builder.compile(checkpointer=InMemorySaver())


def test_state_graph_caps_hold_across_invocations_of_a_thread() -> None:
    planner = ScriptedChatModel(model_name="gpt-4o-mini", responses=["1. a 2. b"])
    worker = ScriptedChatModel(model_name="gpt-4o", responses=["ok"], max_tokens=100)
    graph = plan_and_execute(planner, worker, fanout=3)
    guard = Guard(Limits(max_model_calls=6))
    handler = GuardCallbackHandler(guard, session_id="default")
    cfg = {"callbacks": [handler], "configurable": {"thread_id": "T"}}
    graph.invoke({"task": "ship it", "results": []}, cfg)
    assert guard.usage("T").model_calls == 4
    with pytest.raises(StepLimitExceeded):  # 4 + 1 + 3 > 6
        graph.invoke({"task": "again", "results": []}, cfg)
    assert guard.usage("T").model_calls == 6
    # a new thread starts fresh
    graph.invoke({"task": "new", "results": []},
                 {"callbacks": [handler], "configurable": {"thread_id": "U"}})
    assert guard.usage("U").model_calls == 4


async def test_state_graph_fan_out_async_never_overshoots_the_dollar_cap() -> None:
    planner = ScriptedChatModel(model_name="gpt-4o-mini", responses=["plan"], max_tokens=50)
    worker = ScriptedChatModel(model_name="gpt-4o", responses=["done " * 40], max_tokens=100,
                               latency_s=0.005)
    graph = plan_and_execute(planner, worker, fanout=50)
    guard = Guard(Limits(max_cost_usd="0.01"))
    handler = GuardCallbackHandler(guard, session_id="default")
    with pytest.raises(BudgetExceeded):
        await graph.ainvoke({"task": "t", "results": []},
                            {"callbacks": [handler], "configurable": {"thread_id": "F"}})
    # branches cancelled by the refusal release their holds as their cancellation
    # unwinds, which LangGraph does not wait for before raising: give them a moment
    for _ in range(200):
        if guard.usage("F").reserved_nano == 0:
            break
        await asyncio.sleep(0.01)
    usage = guard.usage("F")
    assert 0 < usage.cost_nano <= 10_000_000
    assert usage.reserved_nano == 0
    assert usage.model_calls == planner.calls + worker.calls
    assert worker.calls < 50


def test_legacy_text_completion_models_are_guarded_too() -> None:
    from langchain_core.language_models.fake import FakeListLLM

    records = []
    guard = Guard(Limits(max_model_calls=1), on_record=[records.append])
    llm = FakeListLLM(responses=["a completion of several words"])
    assert llm.invoke("complete this", config={"callbacks": [GuardCallbackHandler(guard,
                                                                                  session_id="default")]})
    with pytest.raises(StepLimitExceeded):
        llm.invoke("again", config={"callbacks": [GuardCallbackHandler(guard,
                                                                       session_id="default")]})
    [record] = records
    assert record.usage_estimated and record.usage.output_tokens > 0
    assert record.usage.input_tokens == guard.tokens.count_text("complete this", "unknown")
