"""A stop stops: guarded_graph's actions over graph shapes x refusal kinds, against a
local OpenAI-compatible server that refuses a history with unanswered tool calls.

For every cell the real ``ChatOpenAI`` talks to :class:`FakeOpenAIServer`, whose reply
script never ends the agent by itself (it always asks for another tool call), so only
the guard can stop the run. Each cell checks, from the outside:

- a refusal happened, and the server got no request after it (``raise``, ``end``,
  ``interrupt`` then ``stop``; ``interrupt`` then ``extend_*`` makes progress, pauses
  at the next refusal, and is then stopped);
- the run ended or paused without ``GraphRecursionError`` (the recursion limit is set
  to 60, so a run that does not stop fails fast);
- the messages left in the thread are accepted by the server (one more plain request).

Pruned cells (and why):
- ``interrupt`` then ``extend_*`` for *repeats*: a loop refusal has no extension
  (``extend_*`` raise budgets; an identical call is refused as a loop whatever the
  budget), so resuming with an extension pauses again at once: nothing to measure
  beyond the ``stop`` cell.
- the history check for the ``loop`` shape: its state has no messages.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import operator
from typing import Annotated, Any, TypedDict

import httpx
import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.errors import GraphRecursionError
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import Command, Send

from agent_guard import Guard, GuardError, Limits, guarded_graph
from agent_guard.testing import FakeOpenAIServer, FakeReply

RECURSION = {"recursion_limit": 60}
BRIEF = "read the notes and write a short summary of what they say " * 10  # ~120 tokens


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer() as s:
        yield s


class SpyGuard(Guard):
    """A Guard that notes how many requests the server had got at each refusal."""

    server: FakeOpenAIServer

    def _refusal(self, *args: Any, **kwargs: Any) -> Any:
        exc = super()._refusal(*args, **kwargs)
        self.refusals.append(self.server.request_count)
        return exc


def spy_guard(server: FakeOpenAIServer, limits: Limits, ledger: Any = "memory://") -> SpyGuard:
    guard = SpyGuard(limits, ledger=ledger)
    guard.server = server
    guard.refusals = []
    return guard


# -- the provider's script: always one more tool call -------------------------------------

def script(repeat: bool):
    def reply(body: dict) -> FakeReply:
        if not body.get("tools"):
            return FakeReply("ok")
        n = sum(m.get("role") == "assistant" for m in body["messages"])
        query = "same" if repeat else f"q{n}"
        return FakeReply(tool_calls=[{"name": "search", "args": {"query": query}},
                                     {"name": "lookup", "args": {"key": query}}])
    return reply


@tool
def search(query: str) -> str:
    """Search the web."""
    return f"results for {query}"


@tool
def lookup(key: str) -> str:
    """Look a key up."""
    return f"value of {key}"


TOOLS = [search, lookup]


def model(server: FakeOpenAIServer) -> ChatOpenAI:
    # its own async client: each cell runs in its own event loop
    return ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="x", max_tokens=40,
                      max_retries=0, http_async_client=httpx.AsyncClient(verify=False))


# -- the shapes ------------------------------------------------------------------------------

def agent_shape(server, repeat):
    return create_agent(model(server), TOOLS)


def react_shape(server, repeat):
    llm = model(server).bind_tools(TOOLS)

    def call_model(state: MessagesState) -> dict:
        return {"messages": [llm.invoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("model", call_model)
    builder.add_node("tools", ToolNode(TOOLS))
    builder.add_edge(START, "model")
    builder.add_conditional_edges("model", tools_condition)
    builder.add_edge("tools", "model")
    return builder


class LoopState(TypedDict):
    n: int
    answers: Annotated[list[str], operator.add]


def loop_shape(server, repeat):
    llm = model(server)

    def work(state: LoopState) -> dict:
        n = state.get("n", 0)
        answer = llm.invoke(f"step {n}: {BRIEF}").content
        found = search.invoke({"query": "same" if repeat else f"q{n}"})
        return {"n": n + 1, "answers": [f"{answer}:{found}"]}

    builder = StateGraph(LoopState)
    builder.add_node("work", work)
    builder.add_edge(START, "work")
    builder.add_conditional_edges("work", lambda s: "work" if s["n"] < 1000 else END,
                                  ["work", END])
    return builder


class FanState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    results: Annotated[list[str], operator.add]


def fanout_shape(server, repeat):
    llm = model(server)

    def plan(state: FanState) -> dict:
        return {"messages": [llm.invoke("plan 12 tasks")]}

    def route(state: FanState) -> list[Send]:
        return [Send("work", {"task": i}) for i in range(12)]

    def work(task: dict) -> dict:
        answer = llm.invoke(f"do {task['task']}: {BRIEF}").content
        found = search.invoke({"query": "same" if repeat else f"q{task['task']}"})
        return {"results": [f"{task['task']}:{answer}:{found}"]}

    builder = StateGraph(FanState)
    builder.add_node("plan", plan)
    builder.add_node("work", work)
    builder.add_edge(START, "plan")
    builder.add_conditional_edges("plan", route, ["work"])
    builder.add_edge("work", END)
    return builder


def subgraph_shape(server, repeat, sub_checkpointer: Any = None):
    sub = create_agent(model(server), TOOLS, checkpointer=sub_checkpointer)
    builder = StateGraph(MessagesState)
    builder.add_node("researcher", sub)
    builder.add_edge(START, "researcher")
    builder.add_edge("researcher", END)
    return builder


SHAPES = {"agent": agent_shape, "react": react_shape, "loop": loop_shape,
          "fanout": fanout_shape, "subgraph": subgraph_shape,
          # a sub-agent that keeps its own history per thread (compile(checkpointer=True))
          "subgraph_own": functools.partial(subgraph_shape, sub_checkpointer=True)}

# -- the refusal kinds, and the extension that lets the run go on --------------------------

KINDS: dict[str, tuple[Limits, dict[str, Any] | None]] = {
    "dollars": (Limits(max_cost_usd="0.002"), {"extend_usd": "0.002"}),
    "tokens": (Limits(max_tokens=500), {"extend_tokens": 500}),
    "model_calls": (Limits(max_model_calls=3), {"extend_model_calls": 1}),
    "tool_calls": (Limits(max_tool_calls=3), {"extend_tool_calls": 1}),
    "per_tool": (Limits(max_tool_calls={"search": 2}), {"extend_tool_calls": 1}),
    "repeats": (Limits(max_repeats=2), None),
    "steps": (Limits(max_steps=5), {"extend_steps": 2}),
}
ACTIONS = ["raise", "end", "stop", "extend"]


def cells():
    for shape in SHAPES:
        for kind, (_, extension) in KINDS.items():
            for action in ACTIONS:
                if action == "extend" and extension is None:
                    continue  # pruned: see the module docstring
                yield shape, kind, action


def inputs_for(shape: str) -> dict:
    if shape == "loop":
        return {"n": 0, "answers": []}
    if shape == "fanout":
        return {"messages": [HumanMessage("plan")], "results": []}
    return {"messages": [HumanMessage("find it")]}


class Caller:
    """invoke, or ainvoke on one event loop for the whole cell."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.loop = asyncio.new_event_loop() if mode == "async" else None

    def __call__(self, app, payload, cfg):
        if self.loop is None:
            return app.invoke(payload, cfg)
        return self.loop.run_until_complete(app.ainvoke(payload, cfg))

    def close(self) -> None:
        if self.loop is not None:
            self.loop.close()


def inputs_for_shape(shape: str) -> dict:
    return inputs_for("subgraph" if shape.startswith("subgraph") else shape)


def assert_history_accepted(server: FakeOpenAIServer, app, cfg, shape: str) -> None:
    if shape == "loop":
        return  # no messages in this state
    messages = app.get_state(cfg).values["messages"]
    before = server.request_count
    plain = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="x",
                       max_retries=0)
    plain.invoke([*messages, HumanMessage("and now?")])  # a 400 raises BadRequestError
    assert server.request_count == before + 1
    for i, m in enumerate(messages):  # every tool call answered right after it
        if isinstance(m, AIMessage) and m.tool_calls:
            answered = {t.tool_call_id for t in messages[i + 1:i + 1 + len(m.tool_calls)]
                        if isinstance(t, ToolMessage)}
            assert answered == {tc["id"] for tc in m.tool_calls}


def progress(usage: Any, kind: str) -> int:
    """How much of the capped thing the session has done."""
    return {"dollars": usage.cost_nano, "tokens": usage.total_tokens,
            "model_calls": usage.model_calls, "tool_calls": usage.tool_calls,
            "per_tool": usage.tool_calls, "steps": usage.steps}[kind]


def run_cell(server, shape: str, kind: str, action: str, mode: str,
             ledger: Any = "memory://") -> SpyGuard:
    call = Caller(mode)
    try:
        return _run_cell(server, shape, kind, action, call, ledger)
    finally:
        call.close()


def _run_cell(server, shape: str, kind: str, action: str, call: Caller,
              ledger: Any) -> SpyGuard:
    mode = call.mode
    limits, extension = KINDS[kind]
    server.replies = script(repeat=kind == "repeats")
    guard = spy_guard(server, limits, ledger)
    on_exceed = {"raise": "raise", "end": "end"}.get(action, "interrupt")
    app = guarded_graph(SHAPES[shape](server, kind == "repeats"), guard=guard,
                        on_exceed=on_exceed, checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": f"{shape}-{kind}-{action}-{mode}"}, **RECURSION}
    if shape == "fanout":
        # one branch at a time, so "after the refusal" is well defined; concurrent
        # branches: test_a_branch_already_running_is_stopped_at_its_next_call
        cfg["max_concurrency"] = 1
    inputs = inputs_for_shape(shape)
    try:
        if action == "raise":
            with pytest.raises(GuardError):
                call(app, inputs, cfg)
        else:
            out = call(app, inputs, cfg)
            if action == "end":
                assert "__interrupt__" not in out
            else:
                assert out.get("__interrupt__"), "the run should pause at the refusal"
                if action == "extend":
                    session = cfg["configurable"]["thread_id"]
                    paused_at = server.request_count, progress(guard.usage(session), kind)
                    out = call(app, Command(resume=extension), cfg)
                    assert out.get("__interrupt__"), "the next refusal pauses again"
                    # the extension let the run go on: more of what was capped was done
                    assert progress(guard.usage(session), kind) > paused_at[1]
                    guard.refusals.clear()
                    guard.refusals.append(server.request_count)
                out = call(app, Command(resume={"stop": True}), cfg)
                assert "__interrupt__" not in out
    except GraphRecursionError as exc:  # pragma: no cover - the failure being tested
        pytest.fail(f"the run did not stop: {exc!r}; {server.request_count} requests")
    assert guard.refusals, "the guard never refused"
    assert server.request_count == guard.refusals[0], "paid calls after the refusal"
    assert_history_accepted(server, app, cfg, shape)
    return guard


@pytest.fixture(autouse=True)
def _quiet(caplog):
    caplog.set_level(logging.ERROR, logger="langchain_core.callbacks.manager")


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(("shape", "kind", "action"), list(cells()))
def test_a_stop_stops(server, shape: str, kind: str, action: str, mode: str) -> None:
    run_cell(server, shape, kind, action, mode)


@pytest.mark.redis
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_stop_stops_on_redis(server, redis_url, redis_namespace, kind: str) -> None:
    from agent_guard.ledger.redis import RedisLedger

    ledger = RedisLedger.from_url(redis_url, namespace=redis_namespace)
    try:
        run_cell(server, "agent", kind, "end", "sync", ledger=ledger)
        run_cell(server, "react", kind, "stop", "async", ledger=ledger)
    finally:
        ledger.close()


# -- steps inside subgraphs --------------------------------------------------------------

@pytest.mark.parametrize("sub_checkpointer", [None, True], ids=["inherits", "own"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_max_steps_counts_node_runs_inside_a_subgraph(server, sub_checkpointer,
                                                      mode: str) -> None:
    server.replies = script(repeat=False)
    guard = spy_guard(server, Limits(max_steps=5))
    app = guarded_graph(subgraph_shape(server, False, sub_checkpointer), guard=guard,
                        on_exceed="end", checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": f"steps-{sub_checkpointer}-{mode}"}, **RECURSION}
    call = Caller(mode)
    try:
        call(app, inputs_for("subgraph"), cfg)
    finally:
        call.close()
    # the subgraph node itself, then model, tools (x2: one Send per tool call), model:
    # the 5th step is refused, so 3 node runs inside it paid 2 model calls
    assert guard.usage(cfg["configurable"]["thread_id"]).steps == 5
    assert server.request_count == guard.refusals[0] and len(guard.refusals) == 1
    assert_history_accepted(server, app, cfg, "subgraph")


# -- the log -----------------------------------------------------------------------------------

@pytest.mark.parametrize("action", ["end", "stop"])
def test_one_log_line_per_refusal_with_the_middleware(server, caplog, action: str) -> None:
    from agent_guard import GuardMiddleware

    for name in ("agent_guard", "langchain_core.callbacks.manager"):
        caplog.set_level(logging.DEBUG, logger=name)
    server.replies = script(repeat=False)
    guard = spy_guard(server, Limits(max_tool_calls=3))
    agent = create_agent(model(server), TOOLS, checkpointer=InMemorySaver(), middleware=[
        GuardMiddleware(guard, on_exceed="end" if action == "end" else "interrupt")])
    cfg = {"configurable": {"thread_id": f"mwlog-{action}"}, **RECURSION}
    agent.invoke(inputs_for("agent"), cfg)
    if action == "stop":
        agent.invoke(Command(resume={"stop": True}), cfg)
    ours = [r for r in caplog.records if r.name.startswith("agent_guard")
            and "Exceeded" in r.getMessage()]
    assert len(ours) == len(guard.refusals) == 1
    assert not [r for r in caplog.records if r.name.startswith("langchain_core")
                and "callback" in r.getMessage()]


@pytest.mark.parametrize("action", ["end", "stop"])
def test_one_log_line_per_refusal(server, caplog, action: str) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("agent_guard", "langchain_core.callbacks.manager"):  # others may set them
        caplog.set_level(logging.DEBUG, logger=name)
    server.replies = script(repeat=False)
    guard = spy_guard(server, Limits(max_model_calls=3))
    app = guarded_graph(loop_shape(server, False), guard=guard,
                        on_exceed="end" if action == "end" else "interrupt",
                        checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": f"log-{action}"}, **RECURSION}
    app.invoke(inputs_for("loop"), cfg)
    if action == "stop":
        app.invoke(Command(resume={"stop": True}), cfg)
    callback_errors = [r for r in caplog.records
                       if r.name.startswith("langchain_core") and "callback" in r.getMessage()]
    assert callback_errors == []
    ours = [r for r in caplog.records if r.name.startswith("agent_guard")
            and "Exceeded" in r.getMessage()]  # not the soft-threshold lines
    assert len(ours) == len(guard.refusals) == 1, [r.getMessage() for r in ours]
    assert "model calls" in ours[0].getMessage()


# -- the server refuses what OpenAI refuses ------------------------------------------------

def test_the_server_refuses_unanswered_tool_calls_as_openai_does(server) -> None:
    import openai

    server.replies = ["fine"]
    llm = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="x", max_retries=0)
    asked = AIMessage("", tool_calls=[{"name": "search", "args": {"query": "a"}, "id": "c1"},
                                      {"name": "search", "args": {"query": "b"}, "id": "c2"}])
    before = server.request_count
    with pytest.raises(openai.BadRequestError) as info:
        llm.invoke([HumanMessage("hi"), asked, ToolMessage("A", tool_call_id="c1"),
                    HumanMessage("and?")])
    body = info.value.body
    assert body["message"] == (
        "An assistant message with 'tool_calls' must be followed by tool messages "
        "responding to each 'tool_call_id'. The following tool_call_ids did not have "
        "response messages: c2")
    assert body["type"] == "invalid_request_error" and body["param"] == "messages.[1].role"
    with pytest.raises(openai.BadRequestError, match="must be a response to a preceeding"):
        llm.invoke([HumanMessage("hi"), ToolMessage("A", tool_call_id="c9")])
    assert server.request_count == before  # refused requests are not billed or recorded
    ok = llm.invoke([HumanMessage("hi"), asked, ToolMessage("A", tool_call_id="c1"),
                     ToolMessage("B", tool_call_id="c2")])
    assert ok.content == "fine"
    server.check_tool_history = False
    try:
        llm.invoke([HumanMessage("hi"), asked])
    finally:
        server.check_tool_history = True


# -- every way in: stream, astream, astream_events, batch; with and without a checkpointer ---

ENTRIES = ["invoke", "stream", "stream_messages", "astream", "astream_events", "batch",
           "abatch"]


def _consume(app, entry: str, inputs: dict, cfg: dict) -> list:
    """Run ``app`` through ``entry``; the list of final states (one per input)."""
    async def agen(stream) -> list:
        return [chunk async for chunk in stream]

    if entry == "invoke":
        return [app.invoke(inputs, cfg)]
    if entry == "stream":
        return [list(app.stream(inputs, cfg, stream_mode="values"))[-1]]
    if entry == "stream_messages":
        chunks = list(app.stream(inputs, cfg, stream_mode=["messages", "values"]))
        return [[c for mode, c in chunks if mode == "values"][-1]]
    if entry == "astream":
        return [asyncio.run(agen(app.astream(inputs, cfg, stream_mode="values")))[-1]]
    if entry == "astream_events":
        events = asyncio.run(agen(app.astream_events(inputs, cfg, version="v2")))
        ends = [e for e in events if e["event"] == "on_chain_end" and not e["parent_ids"]]
        return [ends[-1]["data"]["output"]]
    second = {**cfg, "configurable": {"thread_id": cfg["configurable"]["thread_id"] + "-2"}}
    if entry == "batch":
        return app.batch([inputs, inputs], [cfg, second])
    return asyncio.run(app.abatch([inputs, inputs], [cfg, second]))


@pytest.mark.parametrize("checkpointer", [True, False], ids=["saver", "no-saver"])
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("shape", ["agent", "fanout"])
def test_end_stops_whatever_the_way_in(server, shape: str, entry: str,
                                       checkpointer: bool) -> None:
    if shape == "fanout" and entry == "stream_messages":
        pytest.skip("LangGraph 1.2.24 deadlocks with max_concurrency=1 and "
                    "stream_mode='messages' (a plain create_agent does too); without it, "
                    "'after the refusal' is a race between concurrent branches")
    server.replies = script(repeat=False)
    guard = spy_guard(server, Limits(max_tool_calls=3))
    app = guarded_graph(SHAPES[shape](server, False), guard=guard, on_exceed="end",
                        checkpointer=InMemorySaver() if checkpointer else None)
    cfg = {"configurable": {"thread_id": f"way-{shape}-{entry}-{checkpointer}"},
           **RECURSION}
    if shape == "fanout":
        cfg["max_concurrency"] = 1  # one branch at a time: "after the refusal" is defined
    finals = _consume(app, entry, inputs_for(shape), cfg)
    threads = 2 if entry.endswith("batch") else 1
    assert len(guard.refusals) == threads  # one refusal per run
    assert server.request_count == guard.refusals[-1]  # nothing paid after either
    plain = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="x", max_retries=0)
    for final in finals:
        messages = final["messages"]
        assert messages[-1].name == "agent-guard"
        plain.invoke([*messages, HumanMessage("and now?")])  # the history is valid
        if entry in ("invoke", "batch", "abatch"):
            assert final["__agent_guard__"]["dimension"] == "tool_calls"


@pytest.mark.parametrize("entry", ["invoke", "stream", "astream", "astream_events"])
def test_raise_comes_after_the_history_is_made_valid(server, entry: str) -> None:
    server.replies = script(repeat=False)
    guard = spy_guard(server, Limits(max_tool_calls=3))
    app = guarded_graph(agent_shape(server, False), guard=guard, on_exceed="raise",
                        checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": f"raise-{entry}"}, **RECURSION}
    with pytest.raises(GuardError, match="cap on tool calls"):
        _consume(app, entry, inputs_for("agent"), cfg)
    assert server.request_count == guard.refusals[0]
    assert_history_accepted(server, app, cfg, "agent")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_branch_already_running_is_stopped_at_its_next_call(server, mode: str) -> None:
    """Two branches of one superstep: ``slow`` is inside its node when ``fast`` is
    refused; its model call, started after the stop, never reaches the server."""
    import threading

    server.replies = ["ok"]
    server.reset()
    refused = threading.Event()

    class Signalling(SpyGuard):
        def _refusal(self, *args: Any, **kwargs: Any) -> Any:
            exc = super()._refusal(*args, **kwargs)
            refused.set()
            return exc

    guard = Signalling(Limits(max_model_calls=0), ledger="memory://")
    guard.server, guard.refusals = server, []
    llm = model(server)
    slow_started: list[bool] = []

    class S(TypedDict):
        messages: Annotated[list[AnyMessage], add_messages]

    inside = threading.Event()

    def fast(state: S) -> dict:
        assert inside.wait(5)  # refused only once the other branch is inside its node
        return {"messages": [llm.invoke("fast")]}

    def slow(state: S) -> dict:
        slow_started.append(True)
        inside.set()
        assert refused.wait(5)
        import time
        time.sleep(0.05)  # let the refused branch mark the run stopped
        return {"messages": [llm.invoke("slow")]}

    builder = StateGraph(S)
    builder.add_node("fast", fast)
    builder.add_node("slow", slow)
    builder.add_edge(START, "fast")
    builder.add_edge(START, "slow")
    builder.add_edge("fast", END)
    builder.add_edge("slow", END)
    app = guarded_graph(builder, guard=guard, on_exceed="end")
    call = Caller(mode)
    try:
        out = call(app, {"messages": [HumanMessage("go")]}, {"configurable": {"thread_id": "b"}})
    finally:
        call.close()
    assert slow_started and server.request_count == 0
    assert len(guard.refusals) == 1  # the gate's refusal is not a second cap refusal
    assert [m.name for m in out["messages"]] == [None, "agent-guard"]


# -- GuardMiddleware: the same promises inside create_agent ---------------------------------

def run_middleware_cell(server, kind: str, action: str, mode: str) -> SpyGuard:
    from agent_guard import GuardMiddleware

    limits, extension = KINDS[kind]
    server.replies = script(repeat=kind == "repeats")
    guard = spy_guard(server, limits)
    on_exceed = {"raise": "raise", "end": "end"}.get(action, "interrupt")
    agent = create_agent(model(server), TOOLS, checkpointer=InMemorySaver(),
                         middleware=[GuardMiddleware(guard, on_exceed=on_exceed,
                                                     shrink_to_fit=False)])
    cfg = {"configurable": {"thread_id": f"mw-{kind}-{action}-{mode}"}, **RECURSION}
    call = Caller(mode)
    try:
        if action == "raise":
            with pytest.raises(GuardError):
                call(agent, inputs_for("agent"), cfg)
        else:
            out = call(agent, inputs_for("agent"), cfg)
            if action != "end":
                assert out.get("__interrupt__"), "the run should pause at the refusal"
                if action == "extend":
                    session = cfg["configurable"]["thread_id"]
                    before = progress(guard.usage(session), kind)
                    out = call(agent, Command(resume=extension), cfg)
                    assert out.get("__interrupt__"), "the next refusal pauses again"
                    assert progress(guard.usage(session), kind) > before
                    guard.refusals[:] = [server.request_count]
                out = call(agent, Command(resume={"stop": True}), cfg)
            assert "__interrupt__" not in out
    finally:
        call.close()
    assert guard.refusals, "the guard never refused"
    assert server.request_count == guard.refusals[0], "paid calls after the refusal"
    assert_history_accepted(server, agent, cfg, "agent")
    return guard


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(("kind", "action"),
                         [(k, a) for _, k, a in cells() if _ == "agent"])
def test_the_middleware_stops_too(server, kind: str, action: str, mode: str) -> None:
    run_middleware_cell(server, kind, action, mode)


@pytest.mark.parametrize("shape", ["agent", "react", "subgraph", "subgraph_own"])
def test_the_thread_goes_on_after_an_end(server, shape: str) -> None:
    """After an end and more budget, the same thread continues against the server (a
    sub-agent with its own checkpointer keeps its history too: it must be valid)."""
    server.replies = script(repeat=False)
    guard = spy_guard(server, Limits(max_tool_calls=3))
    app = guarded_graph(SHAPES[shape](server, False), guard=guard, on_exceed="end",
                        checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": f"again-{shape}"}, **RECURSION}
    app.invoke(inputs_for_shape(shape), cfg)
    guard.extend(f"again-{shape}", tool_calls=3)
    before = server.request_count
    out = app.invoke({"messages": [HumanMessage("go on")]}, cfg)  # a 400 would raise
    assert server.request_count > before and len(guard.refusals) == 2
    assert out["messages"][-1].name == "agent-guard"
    assert_history_accepted(server, app, cfg, shape)


def test_a_graph_without_messages_gets_the_reason_in_the_result(server) -> None:
    server.replies = script(repeat=False)
    guard = spy_guard(server, Limits(max_model_calls=2))
    app = guarded_graph(loop_shape(server, False), guard=guard, on_exceed="end")
    out = app.invoke(inputs_for("loop"), {"configurable": {"thread_id": "nomsg"}, **RECURSION})
    assert out["n"] == 2 and len(out["answers"]) == 2
    reason = out["__agent_guard__"]
    assert reason["dimension"] == "model_calls" and reason["cap"] == 2
    assert "cap on model calls is 2" in reason["message"]


@pytest.mark.parametrize("own_cache", [False, True], ids=["cache_nodes", "compiled-cache"])
def test_a_refused_node_is_not_cached(server, own_cache: bool) -> None:
    """A node refused (or skipped) in one run must not be answered from the node cache in
    the next: its empty writes would end that run without a refusal."""
    from langgraph.cache.memory import InMemoryCache
    from langgraph.types import CachePolicy

    from agent_guard.cache.result import ResultCache

    server.replies = ["findings"]
    llm = model(server)

    def research(state: MessagesState) -> dict:
        return {"messages": [llm.invoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("research", research,
                     cache_policy=CachePolicy(key_func=lambda s: str(s["messages"][-1].content))
                     if own_cache else None)
    builder.add_edge(START, "research")
    builder.add_edge("research", END)
    guard = spy_guard(server, Limits(max_model_calls=0))
    if own_cache:
        app = guarded_graph(builder.compile(cache=InMemoryCache()), guard=guard,
                            on_exceed="end")
    else:
        app = guarded_graph(builder, guard=guard, on_exceed="end",
                            cache=ResultCache("memory://"), cache_nodes={"research": "factual"})
    cfg = {"configurable": {"thread_id": f"cached-{own_cache}"}}
    question = {"messages": [HumanMessage("what changed?")]}
    assert app.invoke(question, cfg)["messages"][-1].name == "agent-guard"
    guard.extend(f"cached-{own_cache}", model_calls=2)
    before = server.request_count
    out = app.invoke(question, cfg)  # same input: a cached refusal would skip the node
    assert out["messages"][-1].content == "findings" and server.request_count == before + 1
    out = app.invoke(question, cfg)  # and a real answer is cached as before
    assert out["messages"][-1].content == "findings" and server.request_count == before + 1
