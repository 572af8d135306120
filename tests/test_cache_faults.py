"""The cache's own Redis stopped, slowed and restarted during a run: every tool and model
call still answers, the misses are counted, and the ledger's caps still hold.

The cache runs on a dedicated redis-server started for the test on a free loopback
port (no persistence, so a restart comes back empty); the ledger is in memory or on
the shared test Redis. One guarded graph uses all three caches: its node ``answer``
is cached (``cache_nodes``), calls a ``cached_tool`` and a real ``ChatOpenAI`` with an
``LLMCache``, against ``FakeOpenAIServer``.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.messages import AnyMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from agent_guard import Guard, Limits, guarded_graph
from agent_guard.cache import LLMCache, ResultCache, cached_tool
from agent_guard.errors import StepLimitExceeded
from agent_guard.ledger import from_url as ledger_from_url
from agent_guard.stores import redis_client
from agent_guard.testing import FakeOpenAIServer, FakeReply

from .conftest import REDIS_URL, require_redis
from .test_redis_faults import RedisServer, require_redis_server

ANSWER = "The mug costs $9.99."
RETRY_AFTER = 0.05  # how long the caches leave a failed store alone (seconds)
runs: list[str] = []


@tool
def price_of(item: str) -> str:
    """Look up today's price of an item."""
    runs.append(item)
    return f"{item}: $9.99"


class Chat(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


@pytest.fixture
def cache_server(tmp_path: Path):
    srv = RedisServer(require_redis_server(), tmp_path, persistent=False)
    srv.start()
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        srv.stop()


def sleep_server(server: RedisServer, seconds: float) -> threading.Thread:
    """Block the server for ``seconds`` (DEBUG SLEEP); returns once it sleeps."""
    def run() -> None:
        with server.admin() as client:
            client.execute_command("DEBUG", "SLEEP", seconds)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 5
    while True:  # asleep once another client's PING goes unanswered
        probe = redis_client(server.url, socket_timeout=0.05)  # no retries
        try:
            probe.ping()
        except Exception:
            return t
        finally:
            probe.close()
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.parametrize("ledger_kind", ["memory", "redis"])
def test_cache_redis_stopped_slowed_restarted(cache_server: RedisServer, ledger_kind: str,
                                              redis_namespace: str, caplog) -> None:
    runs.clear()
    ns = uuid.uuid4().hex[:10]
    cache_url = (f"{cache_server.url}?socket_timeout=0.2&socket_connect_timeout=0.2"
                 f"&timeout=0.2&namespace={ns}")
    results = ResultCache(cache_url, ttl={"pricing": 3600.0}, retry_after=RETRY_AFTER)
    llm_cache = LLMCache(results.store, ttl=3600.0, retry_after=RETRY_AFTER)
    assert results.namespace == llm_cache.namespace == ns
    if ledger_kind == "redis":
        require_redis()
        ledger = ledger_from_url(f"{REDIS_URL}?namespace={redis_namespace}")
    else:
        ledger = ledger_from_url("memory://")
    cap = 9  # model calls: reached in the last phase
    guard = Guard(Limits(max_model_calls=cap), ledger=ledger)
    records: list = []
    guard.add_record_hook(records.append)

    with FakeOpenAIServer([FakeReply(ANSWER, prompt_tokens=20, completion_tokens=6)]) as srv:
        llm = ChatOpenAI(model="gpt-4o", base_url=srv.base_url, api_key="x", max_retries=0,
                         max_tokens=20, cache=llm_cache)
        price = cached_tool(price_of, results, "pricing")

        def answer(state: Chat, config: RunnableConfig) -> dict:
            quote = price.invoke({"item": "mug"}, config)
            reply = llm.invoke([*state["messages"], HumanMessage(f"tool said: {quote}")],
                               config)
            return {"messages": [reply]}

        builder = StateGraph(Chat)
        builder.add_node("answer", answer)
        builder.add_edge(START, "answer")
        builder.add_edge("answer", END)
        app = guarded_graph(builder, guard=guard, cache=results,
                            cache_nodes={"answer": "daily"})

        def turn(question: str) -> str:
            out = app.invoke({"messages": [("user", question)]},
                             {"configurable": {"thread_id": "s1"}})
            return str(out["messages"][-1].content)

        def node_stats() -> Any:
            return results.stats()["node:answer"]

        # up: two questions, each asked twice; the second time the node is a hit
        for q in ["q0", "q1", "q0", "q1"]:
            assert turn(q) == ANSWER
        assert (srv.request_count, node_stats().hits, node_stats().errors) == (2, 2, 0)

        # stopped: every call answers, each lookup is a counted miss
        cache_server.stop()
        for q in ["q0", "q1", "q0"]:
            assert turn(q) == ANSWER
        assert srv.request_count == 5
        assert node_stats().hits == 2 and node_stats().errors == 3
        assert results.stats()["price_of"].errors >= 1  # the first lookup found it down
        assert llm_cache.stats().errors >= 1

        # restarted (empty): after the back-off the cache is used again
        cache_server.start()
        time.sleep(RETRY_AFTER * 2)
        assert turn("q0") == ANSWER  # an honest miss, written back
        assert turn("q0") == ANSWER  # a hit
        assert srv.request_count == 6 and node_stats().hits == 3

        # slowed past the cache's timeouts: the turn answers while Redis still sleeps
        asleep = sleep_server(cache_server, 2.0)
        errors_before = node_stats().errors
        assert turn("q1-slow") == ANSWER
        assert asleep.is_alive(), "the turn waited for the slow cache"
        asleep.join()
        assert node_stats().errors == errors_before + 1 and srv.request_count == 7

        # stopped again, and the model-call cap is reached: the ledger still refuses
        cache_server.stop()
        refused = 0
        for i in range(5):
            try:
                assert turn(f"new question {i}") == ANSWER
            except StepLimitExceeded:
                refused += 1
        assert srv.request_count == cap and refused == 5 - (cap - 7)
        assert guard.usage("s1").model_calls == cap
        billed = [r for r in records if r.kind == "model" and r.outcome == "ok"]
        assert len(billed) == srv.request_count  # every request that was billed, charged

    down = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(down) == len(set(down))  # logged once per cause
    results.store.close()
    ledger.close()
