"""Red-team paths for paid tools: whenever a priced tool's body started, the guard
charged at least its price (charged >= billed), on every path that can run it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import ToolRetryMiddleware
from langchain_core.messages import AIMessage
from langchain_core.tools import tool

from agent_guard import Guard, GuardCallbackHandler, GuardMiddleware, Limits
from agent_guard.engine.records import CallRecord
from agent_guard.langchain import priced_tool
from agent_guard.pricing import ToolPrice
from agent_guard.testing import ScriptedChatModel

SESSION = "redteam-tools"
PRICE_NANO = 10_000_000


class FlakySearch:
    """A paid search billed on every run, failing (after billing) the first ``fails``."""

    def __init__(self, fails: int) -> None:
        self.runs = 0

        @tool
        def web_search(query: str) -> str:
            """Search the web."""
            self.runs += 1
            if self.runs <= fails:
                raise RuntimeError("search API: 502 after billing")
            return "found"

        self.tool = priced_tool(web_search, ToolPrice("0.01"))


def _agent(search: Any, middleware: list[Any]) -> Any:
    answers = iter([AIMessage("", tool_calls=[{"name": "web_search", "args": {"query": "x"},
                                               "id": "c1"}]), AIMessage("done")])
    model = ScriptedChatModel(model_name="gpt-4o", respond=lambda m: next(answers))
    return create_agent(model, [search], middleware=middleware)


def _run(agent: Any, mode: str, config: Any = None) -> Any:
    inputs = {"messages": [("user", "search")]}
    if mode == "sync":
        return agent.invoke(inputs, config=config)
    return asyncio.run(agent.ainvoke(inputs, config=config))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_tool_retries_inside_the_middleware_are_each_charged(mode: str) -> None:
    """ToolRetryMiddleware inside GuardMiddleware runs the paid tool three times (two
    failures after billing, then an answer): each run reached the paid API, so the
    ledger holds three runs' price, as the callback path charges."""
    search = FlakySearch(fails=2)
    records: list[CallRecord] = []
    guard = Guard(Limits(max_cost_usd=1), on_record=[records.append])
    agent = _agent(search.tool, [GuardMiddleware(guard, session_id=SESSION),
                                 ToolRetryMiddleware(max_retries=2, initial_delay=0,
                                                     jitter=False)])
    _run(agent, mode)
    assert search.runs == 3
    tools = [r for r in records if r.kind == "tool"]
    usage = guard.usage(SESSION)
    assert usage.reserved_nano == 0
    assert sum(r.cost_nano for r in tools) >= search.runs * PRICE_NANO, \
        [(r.outcome, r.cost_nano) for r in tools]
    assert usage.cost_nano == sum(r.cost_nano for r in records)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_tool_retries_under_the_callback_are_each_charged(mode: str) -> None:
    search = FlakySearch(fails=2)
    records: list[CallRecord] = []
    guard = Guard(Limits(max_cost_usd=1), on_record=[records.append])
    agent = _agent(search.tool, [ToolRetryMiddleware(max_retries=2, initial_delay=0,
                                                     jitter=False)])
    _run(agent, mode, {"callbacks": [GuardCallbackHandler(guard, session_id=SESSION)]})
    assert search.runs == 3
    tools = [r for r in records if r.kind == "tool"]
    assert sum(r.cost_nano for r in tools) >= search.runs * PRICE_NANO
    assert guard.usage(SESSION).reserved_nano == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_tool_retry_past_the_cap_is_refused_before_it_runs(mode: str) -> None:
    """Two tool calls allowed: ToolRetryMiddleware inside GuardMiddleware asks for a
    third run of the failing paid tool; it is refused before it runs (the refusal
    reaches the caller, not retried), and the two runs that did are charged."""
    from agent_guard import StepLimitExceeded

    search = FlakySearch(fails=5)
    records: list[CallRecord] = []
    guard = Guard(Limits(max_cost_usd=1, max_tool_calls=2), on_record=[records.append])
    agent = _agent(search.tool, [GuardMiddleware(guard, session_id=SESSION),
                                 ToolRetryMiddleware(max_retries=4, initial_delay=0,
                                                     jitter=False)])
    with pytest.raises(StepLimitExceeded):
        _run(agent, mode)
    assert search.runs == 2
    tools = [r for r in records if r.kind == "tool"]
    assert sum(r.cost_nano for r in tools) == 2 * PRICE_NANO
    usage = guard.usage(SESSION)
    assert usage.reserved_nano == 0 and usage.cost_nano == sum(r.cost_nano for r in records)


@pytest.mark.parametrize("case", ["priced", "invalid_args", "fails_inside", "retried",
                                  "callback", "callback_invalid_args", "thresholds"])
def test_async_paid_tool_paths_use_async_ledger_ops_only(case: str) -> None:
    """The async paths touched by paid tools (the tool run's own settle, a release of
    arguments that did not validate, a failure charged, a retried run admitted, the
    callback handler's tool path, soft thresholds crossed) never run a sync ledger
    operation on the running loop."""
    from .test_adapters import LoopStrictLedger

    ledger = LoopStrictLedger()
    events: list[Any] = []
    guard = Guard(Limits(max_cost_usd="0.018" if case == "thresholds" else 1),
                  ledger=ledger, on_threshold=[events.append])
    search = FlakySearch(fails=1 if case in ("fails_inside", "retried") else 0)
    args = {"q": "typo"} if "invalid" in case else {"query": "x"}
    answers = iter([AIMessage("", tool_calls=[{"name": "web_search", "args": args,
                                               "id": "c1"}]), AIMessage("done")])
    model = ScriptedChatModel(model_name="gpt-4o", respond=lambda m: next(answers))
    middleware: list[Any] = [] if case.startswith("callback") else [
        GuardMiddleware(guard, session_id=SESSION)]
    if case == "retried":
        middleware.append(ToolRetryMiddleware(max_retries=1, initial_delay=0, jitter=False))
    config = {"callbacks": [GuardCallbackHandler(guard, session_id=SESSION)]} \
        if case.startswith("callback") else None
    agent = create_agent(model, [search.tool], middleware=middleware)
    if case == "fails_inside":
        with pytest.raises(RuntimeError, match="502"):
            _run(agent, "async", config)
    else:
        _run(agent, "async", config)
    assert ledger.blocked == []
    usage = guard.usage(SESSION)
    assert usage.reserved_nano == 0
    assert usage.tool_calls >= search.runs
    if case == "thresholds":
        assert events


def test_a_retried_run_cancelled_inside_the_middleware_is_charged() -> None:
    """The retried run of a paid tool (ToolRetryMiddleware inside GuardMiddleware) is
    cancelled while it runs: its run never ends through LangChain's callbacks, so the
    middleware charges it its worst case with the first run (not left to its lease)."""
    started = asyncio.Event()
    runs: list[int] = []

    @tool
    async def web_search(query: str) -> str:
        """Search the web."""
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("search API: 502 after billing")
        started.set()
        await asyncio.sleep(30)
        return "found"

    priced_tool(web_search, ToolPrice("0.01"))
    records: list[CallRecord] = []
    guard = Guard(Limits(max_cost_usd=1), on_record=[records.append])
    agent = _agent(web_search, [GuardMiddleware(guard, session_id=SESSION),
                                ToolRetryMiddleware(max_retries=2, initial_delay=0,
                                                    jitter=False)])

    async def cancelled() -> None:
        task = asyncio.create_task(agent.ainvoke({"messages": [("user", "search")]}))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    assert len(runs) == 2
    tools = [r for r in records if r.kind == "tool"]
    usage = guard.usage(SESSION)
    assert (usage.reserved_nano, sum(r.cost_nano for r in tools)) == (0, 2 * PRICE_NANO)


@pytest.mark.parametrize("where", ["model", "tools"])
def test_an_async_resume_extends_the_caps_with_async_ledger_ops(where: str) -> None:
    """An async agent under GuardMiddleware(on_exceed="interrupt") pauses at a cap (a
    model step, or a tool call refused) and is resumed with an extension: the
    extension (Guard.extend) runs no sync ledger operation on the running loop."""
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.types import Command

    from .test_adapters import LoopStrictLedger

    ledger = LoopStrictLedger()
    limits = Limits(max_model_calls=1) if where == "model" else Limits(max_tool_calls=0)
    guard = Guard(limits, ledger=ledger)
    search = FlakySearch(fails=0)
    answers = iter([AIMessage("", tool_calls=[{"name": "web_search", "args": {"query": "x"},
                                               "id": "c1"}]),
                    AIMessage("", tool_calls=[{"name": "web_search", "args": {"query": "y"},
                                               "id": "c2"}]),
                    AIMessage("done")])
    model = ScriptedChatModel(model_name="gpt-4o", respond=lambda m: next(answers))
    agent = create_agent(model, [search.tool], checkpointer=InMemorySaver(), middleware=[
        GuardMiddleware(guard, session_id=SESSION, on_exceed="interrupt")])
    config: Any = {"configurable": {"thread_id": "t1"}}
    extension = {"extend_model_calls": 5} if where == "model" else {"extend_tool_calls": 5}

    async def paused_and_resumed() -> Any:
        first = await agent.ainvoke({"messages": [("user", "search")]}, config)
        assert "__interrupt__" in first
        return await agent.ainvoke(Command(resume=extension), config)

    out = asyncio.run(paused_and_resumed())
    assert "__interrupt__" not in out
    assert ledger.blocked == []


@pytest.mark.parametrize("by_id", [False, True])
def test_an_async_guarded_graph_resume_extends_with_async_ledger_ops(by_id: bool) -> None:
    """guarded_graph(on_exceed="interrupt") run with ainvoke pauses at the dollar cap and
    is resumed with an extension (a plain resume value, or one per interrupt id): no
    sync ledger operation runs on the loop."""
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.types import Command

    from agent_guard import guarded_graph

    from .test_adapters import LoopStrictLedger
    from .test_guarded_graph import CAP, Models, plan_and_execute, start

    ledger = LoopStrictLedger()
    guard = Guard(Limits(max_cost_usd=CAP), ledger=ledger)
    app = guarded_graph(plan_and_execute(Models()), guard=guard,
                        on_exceed="interrupt", checkpointer=InMemorySaver())
    inputs, cfg = start("R")

    async def paused_and_resumed() -> Any:
        paused = await app.ainvoke(inputs, cfg)
        assert paused["__interrupt__"]
        extension = {"extend_usd": "0.5"}
        resume: Any = {i.id: extension for i in paused["__interrupt__"]} if by_id \
            else extension
        return await app.ainvoke(Command(resume=resume), cfg)

    out = asyncio.run(paused_and_resumed())
    assert "__interrupt__" not in out
    assert ledger.blocked == []


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_retried_long_running_paid_tool_keeps_its_hold_under_the_middleware(mode: str
                                                                              ) -> None:
    """The run ToolRetryMiddleware makes again inside GuardMiddleware has its own hold:
    the lease keeper renews it while that run goes on, as it renews the first run's."""
    from agent_guard.engine.keeper import keeper

    renewed: list[int] = []
    runs: list[int] = []

    @tool
    def sandbox(code: str) -> str:
        """Run code."""
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("sandbox: crashed after billing")
        watches = [w for w in keeper._watches.values()
                   if getattr(w.admission, "tool", None) == "sandbox"
                   and not w.admission.finished]
        for w in watches:
            w.renew_at = 0.0
        keeper.check()
        renewed.extend(len(w.renewed) for w in watches)
        return "ok"

    priced_tool(sandbox, ToolPrice("0.01"))
    guard = Guard(Limits(max_cost_usd=1))
    answers = iter([AIMessage("", tool_calls=[{"name": "sandbox", "args": {"code": "1"},
                                               "id": "c1"}]), AIMessage("done")])
    model = ScriptedChatModel(model_name="gpt-4o", respond=lambda m: next(answers))
    agent = create_agent(model, [sandbox], middleware=[
        GuardMiddleware(guard, session_id=SESSION),
        ToolRetryMiddleware(max_retries=1, initial_delay=0, jitter=False)])
    _run(agent, mode)
    assert len(runs) == 2 and renewed == [1]
    assert guard.usage(SESSION).reserved_nano == 0
    assert not [w for w in keeper._watches.values() if getattr(w.admission, "tool", None)]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("path", ["callback", "middleware"])
def test_a_paid_tool_that_pauses_after_billing_is_charged(path: str, mode: str) -> None:
    """A priced tool calls its paid API, then asks a human (``interrupt()``) before it
    answers; resumed, it runs again from the start and calls the API again. Both runs
    reached the API: the ledger holds at least two runs' price, on both adapters."""
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.types import Command, interrupt

    billed: list[int] = []

    @tool
    def draft(topic: str) -> str:
        """Draft a text with a paid API, then ask for approval."""
        billed.append(1)
        approved = interrupt({"draft": topic})
        return f"sent: {approved}"

    priced_tool(draft, ToolPrice("0.01"))
    records: list[CallRecord] = []
    guard = Guard(Limits(max_cost_usd=1), on_record=[records.append])
    answers = iter([AIMessage("", tool_calls=[{"name": "draft", "args": {"topic": "x"},
                                               "id": "c1"}]), AIMessage("done")])
    model = ScriptedChatModel(model_name="gpt-4o", respond=lambda m: next(answers))
    middleware = [GuardMiddleware(guard, session_id=SESSION)] if path == "middleware" else []
    agent = create_agent(model, [draft], middleware=middleware, checkpointer=InMemorySaver())
    config: Any = {"configurable": {"thread_id": "t1"}}
    if path == "callback":
        config["callbacks"] = [GuardCallbackHandler(guard, session_id=SESSION)]

    async def both() -> Any:
        paused = await agent.ainvoke({"messages": [("user", "draft")]}, config)
        assert "__interrupt__" in paused
        return await agent.ainvoke(Command(resume="yes"), config)

    if mode == "sync":
        assert "__interrupt__" in agent.invoke({"messages": [("user", "draft")]}, config)
        out = agent.invoke(Command(resume="yes"), config)
    else:
        out = asyncio.run(both())
    assert "__interrupt__" not in out
    assert len(billed) == 2
    tools = [r for r in records if r.kind == "tool"]
    usage = guard.usage("t1")
    assert usage.reserved_nano == 0
    assert sum(r.cost_nano for r in tools) >= len(billed) * PRICE_NANO, \
        [(r.outcome, r.cost_nano) for r in tools]
