"""The ToolMessage that answers a tool call the guard stopped tells the model the truth:
"Not run" only for a call refused before its tool started; a call stopped while its tool
ran (a model call inside the tool refused) is answered "Stopped", on both adapters."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, TypedDict

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, AnyMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode

from agent_guard import Guard, GuardCallbackHandler, GuardMiddleware, Limits, guarded_graph
from agent_guard.testing import ScriptedChatModel

SESSION = "tool-stops"


class Asks:
    """A tool that asks a model (its call is the one the guard refuses) and counts its
    runs."""

    def __init__(self) -> None:
        self.runs = 0
        inner = ScriptedChatModel(model_name="gpt-4o", responses=["inner"], max_tokens=20)

        @tool
        def ask(question: str) -> str:
            """Ask another model."""
            self.runs += 1
            return str(inner.invoke(question).content)

        self.tool = ask


def _outer() -> ScriptedChatModel:
    answers = iter([AIMessage("", tool_calls=[{"name": "ask", "args": {"question": "q"},
                                               "id": "c1"}]), AIMessage("done")])
    return ScriptedChatModel(model_name="gpt-4o", max_tokens=20,
                             respond=lambda m: next(answers))


def _answer(messages: list[Any]) -> str:
    [answer] = [m for m in messages if isinstance(m, ToolMessage) and m.tool_call_id == "c1"]
    return str(answer.content)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("refused", ["inside", "before"])
def test_the_middleware_answers_not_run_only_for_a_tool_that_did_not_start(
        refused: str, mode: str) -> None:
    asks = Asks()
    limits = Limits(max_model_calls=1) if refused == "inside" else Limits(max_tool_calls=0)
    guard = Guard(limits)
    agent = create_agent(_outer(), [asks.tool], middleware=[
        GuardMiddleware(guard, session_id=SESSION, on_exceed="end")])
    inputs = {"messages": [("user", "go")]}
    # the model call inside the tool is the middleware's to see only through a handler
    config = {"callbacks": [GuardCallbackHandler(guard, session_id=SESSION)]}
    out = agent.invoke(inputs, config) if mode == "sync" else asyncio.run(
        agent.ainvoke(inputs, config))
    answer = _answer(out["messages"])
    if refused == "inside":
        assert asks.runs == 1
        assert answer.startswith("Stopped: ") and "Not run" not in answer, answer
    else:
        assert asks.runs == 0
        assert answer.startswith("Not run: "), answer


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_guarded_graph_answers_a_tool_stopped_while_it_ran_as_stopped(mode: str) -> None:
    asks = Asks()
    outer = _outer()

    def agent(state: State) -> dict[str, Any]:
        return {"messages": [outer.invoke(state["messages"])]}

    builder = StateGraph(State)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([asks.tool]))
    builder.add_edge(START, "agent")
    builder.add_edge("agent", "tools")
    builder.add_edge("tools", END)
    app = guarded_graph(builder, limits=Limits(max_model_calls=1), on_exceed="end",
                        session_id=SESSION)
    inputs = {"messages": [("user", "go")]}
    out = app.invoke(inputs) if mode == "sync" else asyncio.run(app.ainvoke(inputs))
    assert asks.runs == 1
    answer = _answer(out["messages"])
    assert answer.startswith("Stopped: ") and "Not run" not in answer, answer
