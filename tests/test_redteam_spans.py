"""Red-team paths for GuardMiddleware's spans: every agent run it traces ends its
``invoke_agent`` span, whichever way the run ends, and its spans hang under it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent_guard import Guard, GuardMiddleware, Limits
from agent_guard.telemetry import GuardTelemetry
from agent_guard.testing import ScriptedChatModel

SESSION = "redteam-spans"



def _telemetry() -> tuple[GuardTelemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return GuardTelemetry(provider, MeterProvider()), exporter


def _model(tool_calls: int, tool_name: str = "work") -> ScriptedChatModel:
    def respond(messages: list[Any]) -> AIMessage:
        k = sum(isinstance(m, AIMessage) for m in messages)
        if k < tool_calls:
            return AIMessage("", tool_calls=[{"name": tool_name, "args": {"x": k},
                                              "id": f"c{k}"}])
        return AIMessage("done")

    return ScriptedChatModel(model_name="gpt-4o", respond=respond, max_tokens=50)


@tool
def work(x: int) -> str:
    """Work."""
    return "ok"


@tool
def boom(x: int) -> str:
    """Fail."""
    raise RuntimeError("tool failed")


@tool
async def slow(x: int) -> str:
    """Take long."""
    await asyncio.sleep(30)
    return "ok"


def _agent(tools: list[Any], model: Any, telemetry: GuardTelemetry) -> Any:
    guard = Guard(Limits(max_cost_usd=1))
    return create_agent(model, tools, middleware=[
        GuardMiddleware(guard, session_id=SESSION, telemetry=telemetry)])


def _check_tree(telemetry: GuardTelemetry, exporter: InMemorySpanExporter) -> None:
    spans = exporter.get_finished_spans()
    ids = {s.context.span_id for s in spans}
    orphans = [s.name for s in spans if s.parent is not None and s.parent.span_id not in ids]
    agents = [s.name for s in spans if s.name.startswith("invoke_agent")]
    assert (telemetry.open_spans(), orphans, len(agents)) == (0, [], 1)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_run_failing_in_a_tool_ends_its_agent_span(mode: str) -> None:
    telemetry, exporter = _telemetry()
    agent = _agent([boom], _model(1, "boom"), telemetry)
    inputs = {"messages": [("user", "go")]}
    with pytest.raises(RuntimeError, match="tool failed"):
        if mode == "sync":
            agent.invoke(inputs)
        else:
            asyncio.run(agent.ainvoke(inputs))
    _check_tree(telemetry, exporter)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_broken_off_ends_its_agent_span(mode: str) -> None:
    """No hook of the middleware runs when the caller closes the stream between two
    steps: the span ends when LangGraph lets go of the run, once, marked abandoned."""
    telemetry, exporter = _telemetry()
    agent = _agent([work], _model(3), telemetry)
    inputs = {"messages": [("user", "go")]}
    if mode == "sync":
        stream = agent.stream(inputs, stream_mode="updates")
        next(stream)
        next(stream)
        stream.close()
    else:
        async def broken_off() -> None:
            stream = agent.astream(inputs, stream_mode="updates")
            await stream.__anext__()
            await stream.__anext__()
            await stream.aclose()

        asyncio.run(broken_off())
    _check_tree(telemetry, exporter)
    [agent_span] = [s for s in exporter.get_finished_spans()
                    if s.name.startswith("invoke_agent")]
    assert (agent_span.status.status_code.name, agent_span.status.description) == (
        "ERROR", "AgentRunAbandoned")
    agent.invoke(inputs)  # the next run: its own span, the first not ended again
    assert telemetry.open_spans() == 0
    assert len([s for s in exporter.get_finished_spans()
                if s.name.startswith("invoke_agent")]) == 2


def test_a_cancelled_run_ends_its_agent_span() -> None:
    telemetry, exporter = _telemetry()
    agent = _agent([slow], _model(1, "slow"), telemetry)

    async def cancelled() -> None:
        task = asyncio.create_task(agent.ainvoke({"messages": [("user", "go")]}))
        while not [s for s in exporter.get_finished_spans() if s.name.startswith("chat")]:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    _check_tree(telemetry, exporter)


def test_an_agent_used_as_a_tool_is_traced_under_the_tool_call() -> None:
    telemetry, exporter = _telemetry()
    inner = _agent([work], _model(1), telemetry)

    @tool
    def ask_inner(x: int) -> str:
        """Ask the inner agent."""
        return str(inner.invoke({"messages": [("user", "inner")]})["messages"][-1].content)

    _agent([ask_inner], _model(1, "ask_inner"), telemetry).invoke(
        {"messages": [("user", "go")]})
    spans = exporter.get_finished_spans()
    assert telemetry.open_spans() == 0
    assert [s.name for s in spans if s.parent is None] == ["invoke_agent agent"]
    [call] = [s for s in spans if s.name == "execute_tool ask_inner"]
    under = [s.name for s in spans if s.parent and s.parent.span_id == call.context.span_id]
    assert sorted(under) == ["chat gpt-4o", "chat gpt-4o", "execute_tool work"]


def test_an_agent_inside_a_retried_paid_tool_goes_under_that_runs_span() -> None:
    """ToolRetryMiddleware runs a priced tool that asks an inner agent twice (the first
    run fails after asking): each run has its execute_tool span, and each inner agent
    run's spans go under the span of the tool run it ran in (none orphaned)."""
    from langchain.agents.middleware import ToolRetryMiddleware

    from agent_guard.langchain import priced_tool
    from agent_guard.pricing import ToolPrice

    telemetry, exporter = _telemetry()
    inner = _agent([work], _model(1), telemetry)
    runs: list[int] = []

    @tool
    def ask_inner(x: int) -> str:
        """Ask the inner agent."""
        runs.append(1)
        inner.invoke({"messages": [("user", "inner")]})
        if len(runs) == 1:
            raise RuntimeError("failed after asking")
        return "ok"

    priced_tool(ask_inner, ToolPrice("0.01"))
    guard = Guard(Limits(max_cost_usd=1))
    create_agent(_model(1, "ask_inner"), [ask_inner], middleware=[
        GuardMiddleware(guard, session_id=SESSION, telemetry=telemetry),
        ToolRetryMiddleware(max_retries=1, initial_delay=0, jitter=False)]).invoke(
        {"messages": [("user", "go")]})
    spans = exporter.get_finished_spans()
    assert telemetry.open_spans() == 0
    assert [s.name for s in spans if s.parent is None] == ["invoke_agent agent"]
    calls = [s for s in spans if s.name == "execute_tool ask_inner"]
    assert len(calls) == 2
    for call in calls:
        under = [s.name for s in spans
                 if s.parent and s.parent.span_id == call.context.span_id]
        assert sorted(under) == ["chat gpt-4o", "chat gpt-4o", "execute_tool work"]
