"""The middleware alone gives the same telemetry as the callback.

One scripted conversation (a real ``create_agent``, a tool call then an answer; and one
the guard stops at its model-call cap) runs once with ``GuardCallbackHandler`` and once
with ``GuardMiddleware`` alone, sync and async, each with its own in-memory span exporter
and metric reader. The spans (names, parents, kinds, status, events and every attribute:
cost, tokens, tool name and call id, session, user) and the metric points must be equal.
With both on one agent, sharing one telemetry and one guard, each run has one span and
each call is charged once.
"""

from __future__ import annotations

import asyncio
import operator
from collections import Counter
from typing import Annotated, Any, TypedDict

import pytest

pytest.importorskip("opentelemetry.sdk")

from langchain.agents import create_agent
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent_guard import Guard, GuardCallbackHandler, GuardMiddleware, Limits
from agent_guard.compat import RunnableCallable
from agent_guard.errors import StepLimitExceeded
from agent_guard.telemetry import Attr, GuardTelemetry
from agent_guard.testing import ScriptedChatModel

# the callback alone counts no agent steps (the middleware's before_model does): the root
# span's step count is the one attribute the two adapters report differently
UNLIKE = {Attr.SESSION_STEPS}
CONFIG = {"configurable": {"thread_id": "t-7"}, "metadata": {"user_id": "u-1"}}
INPUTS = {"messages": [("user", "where is A1?")]}


@tool
def lookup(order: str) -> str:
    """Look up an order."""
    return f"order {order}: shipped"


def conversation(loop: bool) -> ScriptedChatModel:
    """The model asks for ``lookup`` once then answers (``loop``: asks every time)."""
    turns = {"n": 0}

    def respond(messages: Any) -> Any:
        turns["n"] += 1
        if loop or turns["n"] == 1:
            return AIMessage("", tool_calls=[{"name": "lookup", "args": {"order": "A1"},
                                              "id": f"call_{turns['n']}"}])
        return "A1 has shipped."

    return ScriptedChatModel(model_name="gpt-4o", max_tokens=100, cached_fraction=0.5,
                             respond=respond)


class Run:
    """One run's telemetry, guard and what it exported."""

    def __init__(self) -> None:
        self.spans_out = InMemorySpanExporter()
        tracer = TracerProvider()
        tracer.add_span_processor(SimpleSpanProcessor(self.spans_out))
        self.reader = InMemoryMetricReader()
        self.telemetry = GuardTelemetry(tracer, MeterProvider(metric_readers=[self.reader]),
                                        metric_attributes=("user",))

    def spans(self) -> Counter:
        spans = self.spans_out.get_finished_spans()
        names = {s.context.span_id: s.name for s in spans}
        return Counter(
            (s.name, names.get(s.parent.span_id) if s.parent else None, s.kind.name,
             s.status.status_code.name, tuple(e.name for e in s.events),
             tuple(sorted((k, v) for k, v in s.attributes.items() if k not in UNLIKE)))
            for s in spans)

    def metrics(self) -> Counter:
        points: Counter = Counter()
        for rm in self.reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for p in m.data.data_points:
                        value = (p.count,) if m.name == "gen_ai.client.operation.duration" \
                            else (getattr(p, "count", None), getattr(p, "sum", None),
                                  getattr(p, "value", None))
                        points[(m.name, tuple(sorted(p.attributes.items())), value)] += 1
        return points


def drive(agent: Any, mode: str, raises: type[BaseException] | None, **config: Any) -> None:
    config = {**CONFIG, **config}

    def run() -> None:
        if mode == "sync":
            agent.invoke(INPUTS, config)
        else:
            asyncio.run(agent.ainvoke(INPUTS, config))

    if raises is None:
        run()
    else:
        with pytest.raises(raises):
            run()


def through(adapter: str, mode: str, limits: Limits, loop: bool,
            raises: type[BaseException] | None) -> tuple[Run, Guard]:
    run = Run()
    guard = Guard(limits)
    if adapter == "callback":
        agent = create_agent(conversation(loop), [lookup], name="support")
        drive(agent, mode, raises,
              callbacks=[GuardCallbackHandler(guard, telemetry=run.telemetry)])
    elif adapter == "middleware":
        agent = create_agent(conversation(loop), [lookup], name="support",
                             middleware=[GuardMiddleware(guard, telemetry=run.telemetry)])
        drive(agent, mode, raises)
    else:  # both, one telemetry and one guard
        agent = create_agent(conversation(loop), [lookup], name="support",
                             middleware=[GuardMiddleware(guard, telemetry=run.telemetry)])
        drive(agent, mode, raises,
              callbacks=[GuardCallbackHandler(guard, telemetry=run.telemetry)])
    assert run.telemetry.open_spans() == 0
    return run, guard


SCENARIOS = {
    # a tool call, its answer, the final answer
    "tool_turn": (Limits(max_cost_usd=1), False, None),
    # the third model call is refused: the run raises, the root span says so
    "refused": (Limits(max_model_calls=2), True, StepLimitExceeded),
}


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_the_middleware_alone_gives_the_callbacks_spans_and_metrics(scenario: str,
                                                                     mode: str) -> None:
    limits, loop, raises = SCENARIOS[scenario]
    callback, callback_guard = through("callback", mode, limits, loop, raises)
    middleware, middleware_guard = through("middleware", mode, limits, loop, raises)

    expected = callback.spans()
    names = Counter(key[0] for key in expected.elements())
    assert names["invoke_agent support"] == 1 and names["execute_tool lookup"] >= 1
    assert all(parent == "invoke_agent support" for name, parent, *_ in expected
               if name != "invoke_agent support")
    assert middleware.spans() == expected
    assert middleware.metrics() == callback.metrics()
    assert middleware_guard.usage("t-7").cost_usd == callback_guard.usage("t-7").cost_usd


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_callback_and_middleware_together_give_one_span_per_run_and_one_charge(
        scenario: str, mode: str) -> None:
    limits, loop, raises = SCENARIOS[scenario]
    alone, alone_guard = through("callback", mode, limits, loop, raises)
    both, both_guard = through("both", mode, limits, loop, raises)

    assert both.spans() == alone.spans()  # nothing twice, nothing missing
    assert both.metrics() == alone.metrics()
    assert both_guard.usage("t-7").cost_usd == alone_guard.usage("t-7").cost_usd
    assert both_guard.usage("t-7").model_calls == alone_guard.usage("t-7").model_calls


class Fan(TypedDict, total=False):
    done: Annotated[list[str], operator.add]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_agents_in_parallel_nodes_get_a_span_each(mode: str) -> None:
    """Two agents in parallel nodes of one graph share that graph's invocation: each agent
    run still gets its own ``invoke_agent`` span (its namespace tells them apart), with
    its own chat and tool spans under it, and every span ends. Their tool calls wait for
    each other, so the two runs are open at once."""
    import threading

    both_running = threading.Barrier(2, timeout=10)

    @tool("lookup")
    def meeting(order: str) -> str:
        """Look up an order (once both agents are in their tool call)."""
        both_running.wait()
        return f"order {order}: shipped"

    run = Run()
    guard = Guard(Limits(max_cost_usd=1))
    # one middleware for both agents: its runs are told apart by their namespace
    middleware = GuardMiddleware(guard, telemetry=run.telemetry, session_id="fan")
    agents = {name: create_agent(conversation(False), [meeting], name=name,
                                 middleware=[middleware]) for name in ("left", "right")}

    builder = StateGraph(Fan)
    for name, agent in agents.items():
        def node(state: Fan, agent: Any = agent, name: str = name) -> Fan:
            agent.invoke(INPUTS)
            return {"done": [name]}

        async def anode(state: Fan, agent: Any = agent, name: str = name) -> Fan:
            await agent.ainvoke(INPUTS)
            return {"done": [name]}

        builder.add_node(name, RunnableCallable(node, anode))
        builder.add_edge(START, name)
        builder.add_edge(name, END)
    graph = builder.compile()
    if mode == "sync":
        graph.invoke({})
    else:
        asyncio.run(graph.ainvoke({}))

    assert run.telemetry.open_spans() == 0
    spans = run.spans_out.get_finished_spans()
    roots = {s.context.span_id: s.name for s in spans if s.name.startswith("invoke_agent")}
    assert sorted(roots.values()) == ["invoke_agent left", "invoke_agent right"]
    children = Counter((roots[s.parent.span_id], s.name.split()[0]) for s in spans
                       if s.parent is not None)
    assert children == {("invoke_agent left", "chat"): 2, ("invoke_agent left", "execute_tool"): 1,
                        ("invoke_agent right", "chat"): 2,
                        ("invoke_agent right", "execute_tool"): 1}


@pytest.mark.parametrize("on_exceed", ["interrupt", "end"])
def test_a_pause_or_an_end_closes_the_runs_span(on_exceed: str) -> None:
    """A pause at the cap ends the invocation's agent span (as the callback's root run
    ends there); resuming opens the next invocation's. ``end`` closes it through the
    agent's own end."""
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.types import Command

    run = Run()
    middleware = GuardMiddleware(limits=Limits(max_model_calls=2), on_exceed=on_exceed,
                                 telemetry=run.telemetry)
    agent = create_agent(conversation(True), [lookup], name="support",
                         middleware=[middleware], checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "t-7"}}
    out = agent.invoke(INPUTS, config)
    assert run.telemetry.open_spans() == 0
    invocations = 1
    if on_exceed == "interrupt":
        assert out["__interrupt__"]
        agent.invoke(Command(resume={"stop": True}), config)
        assert run.telemetry.open_spans() == 0
        invocations = 2
    names = Counter(s.name for s in run.spans_out.get_finished_spans())
    assert names["invoke_agent support"] == invocations
    # two answered calls; the third refused once ("end"), or at the pause and again when
    # the resumed run asks for it before it stops ("interrupt")
    assert names["chat gpt-4o"] == 2 + invocations


def retried(adapter: str, mode: str, flaky: Any) -> tuple[Run, Guard]:
    """One agent run whose one tool call ToolRetryMiddleware runs twice (``flaky`` fails
    its first run), through ``adapter`` alone."""
    from langchain.agents.middleware import ToolRetryMiddleware

    run = Run()
    guard = Guard(Limits(max_cost_usd=1))
    answers = iter([AIMessage("", tool_calls=[{"name": flaky.name, "id": "c1",
                                               "args": {"query": "x"}}]),
                    AIMessage("done")])
    model = ScriptedChatModel(model_name="gpt-4o", max_tokens=100,
                              respond=lambda m: next(answers))
    middleware: list[Any] = [ToolRetryMiddleware(max_retries=1, initial_delay=0,
                                                 jitter=False)]
    callbacks: list[Any] = []
    if adapter == "middleware":
        middleware.insert(0, GuardMiddleware(guard, telemetry=run.telemetry))
    else:
        callbacks.append(GuardCallbackHandler(guard, telemetry=run.telemetry))
    agent = create_agent(model, [flaky], name="support", middleware=middleware)
    drive(agent, mode, None, callbacks=callbacks)
    assert run.telemetry.open_spans() == 0
    return run, guard


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_retried_paid_tool_has_a_span_per_run_as_under_the_callback(mode: str) -> None:
    """ToolRetryMiddleware runs a paid tool twice (the first run fails after billing):
    the callback makes an ``execute_tool`` span per run, each with its own cost and
    status; the middleware alone makes the same spans, whose costs add up to what the
    ledger charged for the call, and the same metric points."""
    from .test_redteam_paid_tools import PRICE_NANO, FlakySearch

    callback, callback_guard = retried("callback", mode, FlakySearch(fails=1).tool)
    middleware, middleware_guard = retried("middleware", mode, FlakySearch(fails=1).tool)
    tools = [s for s in middleware.spans_out.get_finished_spans()
             if s.name == "execute_tool web_search"]
    assert sorted((s.status.status_code.name, s.attributes["agent_guard.outcome"])
                  for s in tools) == [("ERROR", "error"), ("UNSET", "ok")]
    charged = middleware_guard.usage("t-7").cost_nano - sum(
        round(s.attributes["gen_ai.usage.cost"] * 1e9)
        for s in middleware.spans_out.get_finished_spans() if s.name.startswith("chat"))
    assert round(sum(s.attributes["gen_ai.usage.cost"] for s in tools) * 1e9) == \
        charged == 2 * PRICE_NANO
    assert middleware.spans() == callback.spans()
    assert middleware.metrics() == callback.metrics()
    assert middleware_guard.usage("t-7").cost_usd == callback_guard.usage("t-7").cost_usd


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_retried_unpriced_tool_has_a_span_per_run_as_under_the_callback(mode: str
                                                                          ) -> None:
    """ToolRetryMiddleware runs an unpriced tool twice (it fails, then answers): the
    callback makes an ``execute_tool`` span per run (ERROR, then UNSET) and counts two
    tool calls; the middleware alone makes the same spans, metric points and counts."""
    from .test_middleware_unpriced_retry import Flaky

    callback_tool, middleware_tool = Flaky(fails=1), Flaky(fails=1)
    callback, callback_guard = retried("callback", mode, callback_tool.tool)
    middleware, middleware_guard = retried("middleware", mode, middleware_tool.tool)
    assert callback_tool.runs == middleware_tool.runs == 2
    tools = [s for s in middleware.spans_out.get_finished_spans()
             if s.name == "execute_tool lookup"]
    assert sorted(s.status.status_code.name for s in tools) == ["ERROR", "UNSET"]
    assert middleware.spans() == callback.spans()
    assert middleware.metrics() == callback.metrics()
    assert middleware_guard.usage("t-7").tool_calls == \
        callback_guard.usage("t-7").tool_calls == 2
