"""ModelRouter: roles, rules, budget-aware downgrade, retries and fallbacks, and the
chat-model surface, checked against the requests a local OpenAI server received."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from decimal import Decimal
from typing import Annotated, TypedDict

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, AnyMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from pydantic import BaseModel

from agent_guard import (
    BudgetExceeded,
    Guard,
    GuardCallbackHandler,
    Limits,
    ModelRouter,
    guarded_graph,
)
from agent_guard.engine.usage import usd_to_nano
from agent_guard.routing import has_tools, mentions, prompt_tokens_above, when
from agent_guard.testing import FakeOpenAIServer, FakeReply

MINI_IN, MINI_OUT = Decimal("1.5e-07"), Decimal("6e-07")
FOUR_IN, FOUR_OUT = Decimal("2.5e-06"), Decimal("1e-05")
PROMPT, COMPLETION = 300, 50


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer([FakeReply("ok", prompt_tokens=PROMPT,
                                     completion_tokens=COMPLETION)]) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _quiet(caplog):
    caplog.set_level(logging.ERROR, logger="langchain_core.callbacks.manager")


def tiers(server: FakeOpenAIServer, max_tokens: int = 100) -> dict[str, ChatOpenAI]:
    def chat(name: str) -> ChatOpenAI:
        return ChatOpenAI(model=name, base_url=server.base_url, api_key="k", max_retries=0,
                          max_tokens=max_tokens)

    return {"cheap": chat("gpt-4o-mini"), "strong": chat("gpt-4o")}


def router_for(server: FakeOpenAIServer, **kw) -> ModelRouter:
    kw.setdefault("roles", {"planner": "cheap", "executor": "strong"})
    kw.setdefault("default", "strong")
    return ModelRouter(tiers=tiers(server), **kw)


def sent_models(server: FakeOpenAIServer) -> list[str]:
    return [r["model"] for r in server.requests]


class PlanState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    steps: int


def test_plan_and_execute_routes_by_node_and_costs_add_up(server: FakeOpenAIServer) -> None:
    router = router_for(server)

    def planner(state: PlanState) -> dict:
        return {"messages": [router.invoke(state["messages"])], "steps": 0}

    def executor(state: PlanState) -> dict:
        return {"messages": [router.invoke(state["messages"])], "steps": state["steps"] + 1}

    builder = StateGraph(PlanState)
    builder.add_node("planner", planner)
    builder.add_node("executor", executor)
    builder.add_edge(START, "planner")
    builder.add_edge("planner", "executor")
    builder.add_conditional_edges("executor", lambda s: "executor" if s["steps"] < 3 else END,
                                  ["executor", END])
    guard = Guard(Limits(max_cost_usd=1))
    records: list = []
    guard.add_record_hook(records.append)
    app = guarded_graph(builder, guard=guard, router=router)
    app.invoke({"messages": [("user", "ship the feature")], "steps": 0},
               {"configurable": {"thread_id": "pe"}})
    assert sent_models(server) == ["gpt-4o-mini", "gpt-4o", "gpt-4o", "gpt-4o"]
    assert [(r.node, r.tier) for r in records] == [
        ("planner", "cheap"), ("executor", "strong"), ("executor", "strong"),
        ("executor", "strong")]
    assert records[0].route == "langgraph node 'planner'"
    expected = (usd_to_nano(PROMPT * MINI_IN + COMPLETION * MINI_OUT)
                + 3 * usd_to_nano(PROMPT * FOUR_IN + COMPLETION * FOUR_OUT))
    assert guard.usage("pe").cost_nano == expected


def test_the_inverse_mapping_is_one_line(server: FakeOpenAIServer) -> None:
    router = router_for(server, roles={"planner": "strong", "executor": "cheap"})
    router.invoke("plan", config={"metadata": {"langgraph_node": "planner"}})
    router.invoke("do", config={"tags": ["executor"]})
    router.invoke("do", config={"configurable": {"role": "cheap"}})
    assert sent_models(server) == ["gpt-4o", "gpt-4o-mini", "gpt-4o-mini"]


def test_complexity_rules_and_classifier(server: FakeOpenAIServer) -> None:
    router = router_for(server, default="cheap", rules=[
        prompt_tokens_above(200) >> "strong",
        (mentions("prove", "derive") & ~has_tools()) >> "strong",
    ])
    router.invoke("hello")
    router.invoke("please prove this lemma")
    router.invoke("word " * 400)
    decision = router.route("x " * 500)
    assert decision.tier == "strong" and decision.reason == "rule prompt_tokens_above(200)"
    assert sent_models(server) == ["gpt-4o-mini", "gpt-4o", "gpt-4o"]
    picky = router_for(server, default="strong",
                       classifier=lambda ctx: "cheap" if len(ctx.text) < 20 else None,
                       rules=[when(lambda c: "urgent" in c.text, "urgent") >> "strong"])
    assert picky.route("hi").reason == "classifier"
    assert picky.route("urgent: hi").reason == "rule urgent"


def test_downgrade_happens_exactly_when_the_remaining_budget_crosses_the_threshold(
        server: FakeOpenAIServer) -> None:
    guard = Guard(Limits(max_cost_usd="0.02"))
    router = router_for(server, guard=guard, downgrade_below_usd="0.008")
    handler = GuardCallbackHandler(guard, session_id="default")
    expected, records = [], []
    guard.add_record_hook(records.append)
    for _ in range(12):
        u = guard.usage("d")
        remaining = u.cap_nano - u.cost_nano
        expected.append("gpt-4o" if remaining >= 8_000_000 else "gpt-4o-mini")
        router.invoke("execute the next step", config={
            "callbacks": [handler], "tags": ["executor"], "metadata": {"session_id": "d"}})
    assert sent_models(server) == expected
    assert "gpt-4o" in expected and expected[-1] == "gpt-4o-mini"
    first_cheap = expected.index("gpt-4o-mini")
    assert records[first_cheap].tier == "cheap" and "downgraded from 'strong'" in (
        records[first_cheap].route or "")
    assert guard.usage("d").cost_nano <= 20_000_000


def test_strong_tier_that_does_not_fit_steps_down(server: FakeOpenAIServer) -> None:
    guard = Guard(Limits(max_cost_usd="0.001"))  # 100 gpt-4o output tokens alone cost $0.001
    router = router_for(server, guard=guard)
    decision = router.route("go", {"tags": ["executor"], "metadata": {"session_id": "s"}})
    assert decision.tier == "cheap" and decision.downgraded
    assert set(decision.estimates_usd) == {"cheap", "strong"}
    assert decision.estimates_usd["strong"] > Decimal("0.001") > decision.estimates_usd["cheap"]


def test_a_429_from_the_strong_tier_falls_back_to_the_cheap_one() -> None:
    def by_model(body: dict) -> FakeReply:
        if body["model"] == "gpt-4o":
            return FakeReply(status=429)
        return FakeReply("cheap answer", prompt_tokens=10, completion_tokens=2)

    with FakeOpenAIServer(by_model) as srv:
        guard = Guard(Limits(max_cost_usd=1))
        records: list = []
        guard.add_record_hook(records.append)
        router = router_for(srv, retry_attempts=2, retry_initial_delay=0.01)
        out = router.invoke("hi", config={"callbacks": [GuardCallbackHandler(guard,
                                                                             session_id="default")]})
        assert out.content == "cheap answer"
        assert sent_models(srv) == ["gpt-4o", "gpt-4o", "gpt-4o-mini"]  # retried, then fell
        assert [r.outcome for r in records] == ["error", "error", "ok"]
        assert records[-1].tier == "cheap"
        assert "fallback after OpenAIRateLimitError from 'strong'" in (records[-1].route or "")
        assert guard.usage("default").cost_nano == records[-1].cost_nano


def test_a_guard_refusal_is_never_retried_nor_answered_by_a_cheaper_tier(
        server: FakeOpenAIServer) -> None:
    guard = Guard(Limits(max_cost_usd="0.0001"))  # the cheap tier fits, the strong one does not
    router = router_for(server, retry_attempts=3)  # no guard: it cannot step down itself
    with pytest.raises(BudgetExceeded):
        router.invoke("hi", config={"callbacks": [GuardCallbackHandler(guard,
                                                                       session_id="default")]})
    assert server.request_count == 0


def test_bind_tools_structured_output_stream_batch_and_async(server: FakeOpenAIServer) -> None:
    router = router_for(server)

    class Answer(BaseModel):
        answer: str

    server._replies = [FakeReply(tool_calls=[{"name": "Answer", "arguments": {"answer": "42"}}])]
    assert router.with_structured_output(Answer).invoke("q").answer == "42"
    assert "tools" in server.requests[-1]
    server._replies = [FakeReply("streamed text", prompt_tokens=5, completion_tokens=2)]
    chunks = list(router.stream("q", config={"tags": ["planner"]}))
    assert "".join(str(c.content) for c in chunks) == "streamed text"
    assert server.requests[-1]["model"] == "gpt-4o-mini" and server.requests[-1]["stream"]
    assert [m.content for m in router.batch(["a", "b"])] == ["streamed text"] * 2


async def test_async_paths(server: FakeOpenAIServer) -> None:
    router = router_for(server)
    out = await router.ainvoke("q", config={"tags": ["planner"]})
    assert out.content == "ok" and server.requests[-1]["model"] == "gpt-4o-mini"
    chunks = [c async for c in router.astream("q")]
    assert "".join(str(c.content) for c in chunks) == "ok"
    assert server.requests[-1]["model"] == "gpt-4o"


@tool
def double(x: int) -> int:
    """Double a number."""
    return 2 * x


def test_binding_tools_does_not_leak_into_the_unbound_router(server: FakeOpenAIServer) -> None:
    router = router_for(server)
    router.invoke("plain")
    router.bind_tools([double]).invoke("with tools")
    router.invoke("plain again")
    assert ["tools" in r for r in server.requests] == [False, True, False]


def test_router_drives_create_agent(server: FakeOpenAIServer) -> None:
    server._replies = [FakeReply(tool_calls=[{"name": "double", "arguments": {"x": 2}}]),
                       FakeReply("4")]
    router = router_for(server, roles={"calc": "cheap"})
    agent = create_agent(router, [double], name="calc")
    out = agent.invoke({"messages": [("user", "double 2")]})
    assert out["messages"][-1].content == "4"
    assert sent_models(server) == ["gpt-4o-mini", "gpt-4o-mini"]  # routed by agent name
    assert server.requests[0]["tools"][0]["function"]["name"] == "double"
    assert isinstance(out["messages"][1], AIMessage)


def test_bad_configuration_is_refused(server: FakeOpenAIServer) -> None:
    with pytest.raises(ValueError, match="names tier 'huge'"):
        ModelRouter(tiers=tiers(server), roles={"planner": "huge"})
    with pytest.raises(ValueError, match="at least one tier"):
        ModelRouter(tiers={})
