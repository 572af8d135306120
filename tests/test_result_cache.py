"""Tool and sub-task result caching: runs once, per arguments, per tenant, per TTL;
side effects and errors are never cached; node results hit across runs."""

from __future__ import annotations

import json
import logging
import operator
from typing import Annotated, Any, TypedDict

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, AnyMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from agent_guard import Guard, GuardCallbackHandler, GuardMiddleware, Limits, guarded_graph
from agent_guard.cache import TTL, MemoryStore, NodeCache, ResultCache, cached_tool, content_key
from agent_guard.testing import ScriptedChatModel

from .conftest import FakeClock

runs: list[str] = []


@tool
def price_of(item: str) -> str:
    """Look up today's price of an item."""
    runs.append(item)
    return f"{item}: $9.99"


@tool
def send_email(to: str) -> str:
    """Send an email (a side effect)."""
    runs.append(f"email:{to}")
    return "sent"


@tool
def flaky(item: str) -> str:
    """Fails."""
    runs.append(f"flaky:{item}")
    raise ValueError("upstream down")


@pytest.fixture(autouse=True)
def _clear(caplog):
    runs.clear()
    caplog.set_level(logging.ERROR, logger="langchain_core.callbacks.manager")


def tenant(name: str) -> dict:
    return {"metadata": {"tenant": name}}


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_url(request, tmp_path, redis_namespace) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cache.db'}"
    from .conftest import REDIS_URL, require_redis

    require_redis()
    return REDIS_URL


def test_same_arguments_run_once_other_arguments_and_tenants_run_again(store_url,
                                                                      redis_namespace) -> None:
    cache = ResultCache(store_url, namespace=redis_namespace,
                        ttl={"pricing": TTL.hours(24), "realtime": None})
    cached = cached_tool(price_of, cache, "pricing", cost_usd="0.002")
    assert (cached.name, cached.args) == (price_of.name, price_of.args)
    assert cached.invoke({"item": "mug"}, tenant("acme")) == "mug: $9.99"
    assert cached.invoke({"item": "mug"}, tenant("acme")) == "mug: $9.99"
    cached.invoke({"item": "pen"}, tenant("acme"))
    cached.invoke({"item": "mug"}, tenant("globex"))
    assert runs == ["mug", "pen", "mug"]
    stats = cache.stats()["price_of"]
    assert (stats.hits, stats.misses, str(stats.saved_usd)) == (1, 3, "0.002")
    public = cached_tool(price_of, cache, "pricing", public=True)
    public.invoke({"item": "cup"}, tenant("acme"))
    public.invoke({"item": "cup"}, tenant("globex"))
    assert runs[-1] == "cup" and runs.count("cup") == 1
    never = cached_tool(price_of, cache, "realtime")
    never.invoke({"item": "mug"}, tenant("acme"))
    never.invoke({"item": "mug"}, tenant("acme"))
    assert runs.count("mug") == 4
    cache.clear()


def test_ttl_expiry_runs_the_tool_again() -> None:
    clock = FakeClock(1_000.0)
    cache = ResultCache(MemoryStore(clock=clock), ttl={"pricing": TTL.hours(24)})
    cached = cached_tool(price_of, cache, "pricing")
    cached.invoke({"item": "mug"})
    clock.now += TTL.hours(23)
    cached.invoke({"item": "mug"})
    clock.now += TTL.hours(2)
    cached.invoke({"item": "mug"})
    assert runs == ["mug", "mug"]


def test_side_effects_and_errors_are_never_cached() -> None:
    cache = ResultCache(ttl={"x": TTL.days(1)})
    email = cached_tool(send_email, cache, "x", side_effects=True)
    assert email is send_email
    email.invoke({"to": "a@b.c"})
    email.invoke({"to": "a@b.c"})
    broken = cached_tool(flaky, cache, "x")
    for _ in range(2):
        with pytest.raises(ValueError):
            broken.invoke({"item": "mug"})
    assert runs == ["email:a@b.c", "email:a@b.c", "flaky:mug", "flaky:mug"]


def test_memory_store_is_lru_bounded() -> None:
    cache = ResultCache("memory://", ttl={"x": None, "y": 60}, max_entries=3)
    cached = cached_tool(price_of, cache, "y")
    for item in "abcd":
        cached.invoke({"item": item})
    cached.invoke({"item": "a"})  # evicted by d: runs again
    assert runs == ["a", "b", "c", "d", "a"]
    assert len(cache.store) == 3  # type: ignore[arg-type]


def test_async_cached_tool() -> None:
    import asyncio

    cache = ResultCache(ttl={"p": 60})
    cached = cached_tool(price_of, cache, "p")

    async def twice() -> None:
        await cached.ainvoke({"item": "mug"})
        await cached.ainvoke({"item": "mug"})

    asyncio.run(twice())
    assert runs == ["mug"]


def looping(item: str = "mug") -> ScriptedChatModel:
    def respond(messages):
        n = sum(isinstance(m, AIMessage) for m in messages)
        if n >= 3:
            return AIMessage("done")
        return AIMessage("", tool_calls=[{"name": "price_of", "args": {"item": item},
                                          "id": f"c{n}"}])

    return ScriptedChatModel(model_name="gpt-4o", respond=respond)


def test_middleware_answers_repeated_tool_calls_from_the_cache() -> None:
    cache = ResultCache(ttl={"pricing": 3600})
    mw = GuardMiddleware(limits=Limits(max_tool_calls=10), cache=cache,
                         cache_tools={"price_of": "pricing"}, session_id="default")
    out = create_agent(looping(), [price_of], middleware=[mw]).invoke(
        {"messages": [("user", "price?")]}, tenant("acme"))
    assert runs == ["mug"]
    tool_answers = [m.content for m in out["messages"] if m.type == "tool"]
    assert tool_answers == ["mug: $9.99"] * 3
    assert mw.guard.usage("default").tool_calls == 3  # hits still count toward the caps
    create_agent(looping(), [price_of], middleware=[mw]).invoke(
        {"messages": [("user", "price?")]}, tenant("globex"))
    assert runs == ["mug", "mug"]


def test_cached_tool_in_an_agent_counts_each_call_once() -> None:
    cache = ResultCache(ttl={"pricing": 3600})
    guard = Guard(Limits(max_repeats=5))
    create_agent(looping(), [cached_tool(price_of, cache, "pricing")]).invoke(
        {"messages": [("user", "price?")]}, {"callbacks": [GuardCallbackHandler(guard,
                                                                                session_id="default")]})
    assert runs == ["mug"] and guard.usage("default").tool_calls == 3


class Chat(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    request_id: str


def research_graph(llm: ScriptedChatModel) -> StateGraph:
    def research(state: Chat) -> dict:
        return {"messages": [llm.invoke(state["messages"])]}

    builder = StateGraph(Chat)
    builder.add_node("research", research)
    builder.add_edge(START, "research")
    builder.add_edge("research", END)
    return builder


def test_node_cache_hits_across_invocations_on_message_state(store_url,
                                                            redis_namespace) -> None:
    llm = ScriptedChatModel(model_name="gpt-4o", responses=["findings"])
    cache = ResultCache(store_url, namespace=redis_namespace,
                        ttl={"factual": TTL.days(30)})
    guard = Guard(Limits(max_cost_usd=1))
    app = guarded_graph(research_graph(llm), guard=guard, cache=cache, session_id="default",
                        cache_nodes={"research": "factual"}, cache_ignore=["request_id"])
    question = {"messages": [("user", "What changed in the EU AI Act?")]}
    first = app.invoke({**question, "request_id": "r1"}, tenant("acme"))
    second = app.invoke({**question, "request_id": "r2"}, tenant("acme"))
    assert llm.calls == 1  # new message ids and request ids, same content: a hit
    assert second["messages"][-1].content == first["messages"][-1].content == "findings"
    app.invoke({**question, "request_id": "r3"}, tenant("globex"))
    app.invoke({"messages": [("user", "Something else")], "request_id": "r4"}, tenant("acme"))
    assert llm.calls == 3
    assert cache.stats()["node:research"].hits == 1
    assert guard.usage("default").model_calls == 3
    cache.clear()


def test_node_cache_refuses_pickled_entries() -> None:
    cache = ResultCache(ttl={"f": 60})
    nodes = NodeCache(cache)
    writes = [("messages", [AIMessage("hi")]), ("count", 1)]
    nodes.set({(("ns", "n"), "k"): (writes, 60)})
    assert nodes.get([(("ns", "n"), "k")]) == {(("ns", "n"), "k"): writes}
    key = nodes._key(("ns", "n"), "k")
    cache.store.set(key, json.dumps({"enc": "pickle", "data": "gASVAAAAAAAAAAA="}))
    assert nodes.get([(("ns", "n"), "k")]) == {}


def test_content_key_ignores_ids_and_volatile_keys() -> None:
    from langchain_core.messages import HumanMessage

    a = {"messages": [HumanMessage("hi", id="1")], "at": 1}
    b = {"messages": [HumanMessage("hi", id="2")], "at": 2}
    assert content_key(a, ignore=["at"]) == content_key(b, ignore=["at"])
    assert content_key(a) != content_key(b)


def test_unknown_ttl_class_and_bad_ttl_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown TTL class 'nope'"):
        cached_tool(price_of, ResultCache(ttl={"x": 60}), "nope")
    with pytest.raises(ValueError, match="must be > 0"):
        ResultCache(ttl={"x": -1})
    with pytest.raises(ValueError, match="cache_tools needs"):
        GuardMiddleware(cache_tools={"price_of": "x"}, session_id="default")


async def test_cached_tool_reports_its_hits_as_a_custom_event_on_the_tool_run() -> None:
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.tools import tool as make_tool

    from agent_guard.cache.result import CACHE_HIT_EVENT

    class Recorder(BaseCallbackHandler):
        def __init__(self) -> None:
            self.tool_runs: list = []
            self.events: list = []

        def on_tool_start(self, serialized, input_str, *, run_id, **kwargs) -> None:
            self.tool_runs.append(run_id)

        def on_custom_event(self, name, data, *, run_id, **kwargs) -> None:
            self.events.append((name, data, run_id))

    @make_tool
    def search(q: str) -> str:
        """Search."""
        return f"results for {q}"

    cache = ResultCache(ttl={"web": 60})
    cached = cached_tool(search, cache, "web", cost_usd="0.002")
    rec = Recorder()
    assert cached.invoke({"q": "x"}) == "results for x"  # no callbacks: no event, no error
    cached.invoke({"q": "x"}, config={"callbacks": [rec]})
    await cached.ainvoke({"q": "x"}, config={"callbacks": [rec]})
    await cached.ainvoke({"q": "new"}, config={"callbacks": [rec]})  # a miss: no event
    assert [(n, d) for n, d, _ in rec.events] == [
        (CACHE_HIT_EVENT, {"tool": "search", "saved_nano": 2_000_000})] * 2
    assert [r for _, _, r in rec.events] == rec.tool_runs[:2]


def test_node_cache_keys_stay_with_their_tenant_however_the_stream_is_consumed() -> None:
    """Two tenants' graph streams consumed in turn in one thread, step by step from a
    thread pool, or interleaved as async streams: each tenant's cached node answers
    for that tenant only (a ContextVar set inside a generator would leak between
    them)."""
    import asyncio

    from langgraph.graph import END, START, StateGraph

    ran: list[str] = []

    def step(state: TenantState) -> dict:
        return {"out": []}

    def answer(state: TenantState, config: RunnableConfig) -> dict:
        tenant = config["metadata"]["tenant"]
        ran.append(tenant)
        return {"out": [f"secret-of-{tenant}"]}

    builder = StateGraph(TenantState)
    builder.add_node("prep", step)
    builder.add_node("mid", step)
    builder.add_node("answer", answer)
    builder.add_edge(START, "prep")
    builder.add_edge("prep", "mid")
    builder.add_edge("mid", "answer")
    builder.add_edge("answer", END)

    def fresh() -> Any:
        ran.clear()
        return guarded_graph(builder, limits=Limits(max_steps=100),
                             cache=ResultCache(ttl={"c": 600}), cache_nodes={"answer": "c"})

    def cfg(tenant: str, n: int) -> Any:
        return {"configurable": {"thread_id": f"{tenant}-{n}"}, "metadata": {"tenant": tenant}}

    def last(chunks: list) -> list:
        return chunks[-1]["answer"]["out"]

    graph = fresh()
    a, b = graph.stream({"q": "x"}, cfg("A", 1)), graph.stream({"q": "x"}, cfg("B", 1))
    next(a), next(b)
    assert (last(list(a)), last(list(b))) == (["secret-of-A"], ["secret-of-B"])
    assert graph.invoke({"q": "x"}, cfg("B", 2))["out"] == ["secret-of-B"]  # a cache hit
    assert ran == ["A", "B"]

    async def drained(gen: Any) -> list:
        out = []
        while (item := await asyncio.to_thread(next, gen, None)) is not None:
            out.append(item)
        return out

    async def by_thread_pool() -> tuple[list, list]:
        return (await drained(graph.stream({"q": "x"}, cfg("A", 3))),
                await drained(graph.stream({"q": "x"}, cfg("B", 3))))

    graph = fresh()
    got_a, got_b = asyncio.run(by_thread_pool())
    assert (last(got_a), last(got_b)) == (["secret-of-A"], ["secret-of-B"])

    async def interleaved_async() -> tuple[list, list]:
        sa, sb = graph.astream({"q": "x"}, cfg("A", 4)), graph.astream({"q": "x"}, cfg("B", 4))
        first = [await sa.__anext__(), await sb.__anext__()]
        rest_a = [c async for c in sa]
        rest_b = [c async for c in sb]
        return [first[0], *rest_a], [first[1], *rest_b]

    graph = fresh()
    got_a, got_b = asyncio.run(interleaved_async())
    assert (last(got_a), last(got_b)) == (["secret-of-A"], ["secret-of-B"])
    assert sorted(ran) == ["A", "B"]


class TenantState(TypedDict):
    q: str
    out: Annotated[list, operator.add]
