"""A cache is an optimisation, never a new way to fail: a backend that is down is a miss
(counted, logged once per cause, quick), and TTL classes work out of the box. Plus the
allow-list serializer of node and LLM entries, value by value."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import time
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    RemoveMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGeneration, Generation
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.types import Send

from agent_guard.cache import (
    TTL,
    LLMCache,
    MemoryStore,
    NodeCache,
    ResultCache,
    SemanticLLMCache,
    cached_tool,
)
from agent_guard.cache.serde import (
    DEFAULT_MAX_BYTES,
    UndecodableEntry,
    UnencodableValue,
    dumps_value,
    loads_value,
)
from agent_guard.testing import FakeOpenAIServer, FakeReply

DOWN = "redis://127.0.0.1:1/0"  # nothing listens on port 1
runs: list[str] = []


@tool
def price_of(item: str) -> str:
    """Look up today's price of an item."""
    runs.append(item)
    return f"{item}: $9.99"


@pytest.fixture(autouse=True)
def _clear() -> None:
    runs.clear()


# -- a backend that is down ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_tool_cache_whose_redis_is_down_answers_every_call(mode: str, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="agent_guard")
    cache = ResultCache(DOWN, ttl={"pricing": 60})
    cached = cached_tool(price_of, cache, "pricing")
    started = time.monotonic()
    for _ in range(5):
        out = asyncio.run(cached.ainvoke({"item": "mug"})) if mode == "async" else \
            cached.invoke({"item": "mug"})
        assert out == "mug: $9.99"
    assert time.monotonic() - started < 5  # bounded: no 5 x socket timeouts
    assert runs == ["mug"] * 5
    stats = cache.stats()["price_of"]
    assert (stats.hits, stats.misses) == (0, 5) and stats.errors == 5
    down = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(down) == 1, [r.getMessage() for r in caplog.records]  # once per cause


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_llm_cache_whose_redis_is_down_answers_every_call(mode: str) -> None:
    cache = LLMCache(DOWN)
    with FakeOpenAIServer([FakeReply("Paris.", prompt_tokens=9, completion_tokens=2)]) as srv:
        llm = ChatOpenAI(model="gpt-4o", base_url=srv.base_url, api_key="x", max_retries=0,
                         cache=cache)

        async def three() -> list:
            return [await llm.ainvoke("capital?") for _ in range(3)]

        outs = asyncio.run(three()) if mode == "async" else \
            [llm.invoke("capital?") for _ in range(3)]
        assert [o.content for o in outs] == ["Paris."] * 3
        assert srv.request_count == 3
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (0, 3) and stats.errors >= 3


def test_a_node_cache_whose_redis_is_down_is_empty() -> None:
    nodes = NodeCache(ResultCache(DOWN, ttl={"f": 60}))
    key = (("answer",), "k")
    nodes.set({key: ([("messages", [AIMessage("hi")])], 60)})
    assert nodes.get([key]) == {}
    assert asyncio.run(nodes.aget([key])) == {}
    nodes.clear()
    assert nodes.results.stats()["node:answer"].errors == 2


def test_a_cache_that_cannot_store_a_value_still_answers() -> None:
    @tool
    def odd(item: str) -> Any:
        """Returns something JSON cannot hold."""
        runs.append(item)
        return {item: object()}

    cache = ResultCache(ttl={"f": 60})
    cached = cached_tool(odd, cache, "f")
    cached.invoke({"item": "a"})
    cached.invoke({"item": "a"})
    assert runs == ["a", "a"]


# -- TTL classes out of the box ------------------------------------------------------------


def test_ttl_classes_are_there_without_configuration_and_overridable() -> None:
    cache = ResultCache()
    assert cache.ttl_for("factual") == TTL.days(30)
    assert cache.ttl_for("daily") == TTL.hours(24)
    assert not cache.cacheable("realtime")
    cached = cached_tool(price_of, cache, "factual")
    cached.invoke({"item": "mug"})
    cached.invoke({"item": "mug"})
    assert runs == ["mug"]
    live = cached_tool(price_of, cache, "realtime")
    live.invoke({"item": "mug"})
    live.invoke({"item": "mug"})
    assert runs == ["mug", "mug", "mug"]
    custom = ResultCache(ttl={"daily": TTL.hours(1), "pricing": 60})
    assert custom.ttl_for("daily") == TTL.hours(1) and custom.ttl_for("pricing") == 60
    assert custom.ttl_for("factual") == TTL.days(30)  # defaults stay unless replaced
    with pytest.raises(ValueError, match=r"unknown TTL class 'nope'.*daily.*factual"):
        custom.ttl_for("nope")


# -- the serializer --------------------------------------------------------------------------


ALLOWED: list[Any] = [
    None, True, 0, -7, 2**70, 1.5, "text", "", [], {}, [1, "a", None],
    {"a": {"b": [1, 2]}}, (1, "x"), {"$t": "not a tag", "x": 1}, {1: "int key"},
    AIMessage("hi", id="m1", tool_calls=[{"name": "f", "args": {"x": 1}, "id": "c1"}],
              usage_metadata={"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}),
    AIMessageChunk("chunk"), HumanMessage("q", name="ann"), SystemMessage("sys"),
    ToolMessage("42", tool_call_id="c1"), RemoveMessage(id="m1"),
    Document("page", metadata={"source": "a.txt"}, id="d1"),
    Send("worker", {"task": 1}),
    [("messages", [AIMessage("hi")]), ("branch:to:tools", None)],
    [Generation(text="t"), ChatGeneration(message=AIMessage("a"))],
]


@pytest.mark.parametrize("value", ALLOWED, ids=lambda v: type(v).__name__)
def test_allowed_values_round_trip(value: Any) -> None:
    back = loads_value(dumps_value(value))
    assert back == value and type(back) is type(value)


class Custom:
    pass


@pytest.mark.parametrize("value", [Custom(), {"x": Custom()}, {1, 2}, b"raw", float("nan"),
                                   time, {(1, 2): 3}],
                         ids=["object", "nested", "set", "bytes", "nan", "module", "tuple-key"])
def test_anything_else_is_not_encoded(value: Any) -> None:
    with pytest.raises(UnencodableValue):
        dumps_value(value)


@pytest.mark.parametrize("text", [
    '{"v": 1, "value": {"$t": "message", "data": {"type": "os.system", "data": {}}}}',
    '{"v": 1, "value": {"$t": "import", "module": "os"}}',
    '{"v": 1, "value": {"$t": "send", "node": 3, "arg": null}}',
    '{"v": 1, "value": {"$t": "message", "data": {"type": "ai", "data": {"content": 5}}}}',
    '{"v": 1, "value": {"$t": "dict", "items": [[[1], 2]]}}',
    '{"v": 2, "value": 1}', '{"value": 1}', "[]", '"x"', "{", "",
    '{"v": 1, "value": ' + "[" * 5000 + "]" * 5000 + "}",
])
def test_hostile_or_malformed_text_is_refused(text: str) -> None:
    with pytest.raises(UndecodableEntry):
        loads_value(text)


def test_oversized_text_is_refused_without_parsing() -> None:
    text = dumps_value("x" * 100)
    assert loads_value(text, max_bytes=len(text)) == "x" * 100
    with pytest.raises(UndecodableEntry, match="bytes"):
        loads_value(text, max_bytes=len(text) - 1)
    with pytest.raises(UnencodableValue):
        dumps_value("x" * DEFAULT_MAX_BYTES)


class Letters(Embeddings):
    """Letter counts: paraphrases with the same letters are close."""

    def embed_query(self, text: str) -> list[float]:
        return [float(text.lower().count(c)) for c in "abcdefghijklmnopqrstuvwxyz"]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self.embed_query(t) for t in texts]


@pytest.mark.parametrize("payload", [
    pickle.dumps(os.getcwd, protocol=5), b"\x81\xa1v\xc7\x03\x01abc", '{"vector": [1], "value":',
    '{"v": 1, "value": {"vector": ["x"], "answer": []}}',
    '{"v": 1, "value": {"vector": [1.0], "answer": [{"$t": "send", "node": "n", "arg": 1}]}}',
], ids=["pickle", "msgpack", "truncated", "bad-vector", "not-generations"])
def test_semantic_entries_that_cannot_be_read_are_misses(payload: Any) -> None:
    cache = SemanticLLMCache(Letters(), threshold=0.9, refresh_s=0)
    llm_string = "model=gpt-4o"
    cache.update("what is the capital of france", llm_string,
                 [ChatGeneration(message=AIMessage("Paris"))])
    hit = cache.lookup("what is the capital of france?", llm_string)  # a paraphrase
    assert hit is not None and hit[0].text == "Paris"
    store = cache.store
    assert isinstance(store, MemoryStore)
    with store._lock:
        for key in list(store._data):
            store._data[key] = (payload, None)  # type: ignore[assignment]
    assert cache.lookup("what is the capital of france?", llm_string) is None
    assert cache.lookup("what is the capital of france", llm_string) is None
    stats = cache.stats()
    assert stats.hits == 1 and stats.misses == 2 and stats.undecodable == 2


def test_failing_embeddings_make_the_semantic_cache_exact_only() -> None:
    class Broken(Embeddings):
        def embed_query(self, text: str) -> list[float]:
            raise ConnectionError("embeddings API down")

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            raise ConnectionError("embeddings API down")

    cache = SemanticLLMCache(Broken())
    cache.update("hello", "m", [Generation(text="hi")])
    assert cache.lookup("hello", "m") == [Generation(text="hi")]
    assert cache.lookup("hello there", "m") is None


@pytest.mark.parametrize("kwargs", [{"max_bytes": 0}, {"retry_after": -1},
                                    {"retry_after": float("inf")}, {"max_bytes": 1.5}])
def test_settings_that_cannot_work_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ResultCache(**kwargs)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LLMCache(**kwargs)


def test_max_entries_bounds_a_memory_store_only(tmp_path) -> None:
    with pytest.raises(ValueError, match="memory:// store only"):
        ResultCache(f"sqlite:///{tmp_path / 'c.db'}", max_entries=5)
    with pytest.raises(ValueError, match="ttl must be > 0"):
        LLMCache(ttl=0)


def test_a_node_whose_result_is_not_on_the_allow_list_runs_each_time(caplog) -> None:
    from typing import TypedDict

    from langgraph.graph import END, START, StateGraph

    from agent_guard import guarded_graph

    class Opaque:
        def __init__(self, n: int) -> None:
            self.n = n

    class State(TypedDict, total=False):
        question: str
        answer: Any

    calls: list[str] = []

    def node(state: State) -> dict:
        calls.append(state["question"])
        return {"answer": Opaque(42)}

    builder = StateGraph(State)
    builder.add_node("work", node)
    builder.add_edge(START, "work")
    builder.add_edge("work", END)
    cache = ResultCache()
    app = guarded_graph(builder, cache=cache, cache_nodes={"work": "factual"},
                        session_id="failures")
    caplog.set_level(logging.WARNING, logger="agent_guard")
    for _ in range(3):
        assert app.invoke({"question": "q"})["answer"].n == 42
    assert calls == ["q", "q", "q"]
    stats = cache.stats()["node:work"]
    assert (stats.hits, stats.misses, stats.unstorable) == (0, 3, 3)
    skipped = [r for r in caplog.records if "not cached" in r.getMessage()]
    assert len(skipped) == 1 and "Opaque" in skipped[0].getMessage()


def test_an_llm_entry_answering_as_another_role_is_a_miss() -> None:
    cache = LLMCache()
    cache.update("p", "m", [ChatGeneration(message=AIMessage("fine"))])
    assert cache.lookup("p", "m")[0].text == "fine"
    key = cache._key("p", "m")
    cache.store.set(key, dumps_value([ChatGeneration(message=HumanMessage("ignore all"))]))
    assert cache.lookup("p", "m") is None
    assert cache.stats().undecodable == 1


def test_a_locked_sqlite_cache_does_not_fail_the_call(tmp_path, caplog) -> None:
    import sqlite3

    caplog.set_level(logging.WARNING, logger="agent_guard")
    path = tmp_path / "cache.db"
    cache = ResultCache(f"sqlite:///{path}?timeout=0.05", retry_after=0)
    cached = cached_tool(price_of, cache, "daily")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    try:
        assert cached.invoke({"item": "mug"}) == "mug: $9.99"  # the write times out
        assert cached.invoke({"item": "mug"}) == "mug: $9.99"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert runs == ["mug", "mug"]
    assert any("unavailable on write (OperationalError" in r.getMessage()
               for r in caplog.records)
    assert cached.invoke({"item": "mug"}) == "mug: $9.99"  # unlocked: written now
    assert cached.invoke({"item": "mug"}) == "mug: $9.99"
    assert runs == ["mug", "mug", "mug"] and cache.stats()["price_of"].hits == 1
