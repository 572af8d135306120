"""An unpriced tool run again inside GuardMiddleware (``ToolRetryMiddleware`` after a
failure) is counted per run, as ``GuardCallbackHandler`` counts it: a tool-call cap
holds per run, and a run past it is refused before it runs. Without a tool-call cap
or telemetry, the middleware leaves the tool as it is (nothing to count per run)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import ToolRetryMiddleware
from langchain_core.messages import AIMessage
from langchain_core.tools import tool

from agent_guard import Guard, GuardCallbackHandler, GuardMiddleware, Limits
from agent_guard.engine.budgets import Budgets
from agent_guard.engine.records import CallRecord
from agent_guard.errors import StepLimitExceeded
from agent_guard.testing import ScriptedChatModel

SESSION = "unpriced-retry"


class Flaky:
    """An unpriced tool that fails its first ``fails`` runs."""

    def __init__(self, fails: int) -> None:
        self.runs = 0

        @tool
        def lookup(query: str) -> str:
            """Look up an order."""
            self.runs += 1
            if self.runs <= fails:
                raise RuntimeError("orders API: 503")
            return "shipped"

        self.tool = lookup


def _agent(flaky: Flaky, middleware: list[Any], retries: int) -> Any:
    answers = iter([AIMessage("", tool_calls=[{"name": "lookup", "args": {"query": "A1"},
                                               "id": "c1"}]), AIMessage("done")])
    model = ScriptedChatModel(model_name="gpt-4o", respond=lambda m: next(answers))
    return create_agent(model, [flaky.tool], middleware=[
        *middleware, ToolRetryMiddleware(max_retries=retries, initial_delay=0, jitter=False)])


def _run(agent: Any, mode: str, config: Any = None) -> Any:
    inputs = {"messages": [("user", "where is A1?")]}
    if mode == "sync":
        return agent.invoke(inputs, config=config)
    return asyncio.run(agent.ainvoke(inputs, config=config))


def _counted(adapter: str, mode: str, limits: Any) -> tuple[int, list[tuple[str, str]]]:
    """(tool calls the ledger counted, each tool record's (tool, outcome))."""
    flaky = Flaky(fails=1)
    records: list[CallRecord] = []
    guard = Guard(limits, on_record=[records.append])
    if adapter == "middleware":
        _run(_agent(flaky, [GuardMiddleware(guard, session_id=SESSION)], 1), mode)
    else:
        _run(_agent(flaky, [], 1), mode,
             {"callbacks": [GuardCallbackHandler(guard, session_id=SESSION)]})
    assert flaky.runs == 2
    return guard.usage(SESSION).tool_calls, [(r.tool or "", r.outcome) for r in records
                                            if r.kind == "tool"]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("limits", [
    Limits(max_tool_calls=10),
    Limits(max_tool_calls={"lookup": 10}),
    Budgets(Limits(max_cost_usd=1), global_=Limits(max_tool_calls=10)),
    Limits(max_repeats=5),
], ids=["session-cap", "per-tool-cap", "global-scope-cap", "repeats-cap"])
def test_a_retried_unpriced_tool_is_counted_per_run_as_under_the_callback(
        mode: str, limits: Any) -> None:
    """One call run twice (fails, then answers): two tool calls counted and two records
    (error, ok) under the middleware, as under the callback."""
    middleware = _counted("middleware", mode, limits)
    assert middleware == _counted("callback", mode, limits)
    assert middleware[0] == 2
    assert sorted(middleware[1]) == [("lookup", "error"), ("lookup", "ok")]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_unpriced_tool_retry_past_the_cap_is_refused_before_it_runs(mode: str) -> None:
    """Two tool calls allowed: the third run ToolRetryMiddleware asks for is refused
    before it runs (the refusal reaches the caller, not retried)."""
    flaky = Flaky(fails=5)
    guard = Guard(Limits(max_tool_calls=2))
    agent = _agent(flaky, [GuardMiddleware(guard, session_id=SESSION)], 4)
    with pytest.raises(StepLimitExceeded):
        _run(agent, mode)
    assert flaky.runs == 2
    assert guard.usage(SESSION).tool_calls == 2


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_without_a_tool_cap_the_unpriced_tool_is_left_as_it_is(mode: str) -> None:
    """No tool-call cap, no telemetry: the middleware hands the tool on unchanged (no
    per-run gate to pay for); the call is counted once, as before."""
    flaky = Flaky(fails=0)
    seen: list[Any] = []

    from langchain.agents.middleware import AgentMiddleware

    class Spy(AgentMiddleware):
        def wrap_tool_call(self, request: Any, handler: Any) -> Any:
            seen.append(request.tool)
            return handler(request)

        async def awrap_tool_call(self, request: Any, handler: Any) -> Any:
            seen.append(request.tool)
            return await handler(request)

    guard = Guard(Limits(max_cost_usd=1))
    _run(_agent(flaky, [GuardMiddleware(guard, session_id=SESSION), Spy()], 0), mode)
    assert seen == [flaky.tool] and seen[0] is flaky.tool
    assert guard.usage(SESSION).tool_calls == 1
