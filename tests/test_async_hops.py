"""An async agent run under GuardMiddleware hands no work to a thread of its own.

Each hand-off to an executor thread wakes another thread and waits for it: on a loaded
machine that, not the instructions, is what an async path's overhead is made of. With a
ledger whose async operations are native (the memory ledger), GuardMiddleware's model
and tool calls add no executor submission to what LangChain itself makes for any
middleware with ``awrap_model_call`` / ``awrap_tool_call`` (its LangSmith ``traceable``
wrapper hands its setup and teardown to a thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain_core.messages import AIMessage
from langchain_core.tools import tool

from agent_guard import Guard, GuardMiddleware, Limits
from agent_guard.pricing import ToolPrice
from agent_guard.testing import ScriptedChatModel


@tool
def lookup(order: str) -> str:
    """Look up an order."""
    return f"order {order}: shipped"


class PassThrough(AgentMiddleware):
    """A middleware that does nothing but wrap the model and tool calls."""

    async def awrap_model_call(self, request: Any, handler: Any) -> Any:
        return await handler(request)

    async def awrap_tool_call(self, request: Any, handler: Any) -> Any:
        return await handler(request)

    async def abefore_model(self, state: Any, runtime: Any) -> None:
        return None


@tool
async def alookup(order: str) -> str:
    """Look up an order."""
    return f"order {order}: shipped"


def model(name: str = "lookup") -> ScriptedChatModel:
    return ScriptedChatModel(model_name="gpt-4o", max_tokens=100, responses=[
        AIMessage("", tool_calls=[{"name": name, "args": {"order": "A1"},
                                   "id": "call_1"}]),
        "A1 has shipped."])


@pytest.fixture
def submissions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    seen: list[Any] = []
    submit = concurrent.futures.ThreadPoolExecutor.submit

    def counting(self: Any, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        seen.append(fn)
        return submit(self, fn, *args, **kwargs)

    monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit", counting)
    yield seen


def hops(middleware: AgentMiddleware, submissions: list[Any], tool: Any = lookup) -> int:
    agent = create_agent(model(tool.name), [tool], middleware=[middleware])

    async def run() -> None:
        await agent.ainvoke({"messages": [("user", "where is A1?")]},
                            {"configurable": {"thread_id": "t-1"}})

    asyncio.run(run())  # warm: first-call paths
    submissions.clear()
    asyncio.run(run())
    return len(submissions)


@pytest.mark.parametrize("priced", [False, True])
@pytest.mark.parametrize("telemetry", [False, True])
@pytest.mark.parametrize("tool", [lookup, alookup], ids=["sync tool", "async tool"])
def test_async_middleware_runs_add_no_thread_hop(submissions: list[Any], tool: Any,
                                                  telemetry: bool, priced: bool) -> None:
    """``priced``: the tool has a price, so the middleware settles it at the end of the
    tool's own run (a handler of that run) and writes its cost there."""
    langchains_own = hops(PassThrough(), submissions, tool)
    extra: dict[str, Any] = {}
    if telemetry:
        pytest.importorskip("opentelemetry.sdk")
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.trace import TracerProvider

        from agent_guard.telemetry import GuardTelemetry

        extra["telemetry"] = GuardTelemetry(TracerProvider(), MeterProvider())
    guard = Guard(Limits(max_cost_usd=1),
                  tool_prices={tool.name: ToolPrice("0.01")} if priced else None)
    guarded = hops(GuardMiddleware(guard, **extra), submissions, tool)
    if priced:
        assert guard.usage("t-1").tool_calls == 2  # two runs, each settled
        assert guard.usage("t-1").reserved_nano == 0
    assert guarded == langchains_own
