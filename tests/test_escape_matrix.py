"""A refusal is a hard stop on every built-in path that retries, swallows or falls back.

Each case refuses a model or tool call with GuardCallbackHandler and checks that the
GuardError reaches the caller, the guard was asked once (no retry), and no fallback
model or tool body ran instead.
"""

from __future__ import annotations

from typing import Annotated, TypedDict

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import (
    ModelFallbackMiddleware,
    ModelRetryMiddleware,
    ToolRetryMiddleware,
)
from langchain.agents.middleware.tool_error import ToolErrorMiddleware
from langchain_core.messages import AIMessage, AnyMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode
from langgraph.types import RetryPolicy

from agent_guard import (
    BudgetExceeded,
    Guard,
    GuardCallbackHandler,
    GuardError,
    Limits,
    StepLimitExceeded,
)
from agent_guard.engine.admission import Admission, ModelCall
from agent_guard.testing import ScriptedChatModel

ran: list[str] = []


@tool
def work(x: int) -> str:
    """Do some work."""
    ran.append(f"work({x})")
    return "done"


class CountingGuard(Guard):
    """Counts how often the guard is asked, to prove nothing retried a refusal."""

    def __init__(self, limits: Limits) -> None:
        super().__init__(limits)
        self.model_asks = 0
        self.tool_asks = 0

    def before_model_call(self, call: ModelCall) -> Admission:
        self.model_asks += 1
        return super().before_model_call(call)

    def before_tool_call(self, session, tool=None, args=None, **kw):  # type: ignore[override]
        self.tool_asks += 1
        return super().before_tool_call(session, tool, args, **kw)


def tool_loop() -> ScriptedChatModel:
    def respond(messages):
        n = sum(isinstance(m, AIMessage) for m in messages)
        return AIMessage("", tool_calls=[{"name": "work", "args": {"x": n}, "id": f"c{n}"}])

    return ScriptedChatModel(model_name="gpt-4o", respond=respond, max_tokens=100)


@pytest.fixture(autouse=True)
def _clear():
    ran.clear()


def run_agent(middleware, limits: Limits, model=None):
    guard = CountingGuard(limits)
    agent = create_agent(model or tool_loop(), [work], middleware=middleware)
    with pytest.raises(GuardError) as info:
        agent.invoke({"messages": [("user", "go")]},
                     config={"callbacks": [GuardCallbackHandler(guard, session_id="default")]})
    return guard, info.value


def test_model_retry_middleware_does_not_retry_a_refusal() -> None:
    guard, err = run_agent([ModelRetryMiddleware(initial_delay=0, max_retries=3)],
                           Limits(max_model_calls=1))
    assert isinstance(err, StepLimitExceeded)
    assert guard.model_asks == 2  # the admitted call, then the refusal: asked once, no retry


def test_model_fallback_middleware_does_not_answer_a_refusal() -> None:
    fallback = ScriptedChatModel(model_name="gpt-4o-mini", responses=["fallback answer"])
    guard, err = run_agent([ModelFallbackMiddleware(fallback)], Limits(max_model_calls=1))
    assert isinstance(err, StepLimitExceeded)
    assert fallback.calls == 0
    assert guard.model_asks == 2


def test_tool_retry_middleware_does_not_retry_a_refused_tool() -> None:
    guard, err = run_agent([ToolRetryMiddleware(initial_delay=0, max_retries=3)],
                           Limits(max_tool_calls=1))
    assert isinstance(err, StepLimitExceeded)
    assert ran == ["work(0)"] and guard.tool_asks == 2


def test_tool_error_middleware_does_not_swallow_a_refusal() -> None:
    guard, err = run_agent([ToolErrorMiddleware(on_error=lambda exc, req: f"Error: {exc}")],
                           Limits(max_tool_calls=1))
    assert isinstance(err, StepLimitExceeded)
    assert ran == ["work(0)"] and guard.tool_asks == 2


class Messages(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def test_tool_node_with_handle_tool_errors_does_not_swallow_a_refusal() -> None:
    llm = tool_loop()
    builder = StateGraph(Messages)
    builder.add_node("model", lambda s: {"messages": [llm.invoke(s["messages"])]})
    builder.add_node("tools", ToolNode([work], handle_tool_errors=True))
    builder.add_edge(START, "model")
    builder.add_edge("model", "tools")
    builder.add_edge("tools", "model")
    guard = CountingGuard(Limits(max_tool_calls=2))
    with pytest.raises(StepLimitExceeded):
        builder.compile().invoke({"messages": [("user", "go")]},
                                 {"callbacks": [GuardCallbackHandler(guard, session_id="default")],
                                  "recursion_limit": 50})
    assert ran == ["work(0)", "work(1)"] and guard.tool_asks == 3


def test_with_fallbacks_does_not_answer_a_refusal() -> None:
    primary = ScriptedChatModel(model_name="gpt-4o", responses=["primary"], max_tokens=4000)
    cheap = ScriptedChatModel(model_name="gpt-4o-mini", responses=["cheap"], max_tokens=10)
    guard = CountingGuard(Limits(max_cost_usd="0.01"))  # 4000 gpt-4o tokens do not fit
    with pytest.raises(BudgetExceeded) as info:
        primary.with_fallbacks([cheap]).invoke(
            "hi", config={"callbacks": [GuardCallbackHandler(guard, session_id="default")]})
    assert info.value.dimension == "usd_nano"
    assert primary.calls == 0 and cheap.calls == 0  # the cheap fallback would have fit


async def test_with_fallbacks_does_not_answer_a_refusal_async() -> None:
    primary = ScriptedChatModel(model_name="gpt-4o", responses=["primary"], max_tokens=4000)
    cheap = ScriptedChatModel(model_name="gpt-4o-mini", responses=["cheap"], max_tokens=10)
    guard = CountingGuard(Limits(max_cost_usd="0.01"))
    with pytest.raises(BudgetExceeded):
        await primary.with_fallbacks([cheap]).ainvoke(
            "hi", config={"callbacks": [GuardCallbackHandler(guard, session_id="default")]})
    assert primary.calls == 0 and cheap.calls == 0


def graph_with(retry: RetryPolicy | None = None, error_handler=None):
    llm = ScriptedChatModel(model_name="gpt-4o", responses=["answer"], max_tokens=100)
    handled: list[str] = []

    def call_model(state: Messages) -> dict:
        ran.append("node")
        return {"messages": [llm.invoke(state["messages"])]}

    builder = StateGraph(Messages)
    kwargs = {}
    if retry is not None:
        kwargs["retry_policy"] = retry
    if error_handler is not None:
        def on_error(state: Messages) -> dict:
            handled.append("handled")
            return {"messages": [AIMessage("recovered")]}
        kwargs["error_handler"] = on_error
    builder.add_node("model", call_model, **kwargs)
    builder.add_edge(START, "model")
    builder.add_edge("model", END)
    return builder.compile(), llm, handled


def test_langgraph_default_retry_policy_does_not_retry_a_refusal() -> None:
    graph, llm, _ = graph_with(retry=RetryPolicy(initial_interval=0.0, max_attempts=3))
    guard = CountingGuard(Limits(max_model_calls=0))
    with pytest.raises(StepLimitExceeded):
        graph.invoke({"messages": [("user", "go")]}, {"callbacks": [GuardCallbackHandler(guard,
                                                                                         session_id="default")]})
    assert ran == ["node"] and guard.model_asks == 1 and llm.calls == 0


def test_node_error_handler_does_not_recover_from_a_refusal() -> None:
    graph, llm, handled = graph_with(error_handler=True)
    guard = CountingGuard(Limits(max_model_calls=0))
    with pytest.raises(StepLimitExceeded):
        graph.invoke({"messages": [("user", "go")]}, {"callbacks": [GuardCallbackHandler(guard,
                                                                                         session_id="default")]})
    assert handled == [] and llm.calls == 0


async def test_async_paths_escape_too() -> None:
    guard = CountingGuard(Limits(max_model_calls=1))
    agent = create_agent(tool_loop(), [work],
                         middleware=[ModelRetryMiddleware(initial_delay=0, max_retries=3)])
    with pytest.raises(StepLimitExceeded):
        await agent.ainvoke({"messages": [("user", "go")]},
                            config={"callbacks": [GuardCallbackHandler(guard,
                                                                       session_id="default")]})
    assert guard.model_asks == 2


def test_with_fallbacks_inside_a_graph_node_does_not_answer_a_refusal() -> None:
    primary = ScriptedChatModel(model_name="gpt-4o", responses=["primary"], max_tokens=4000)
    cheap = ScriptedChatModel(model_name="gpt-4o-mini", responses=["cheap"], max_tokens=10)
    chain = primary.with_fallbacks([cheap])
    builder = StateGraph(Messages)
    builder.add_node("model", lambda s: {"messages": [chain.invoke(s["messages"])]})
    builder.add_edge(START, "model")
    builder.add_edge("model", END)
    guard = CountingGuard(Limits(max_cost_usd="0.01"))
    with pytest.raises(BudgetExceeded):
        builder.compile().invoke({"messages": [("user", "go")]},
                                 {"callbacks": [GuardCallbackHandler(guard, session_id="default")]})
    assert primary.calls == 0 and cheap.calls == 0


def test_your_own_code_may_still_catch_a_refusal_and_choose_a_cheaper_model() -> None:
    strong = ScriptedChatModel(model_name="gpt-4o", responses=["strong"], max_tokens=4000)
    cheap = ScriptedChatModel(model_name="gpt-4o-mini", responses=["cheap"], max_tokens=10)

    def model(state: Messages) -> dict:
        try:
            answer = strong.invoke(state["messages"])
        except BudgetExceeded:
            answer = cheap.invoke(state["messages"])
        return {"messages": [answer]}

    builder = StateGraph(Messages)
    builder.add_node("model", model)
    builder.add_edge(START, "model")
    builder.add_edge("model", END)
    out = builder.compile().invoke(
        {"messages": [("user", "go")]},
        {"callbacks": [GuardCallbackHandler(CountingGuard(Limits(max_cost_usd="0.01")),
                                            session_id="default")]})
    assert out["messages"][-1].content == "cheap" and strong.calls == 0
