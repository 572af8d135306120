"""The exact LLM cache passes LangChain's standard cache suites on memory, SQLite and Redis;
the semantic cache matches paraphrases only above its threshold and never tool calls."""

from __future__ import annotations

import math
import re
import uuid
import zlib
from collections import Counter

import pytest
from langchain_core.embeddings import Embeddings
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import AsyncCacheTestSuite, SyncCacheTestSuite

from agent_guard import Guard, GuardCallbackHandler, Limits
from agent_guard.cache import LLMCache, SemanticLLMCache, calibrate
from agent_guard.testing import FakeOpenAIServer, FakeReply

from .conftest import REDIS_URL, require_redis


def make_cache(kind: str, tmp_path) -> LLMCache:
    if kind == "memory":
        return LLMCache("memory://")
    if kind == "sqlite":
        return LLMCache(f"sqlite:///{tmp_path / 'llm.db'}")
    require_redis()
    return LLMCache(REDIS_URL, namespace=f"std-{uuid.uuid4().hex[:10]}")


@pytest.fixture(params=["memory", "sqlite", "redis"])
def kind(request) -> str:
    return str(request.param)


class TestLLMCacheSync(SyncCacheTestSuite):
    @pytest.fixture
    def cache(self, kind, tmp_path) -> LLMCache:
        c = make_cache(kind, tmp_path)
        yield c
        c.clear()


class TestLLMCacheAsync(AsyncCacheTestSuite):
    @pytest.fixture
    async def cache(self, kind, tmp_path) -> LLMCache:
        c = make_cache(kind, tmp_path)
        yield c
        c.clear()


class WordEmbeddings(Embeddings):
    """Bag of words, hashed into 64 dimensions: paraphrases sharing words are close."""

    def embed_query(self, text: str) -> list[float]:
        counts = Counter(re.findall(r"[a-z0-9]+", text.lower()))
        vec = [0.0] * 64
        for word, n in counts.items():
            vec[zlib.crc32(word.encode()) % 64] += n  # not hash(): seeded per process
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        return [v / norm for v in vec]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self.embed_query(t) for t in texts]


@pytest.fixture
def server():
    with FakeOpenAIServer([FakeReply("Paris is the capital of France.", prompt_tokens=30,
                                     completion_tokens=8)]) as srv:
        yield srv


def chat(server, cache) -> ChatOpenAI:
    return ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="k", max_retries=0,
                      max_tokens=50, cache=cache)


def test_exact_hits_are_free_and_recorded_as_savings(server) -> None:
    guard = Guard(Limits(max_cost_usd=1))
    records: list = []
    guard.add_record_hook(records.append)
    llm = chat(server, LLMCache())
    cfg = {"callbacks": [GuardCallbackHandler(guard, session_id="default")]}
    llm.invoke("What is the capital of France?", config=cfg)
    llm.invoke("What is the capital of France?", config=cfg)
    assert server.request_count == 1
    assert [r.outcome for r in records] == ["ok", "cache_hit"]
    assert records[1].cost_nano == 0 and records[1].saved_nano == records[0].cost_nano > 0
    assert guard.usage("default").cost_nano == records[0].cost_nano


def test_tenants_do_not_share_answers(server) -> None:
    cache = LLMCache()
    chat(server, cache.for_tenant("acme")).invoke("secret plan?")
    chat(server, cache.for_tenant("globex")).invoke("secret plan?")
    chat(server, cache.for_tenant("acme")).invoke("secret plan?")
    assert server.request_count == 2


@pytest.mark.parametrize("cache_kind", ["exact", "semantic"])
def test_a_model_called_directly_keeps_each_tenants_answers_apart(server,
                                                                  cache_kind: str) -> None:
    """The tenant in the call's own config metadata (no graph or chain around it, so no
    runnable context) decides the cache entry, sync, async and batched."""
    import asyncio

    cache = LLMCache() if cache_kind == "exact" else SemanticLLMCache(WordEmbeddings(),
                                                                       threshold=0.8)
    llm = chat(server, cache)

    def as_tenant(tenant: str) -> dict:
        return {"metadata": {"tenant": tenant}}

    llm.invoke("secret plan?", config=as_tenant("acme"))
    llm.invoke("secret plan?", config=as_tenant("globex"))
    assert server.request_count == 2  # globex was not served acme's answer
    llm.invoke("secret plan?", config=as_tenant("acme"))
    assert server.request_count == 2  # acme's own entry

    async def both() -> None:
        await llm.ainvoke("budget?", config=as_tenant("acme"))
        await llm.ainvoke("budget?", config=as_tenant("globex"))
        await llm.ainvoke("budget?", config=as_tenant("globex"))

    asyncio.run(both())
    assert server.request_count == 4
    llm.batch(["roadmap?", "roadmap?"], config=[as_tenant("acme"), as_tenant("globex")])
    assert server.request_count == 6
    llm.invoke("secret plan?")  # no tenant at all: the shared default entry
    assert server.request_count == 7


def test_semantic_hits_paraphrases_above_the_threshold_only(server) -> None:
    cache = SemanticLLMCache(WordEmbeddings(), threshold=0.8)
    llm = chat(server, cache)
    llm.invoke("What is the capital of France?")
    llm.invoke("what is the capital of france")  # same words: a semantic hit
    assert server.request_count == 1
    llm.invoke("Explain the French revolution in detail please")
    assert server.request_count == 2


def test_semantic_matching_never_applies_to_tool_calls(server) -> None:
    cache = SemanticLLMCache(WordEmbeddings(), threshold=0.5)
    llm = chat(server, cache)
    call = AIMessage("", tool_calls=[{"name": "convert", "args": {"amount": 100}, "id": "c1"}])
    llm.invoke([HumanMessage("convert 100 USD to EUR"), call,
                ToolMessage("92 EUR", tool_call_id="c1")])
    llm.invoke([HumanMessage("convert 100 EUR to USD"), call,
                ToolMessage("108 USD", tool_call_id="c1")])
    assert server.request_count == 2
    tools = [{"type": "function", "function": {"name": "convert", "parameters": {}}}]
    llm.bind_tools(tools).invoke("convert 100 USD to EUR")
    llm.bind_tools(tools).invoke("convert 100 EUR to USD")  # same words, tools bound
    assert server.request_count == 4


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_semantic_index_is_shared_through_the_store(server, tmp_path, backend) -> None:
    if backend == "sqlite":
        url, ns = f"sqlite:///{tmp_path / 'sem.db'}", "sem"
    else:
        require_redis()
        url, ns = REDIS_URL, f"sem-{uuid.uuid4().hex[:10]}"
    first = SemanticLLMCache(WordEmbeddings(), url, threshold=0.8, namespace=ns)
    chat(server, first).invoke("What is the capital of France?")
    other_process = SemanticLLMCache(WordEmbeddings(), url, threshold=0.8, namespace=ns)
    chat(server, other_process).invoke("what is the capital of france?")
    assert server.request_count == 1
    first.clear()


def test_calibrate_reports_precision_and_recall() -> None:
    pairs = [("what is the capital of france", "capital of france?", True),
             ("convert 100 usd to eur", "convert 100 eur to usd", False),
             ("hello there", "weather in paris tomorrow", False)]
    table = calibrate(WordEmbeddings(), pairs, thresholds=(0.5, 0.99999))
    low, high = table
    assert low["false_hits"] == 1 and low["precision"] == 0.5  # USD/EUR swap: same words
    # the swapped conversion has the very same words: no threshold separates it, which is
    # why semantic matching is kept away from tool arguments
    assert high["false_hits"] == 1 and high["true_hits"] == 0 and high["recall"] == 0.0


def _conversation(ids: list[str], call_ids: list[str], args: str = "A1") -> str:
    from langchain_core.load import dumps

    return dumps([
        HumanMessage("where is my order?", id=ids[0]),
        AIMessage("", id=ids[1], tool_calls=[
            {"name": "lookup", "args": {"order": args}, "id": call_ids[0]},
            {"name": "lookup", "args": {"order": "B2"}, "id": call_ids[1]}],
            usage_metadata={"input_tokens": 9, "output_tokens": 3, "total_tokens": 12,
                            "total_cost": 0.01},  # type: ignore[typeddict-unknown-key]
            response_metadata={"id": ids[1], "model_name": "gpt-4o"}),
        ToolMessage("A1: shipped", tool_call_id=call_ids[0], id=ids[2]),
        ToolMessage("B2: lost", tool_call_id=call_ids[1], id=ids[3]),
    ])


def test_the_same_conversation_in_another_run_has_the_same_key() -> None:
    from agent_guard.cache.llm import canonical_prompt

    one = _conversation(["h1", "a1", "t1", "t2"], ["call_x", "call_y"])
    two = _conversation(["h9", "a9", "t8", "t9"], ["call_p", "call_q"])
    assert one != two and canonical_prompt(one) == canonical_prompt(two)
    # what the model is asked still matters: other arguments, or results swapped between calls
    assert canonical_prompt(_conversation(["h", "a", "t", "u"], ["c1", "c2"], args="Z9")) \
        != canonical_prompt(one)
    swapped = _conversation(["h", "a", "t", "u"], ["c1", "c2"]).replace(
        '"tool_call_id": "c1"', '"tool_call_id": "TMP"').replace(
        '"tool_call_id": "c2"', '"tool_call_id": "c1"').replace(
        '"tool_call_id": "TMP"', '"tool_call_id": "c2"')
    assert canonical_prompt(swapped) != canonical_prompt(one)
    assert canonical_prompt("plain text prompt") == "plain text prompt"


def test_a_repeated_agent_run_is_answered_from_the_cache_after_the_first_turn() -> None:
    from langchain.agents import create_agent
    from langchain_core.tools import tool

    from agent_guard.testing import ScriptedChatModel

    @tool
    def lookup(order: str) -> str:
        """Look up an order."""
        return f"{order}: shipped"

    def respond(messages: list) -> AIMessage:
        if isinstance(messages[-1], ToolMessage):
            return AIMessage("Your order has shipped.")
        return AIMessage("", tool_calls=[{"name": "lookup", "args": {"order": "A1"},
                                          "id": f"call_{uuid.uuid4().hex[:8]}"}])

    guard = Guard(Limits(max_cost_usd=1))
    records = []
    guard.add_record_hook(records.append)
    model = ScriptedChatModel(model_name="gpt-4o", respond=respond, max_tokens=50,
                              cache=LLMCache("memory://"))
    agent = create_agent(model, [lookup])
    for run in range(2):
        agent.invoke({"messages": [("user", "where is A1?")]},
                     config={"callbacks": [GuardCallbackHandler(guard, session_id="default")],
                             "configurable": {"thread_id": f"r{run}"}})
    outcomes = [r.outcome for r in records if r.kind == "model"]
    assert outcomes == ["ok", "ok", "cache_hit", "cache_hit"]
