"""Hostile entries planted in a shared cache store construct nothing, run nothing, and
are misses; the agent's answer stays right.

One guarded graph uses all three caches on one store: its node ``answer`` is cached
(``NodeCache``, through ``guarded_graph(cache_nodes=...)``), calls a ``cached_tool``
and then a real ``ChatOpenAI`` (with an ``LLMCache``) against ``FakeOpenAIServer``. A
first run writes a tool, a node and an LLM entry; every key it wrote is then
overwritten with a hostile payload (msgpack extension types, pickles of protocols
0-5, truncated JSON, JSON of the wrong shape, LangChain constructor JSON, oversized
and deeply nested values, raw bytes, a Redis key of another type). The second run
must run the node, the tool and the model again, answer as the first did, count each
refused entry in ``stats()``, and leave the canary (a directory any of the payloads
would create) absent. A third run is answered from the entries the second rewrote.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pickle
import sqlite3
from pathlib import Path
from typing import Annotated, Any, TypedDict

import ormsgpack
import pytest
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from agent_guard import Guard, Limits, guarded_graph
from agent_guard.cache import LLMCache, ResultCache, cached_tool
from agent_guard.cache.store import KVStore, MemoryStore, RedisStore, SQLiteStore
from agent_guard.testing import FakeOpenAIServer, FakeReply

from .conftest import REDIS_URL, require_redis

ANSWER = "The mug costs $9.99."
runs: list[str] = []


@tool
def price_of(item: str) -> str:
    """Look up today's price of an item."""
    runs.append(item)
    return f"{item}: $9.99"


class Chat(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


# -- hostile payloads ---------------------------------------------------------------------


class MakeDirs:
    """Unpickling this calls ``os.makedirs(path)``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (os.makedirs, (self.path,))


def msgpack_ext(canary: str) -> bytes:
    """LangGraph's msgpack for "call os.makedirs(canary)" (EXT_CONSTRUCTOR_POS_ARGS)."""
    return ormsgpack.packb(ormsgpack.Ext(1, ormsgpack.packb(("os", "makedirs", [canary]))))


def envelope(enc: str, data: bytes) -> str:
    """The envelope the node cache wrote before (LangGraph's serde, base64)."""
    return json.dumps({"enc": enc, "data": base64.b64encode(data).decode()})


def payloads(canary: str, valid: str) -> dict[str, str | bytes]:
    out: dict[str, str | bytes] = {
        "msgpack-ext-envelope": envelope("msgpack", msgpack_ext(canary)),
        "msgpack-ext-raw": msgpack_ext(canary),
        "msgpack-nested-in-list": envelope(
            "msgpack", ormsgpack.packb([["messages", ormsgpack.Ext(
                2, ormsgpack.packb(("os", "makedirs", {"name": canary})))]])),
        "pickle-envelope": envelope("pickle", pickle.dumps(MakeDirs(canary), protocol=4)),
        "json-envelope-bad-base64": json.dumps({"enc": "msgpack", "data": "@@not-b64@@"}),
        "truncated-json": valid[: len(valid) // 2],
        "empty": "",
        "wrong-type-list": "[1, 2, 3]",
        "wrong-type-number": "42",
        "wrong-type-null": "null",
        "wrong-shape-object": json.dumps({"value": {"$t": "message", "data": {"type": "os"}}}),
        "lc-constructor": json.dumps([{"lc": 1, "type": "constructor",
                                       "id": ["os", "makedirs"], "kwargs": {"name": canary}}]),
        "lc-secret": json.dumps([{"lc": 1, "type": "secret", "id": ["PATH"]}]),
        "lc2-constructor": json.dumps({"lc": 2, "type": "constructor",
                                       "id": ["os", "makedirs"], "args": [canary]}),
        "oversized": valid[:-1] + " " * (9 * 2**20) + valid[-1],
        "deeply-nested": "[" * 200_000 + "]" * 200_000,
        "invalid-utf8": b"\xff\xfe\x00garbage",
    }
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        out[f"pickle-protocol-{protocol}"] = pickle.dumps(MakeDirs(canary), protocol=protocol)
    return out


PAYLOAD_NAMES = [*sorted(payloads("/x", "{}")), "redis-wrong-key-type"]


# -- planting into each store --------------------------------------------------------------


def keys_of(store: KVStore) -> list[str]:
    if isinstance(store, MemoryStore):
        return list(store._data)
    if isinstance(store, SQLiteStore):
        with store._pool.connection() as db:
            return [k for (k,) in db.execute("SELECT key FROM ag_cache")]
    assert isinstance(store, RedisStore)
    return [k.decode() for k in store.client.scan_iter(match="agc:*", count=1000)]


def value_of(store: KVStore, key: str) -> str:
    value = store.get(key)
    assert isinstance(value, str)
    return value


def plant(store: KVStore, key: str, payload: str | bytes | None) -> None:
    """Write ``payload`` under ``key`` as another writer of the shared store would: raw
    bytes as bytes (a BLOB in SQLite), bypassing the store's own ``set``."""
    if isinstance(store, MemoryStore):
        with store._lock:
            store._data[key] = (payload, None)  # type: ignore[assignment]
    elif isinstance(store, SQLiteStore):
        with store._pool.connection() as db:
            value = sqlite3.Binary(payload) if isinstance(payload, bytes) else payload
            db.execute("INSERT OR REPLACE INTO ag_cache (key, value, expires_at) "
                       "VALUES (?, ?, NULL)", (key, value))
    else:
        assert isinstance(store, RedisStore)
        if payload is None:  # a key of another Redis type: GET answers WRONGTYPE
            store.client.delete(key)
            store.client.rpush(key, "a", "b")
        else:
            store.client.set(key, payload)


# -- the agent -------------------------------------------------------------------------------


def make_store(kind: str, tmp_path: Path) -> str:
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'cache.db'}"
    require_redis()
    return REDIS_URL


def build(store_url: str, namespace: str, server: FakeOpenAIServer):
    results = ResultCache(store_url, namespace=namespace,
                          ttl={"factual": 3600.0, "pricing": 3600.0})
    llm_cache = LLMCache(results.store, namespace=namespace, ttl=3600.0)
    llm = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="x", max_retries=0,
                     max_tokens=50, cache=llm_cache)
    price = cached_tool(price_of, results, "pricing")

    def answer(state: Chat, config: RunnableConfig) -> dict:
        quote = price.invoke({"item": "mug"}, config)
        reply = llm.invoke([*state["messages"], HumanMessage(f"tool said: {quote}")], config)
        return {"messages": [reply]}

    async def aanswer(state: Chat, config: RunnableConfig) -> dict:
        quote = await price.ainvoke({"item": "mug"}, config)
        reply = await llm.ainvoke([*state["messages"], HumanMessage(f"tool said: {quote}")],
                                  config)
        return {"messages": [reply]}

    def graph(node: Any) -> Any:
        builder = StateGraph(Chat)
        builder.add_node("answer", node)
        builder.add_edge(START, "answer")
        builder.add_edge("answer", END)
        return guarded_graph(builder, guard=Guard(Limits(max_cost_usd=1)), cache=results,
                             cache_nodes={"answer": "factual"}, session_id="hostile")

    return results, llm_cache, graph(answer), graph(aanswer)


def run(app: Any, loop: asyncio.AbstractEventLoop | None) -> str:
    """One question, sync, or async on ``loop`` (one loop per test: the model's async
    HTTP client belongs to the loop it first ran on)."""
    question = {"messages": [("user", "How much is a mug?")]}
    config = {"metadata": {"tenant": "acme"}}
    out = loop.run_until_complete(app.ainvoke(question, config)) if loop is not None else \
        app.invoke(question, config)
    last = out["messages"][-1]
    assert isinstance(last, AIMessage)
    return str(last.content)


@pytest.fixture(autouse=True)
def _clear() -> None:
    runs.clear()


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("payload", PAYLOAD_NAMES)
@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
def test_a_hostile_entry_is_a_miss_that_runs_nothing(kind: str, payload: str, mode: str,
                                                     tmp_path: Path, redis_namespace: str,
                                                     caplog) -> None:
    if payload == "redis-wrong-key-type" and kind != "redis":
        pytest.skip("a key of another type exists only in Redis")
    canary = tmp_path / "canary"
    with FakeOpenAIServer([FakeReply(ANSWER, prompt_tokens=20, completion_tokens=6)]) as srv:
        results, llm_cache, app, aapp = build(make_store(kind, tmp_path), redis_namespace, srv)
        graph = aapp if mode == "async" else app
        loop = asyncio.new_event_loop() if mode == "async" else None
        try:
            assert run(graph, loop) == ANSWER
            assert (runs, srv.request_count) == (["mug"], 1)
            keys = [k for k in keys_of(results.store) if redis_namespace in k]
            kinds = sorted({k.split(":")[2] for k in keys})
            assert kinds == ["llm", "node", "tool"], keys
            valid = value_of(results.store, keys[0])
            hostile = None if payload == "redis-wrong-key-type" else \
                payloads(str(canary), valid)[payload]
            for key in keys:
                plant(results.store, key, hostile)

            assert run(graph, loop) == ANSWER  # every entry refused: all ran again
            assert (runs, srv.request_count) == (["mug", "mug"], 2)
            assert not canary.exists(), "a planted payload ran code"
            stats = results.stats()
            assert stats["price_of"].undecodable + stats["price_of"].errors == 1
            assert stats["node:answer"].undecodable + stats["node:answer"].errors == 1
            assert (stats["price_of"].hits, stats["node:answer"].hits) == (0, 0)
            llm_stats = llm_cache.stats()
            assert llm_stats.undecodable + llm_stats.errors == 1 and llm_stats.hits == 0

            assert run(graph, loop) == ANSWER  # rewritten by the second run: a node hit
            assert (runs, srv.request_count) == (["mug", "mug"], 2)
            assert results.stats()["node:answer"].hits == 1
        finally:
            if loop is not None:
                loop.close()
            results.clear()
            results.store.close()
    assert not canary.exists()


# -- the middleware's tool cache ----------------------------------------------------------


def agent_script(request: dict) -> FakeReply:
    """Call price_of once, then answer with what it said."""
    last = request["messages"][-1]
    if last["role"] == "tool":
        return FakeReply(f"It costs {last['content']}", prompt_tokens=30, completion_tokens=6)
    return FakeReply(tool_calls=[{"name": "price_of", "arguments": {"item": "mug"}}],
                     prompt_tokens=20, completion_tokens=8)


MIDDLEWARE_PAYLOADS = ["pickle-protocol-5", "msgpack-ext-raw", "truncated-json",
                       "invalid-utf8", "valid-format-wrong-type", "valid-format-bad-list"]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("payload", MIDDLEWARE_PAYLOADS)
@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
def test_a_hostile_entry_under_a_middleware_tool_key_is_a_miss(kind: str, payload: str,
                                                                mode: str, tmp_path: Path,
                                                                redis_namespace: str) -> None:
    from langchain.agents import create_agent

    from agent_guard import GuardMiddleware

    canary = tmp_path / "canary"
    results = ResultCache(make_store(kind, tmp_path), namespace=redis_namespace,
                          ttl={"pricing": 3600.0})
    with FakeOpenAIServer(agent_script) as srv:
        llm = ChatOpenAI(model="gpt-4o", base_url=srv.base_url, api_key="x", max_retries=0,
                         max_tokens=50)
        mw = GuardMiddleware(limits=Limits(max_tool_calls=10), cache=results,
                             cache_tools={"price_of": "pricing"}, session_id="hostile")
        agent = create_agent(llm, [price_of], middleware=[mw])

        loop = asyncio.new_event_loop() if mode == "async" else None

        def ask() -> str:
            question = {"messages": [("user", "price of a mug?")]}
            config = {"metadata": {"tenant": "acme"}}
            out = loop.run_until_complete(agent.ainvoke(question, config)) if loop else \
                agent.invoke(question, config)
            return str(out["messages"][-1].content)

        try:
            assert ask() == "It costs mug: $9.99" and runs == ["mug"]
            # this test's own keys: the Redis database is shared with other tests (other
            # pytest-xdist workers write cache keys of their own meanwhile)
            keys = [k for k in keys_of(results.store) if redis_namespace in k and ":tool:" in k]
            assert len(keys) == 1
            if payload.startswith("valid-format"):  # well formed, not a tool's content
                from agent_guard.cache.serde import dumps_value

                result = {"x": 1} if payload == "valid-format-wrong-type" else [1, None]
                hostile: str | bytes = dumps_value({"result": result, "cost_nano": 0})
            else:
                hostile = payloads(str(canary), value_of(results.store, keys[0]))[payload]
            plant(results.store, keys[0], hostile)
            assert ask() == "It costs mug: $9.99" and runs == ["mug", "mug"]
            assert not canary.exists()
            assert ask() == "It costs mug: $9.99" and runs == ["mug", "mug"]  # rewritten
        finally:
            if loop is not None:
                loop.close()
            results.clear()
            results.store.close()


# -- a LangGraph cache the compiled graph brought (InMemoryCache, SqliteCache, RedisCache) ----


@pytest.mark.parametrize("mode", ["sync", "async"])
def _typed_payloads(canary: str) -> dict[str, tuple[str, bytes]]:
    """(type, bytes) pairs as a LangGraph cache stores them, each asking to run code."""
    return {
        "msgpack-ext": ("msgpack", msgpack_ext(canary)),
        "msgpack-nested": ("msgpack", ormsgpack.packb([["messages", ormsgpack.Ext(
            2, ormsgpack.packb(("os", "makedirs", {"name": canary})))]])),
        "pickle": ("pickle", pickle.dumps(MakeDirs(canary), protocol=5)),
        "lc-constructor": ("json", json.dumps([{"lc": 1, "type": "constructor",
                                                "id": ["os", "makedirs"],
                                                "kwargs": {"name": canary}}]).encode()),
        "truncated": ("json", b'{"v": 1, "val'),
    }


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("payload", sorted(_typed_payloads("/x")))
def test_a_compiled_graphs_own_cache_constructs_nothing(payload: str, mode: str,
                                                        tmp_path: Path) -> None:
    """guarded_graph keeps the LangGraph cache a graph was compiled with; it must read and
    write it through the allow-list too: a planted entry is a miss and runs nothing."""
    from langgraph.cache.memory import InMemoryCache
    from langgraph.graph import MessagesState
    from langgraph.types import CachePolicy

    canary = tmp_path / "canary"
    calls: list[str] = []

    def research(state: MessagesState) -> dict:
        calls.append("research")
        return {"messages": [AIMessage("findings")]}

    builder = StateGraph(MessagesState)
    builder.add_node("research", research,
                     cache_policy=CachePolicy(key_func=lambda s: str(s["messages"][-1].content)))
    builder.add_edge(START, "research")
    builder.add_edge("research", END)
    cache = InMemoryCache()
    app = guarded_graph(builder.compile(cache=cache), limits=Limits(max_steps=100),
                        session_id="own-cache")
    question = {"messages": [HumanMessage("what changed?")]}

    def go() -> str:
        out = asyncio.run(app.ainvoke(question)) if mode == "async" else app.invoke(question)
        return str(out["messages"][-1].content)

    assert go() == "findings" and calls == ["research"]
    assert go() == "findings" and calls == ["research"]  # a hit
    kind, raw = _typed_payloads(str(canary))[payload]
    planted = 0
    for ns in list(cache._cache):
        for key in list(cache._cache[ns]):
            _, _, expiry = cache._cache[ns][key]
            cache._cache[ns][key] = (kind, raw, expiry)
            planted += 1
    assert planted == 1
    assert go() == "findings" and calls == ["research", "research"]  # a miss: ran again
    assert not canary.exists(), "a planted payload ran code"
    assert go() == "findings" and calls == ["research", "research"]  # rewritten: a hit
