"""GuardMiddleware in create_agent, and the step-limit features: repeats, per-tool caps,
soft thresholds."""

from __future__ import annotations

import logging
from decimal import Decimal

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from agent_guard import (
    BudgetExceeded,
    Guard,
    GuardCallbackHandler,
    GuardMiddleware,
    Limits,
    LoopDetected,
    StepLimitExceeded,
)
from agent_guard.engine.admission import ModelCall
from agent_guard.engine.thresholds import ThresholdEvent
from agent_guard.testing import ScriptedChatModel

runs: list[str] = []


@tool
def search(query: str) -> str:
    """Search the web."""
    runs.append(f"search:{query}")
    return "nothing new"


@tool
def lookup(key: str) -> str:
    """Look something up."""
    runs.append(f"lookup:{key}")
    return "value"


def looping(same_args: bool = False, tool_name: str = "search") -> ScriptedChatModel:
    def respond(messages):
        n = sum(isinstance(m, AIMessage) for m in messages)
        arg = "same" if same_args else f"q{n}"
        key = "query" if tool_name == "search" else "key"
        return AIMessage("", tool_calls=[{"name": tool_name, "args": {key: arg},
                                          "id": f"c{n}"}])

    return ScriptedChatModel(model_name="gpt-4o", respond=respond, max_tokens=200)


@pytest.fixture(autouse=True)
def _clear(caplog):
    runs.clear()
    caplog.set_level(logging.ERROR, logger="langchain_core.callbacks.manager")


def agent_with(mw: GuardMiddleware, llm: ScriptedChatModel | None = None, **kw):
    return create_agent(llm or looping(), [search, lookup], middleware=[mw], **kw)


CFG = {"configurable": {"thread_id": "t"}}


def test_end_answers_with_the_reason_and_holds_the_cap() -> None:
    llm = looping()
    mw = GuardMiddleware(limits=Limits(max_cost_usd="0.01"), on_exceed="end",
                         shrink_to_fit=False, session_id="default")
    out = agent_with(mw, llm).invoke({"messages": [("user", "go")]}, CFG)
    last = out["messages"][-1]
    assert last.name == "agent-guard" and "BudgetExceeded" in last.content
    usage = mw.guard.usage("t")
    assert usage.cost_usd <= Decimal("0.01") and usage.reserved_nano == 0
    assert usage.model_calls == llm.calls and usage.tool_calls == len(runs)


def test_raise_reaches_the_caller() -> None:
    mw = GuardMiddleware(limits=Limits(max_model_calls=2), session_id="default")
    with pytest.raises(StepLimitExceeded):
        agent_with(mw).invoke({"messages": [("user", "go")]}, CFG)


def test_shrink_to_fit_lowers_max_tokens_instead_of_refusing() -> None:
    records = []
    guard = Guard(Limits(max_cost_usd="0.002", input_margin=0, min_output_tokens=10),
                  on_record=[records.append])
    llm = ScriptedChatModel(model_name="gpt-4o", responses=["word " * 400], max_tokens=400)
    out = agent_with(GuardMiddleware(guard), llm).invoke({"messages": [("user", "talk")]}, CFG)
    [record] = records
    assert record.max_output_tokens < 400  # shrunk to what $0.002 covers
    assert record.usage.output_tokens == record.max_output_tokens  # the model was told
    assert out["messages"][-1].response_metadata["finish_reason"] == "length"
    assert guard.usage("t").cost_nano <= 2_000_000


def test_interrupt_then_extend_then_stop() -> None:
    llm = looping()
    mw = GuardMiddleware(limits=Limits(max_model_calls=2), on_exceed="interrupt",
                         session_id="default")
    agent = agent_with(mw, llm, checkpointer=InMemorySaver())
    paused = agent.invoke({"messages": [("user", "go")]}, CFG)
    assert paused["__interrupt__"][0].value["dimension"] == "model_calls"
    assert llm.calls == 2
    paused = agent.invoke(Command(resume={"extend_model_calls": 1}), CFG)
    assert llm.calls == 3 and paused["__interrupt__"]
    out = agent.invoke(Command(resume={"stop": True}), CFG)
    assert out["messages"][-1].name == "agent-guard" and llm.calls == 3


async def test_async_end_and_tool_caps() -> None:
    mw = GuardMiddleware(limits=Limits(max_tool_calls={"*": 10, "search": 2}), on_exceed="end",
                         session_id="default")
    out = await agent_with(mw).ainvoke({"messages": [("user", "go")]}, CFG)
    assert runs == ["search:q0", "search:q1"]
    assert out["messages"][-1].name == "agent-guard"
    assert "calls of tool 'search'" in out["messages"][-1].content


def test_thread_counts_persist_across_invocations() -> None:
    mw = GuardMiddleware(limits=Limits(max_model_calls=3), on_exceed="end", session_id="default")
    agent = agent_with(mw, looping(), checkpointer=InMemorySaver())
    agent.invoke({"messages": [("user", "go")]}, CFG)
    assert mw.guard.usage("t").model_calls == 3
    out = agent.invoke({"messages": [("user", "again")]}, CFG)
    assert out["messages"][-1].name == "agent-guard"
    assert mw.guard.usage("t").model_calls == 3
    agent.invoke({"messages": [("user", "go")]}, {"configurable": {"thread_id": "other"}})
    assert mw.guard.usage("other").model_calls == 3


@pytest.mark.parametrize("adapter", ["callback", "middleware"])
def test_a_repeated_identical_tool_call_is_stopped_at_max_repeats(adapter: str) -> None:
    limits = Limits(max_repeats=3)
    llm = looping(same_args=True)
    if adapter == "callback":
        agent = create_agent(llm, [search, lookup])
        with pytest.raises(LoopDetected) as info:
            agent.invoke({"messages": [("user", "go")]},
                         {"callbacks": [GuardCallbackHandler(limits=limits, session_id="default")]})
        assert "repeating the same tool call" in str(info.value)
    else:
        with pytest.raises(LoopDetected):
            agent_with(GuardMiddleware(limits=limits, session_id="default"), llm).invoke(
                {"messages": [("user", "go")]}, CFG)
    assert runs == ["search:same"] * 3


def test_different_arguments_are_not_repeats() -> None:
    handler = GuardCallbackHandler(limits=Limits(max_repeats=1, max_tool_calls=6),
                                   session_id="default")
    with pytest.raises(StepLimitExceeded) as info:
        create_agent(looping(), [search]).invoke({"messages": [("user", "go")]},
                                                 {"callbacks": [handler]})
    assert not isinstance(info.value, LoopDetected)
    assert len(runs) == 6


def test_soft_thresholds_fire_once_per_session_and_threshold(tmp_path, caplog) -> None:
    events: list[ThresholdEvent] = []
    url = f"sqlite:///{tmp_path / 'g.db'}"
    limits = Limits(max_model_calls=10)
    first = Guard(limits, url, on_threshold=[events.append])
    second = Guard(limits, url, on_threshold=[events.append])  # another process, same ledger
    caplog.set_level(logging.WARNING, logger="agent_guard")
    for i in range(10):
        guard = first if i % 2 else second
        agent = create_agent(ScriptedChatModel(model_name="gpt-4o", responses=["done"]), [])
        agent.invoke({"messages": [("user", "hi")]},
                     {"callbacks": [GuardCallbackHandler(guard, session_id="default")],
                      "configurable": {"thread_id": "s"}})
    got = [(e.dimension, e.threshold, e.spent) for e in events]
    assert got == [("model_calls", 0.5, 5), ("model_calls", 0.8, 8), ("model_calls", 1.0, 10)]
    assert "used 80% of its model calls cap" in caplog.text
    with pytest.raises(StepLimitExceeded):
        first.before_model_call(ModelCall(session="s", model="gpt-4o", input_tokens=1))


def test_dollar_thresholds_and_budget_refusal_message() -> None:
    events: list[ThresholdEvent] = []
    guard = Guard(Limits(max_cost_usd="0.01", thresholds=(0.25,)), on_threshold=[events.append])
    with pytest.raises(BudgetExceeded):
        create_agent(looping(), [search]).invoke(
            {"messages": [("user", "go")]}, {"callbacks": [GuardCallbackHandler(guard,
                                                                                session_id="default")]})
    assert len(events) == 1 and events[0].dimension == "usd_nano"
    assert events[0].spent >= 2_500_000 and "25%" in str(events[0])
