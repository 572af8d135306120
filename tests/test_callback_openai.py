"""GuardCallbackHandler on the real ChatOpenAI, against a local OpenAI-compatible server.

The server speaks the OpenAI wire format (JSON and SSE, with and without the
usage chunk), so these tests run ChatOpenAI's own request and parsing code.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI

from agent_guard import (
    BudgetExceeded,
    Guard,
    GuardCallbackHandler,
    Limits,
    OutputCapExceeded,
    StepLimitExceeded,
)
from agent_guard.engine.usage import usd_to_nano
from agent_guard.testing import FakeOpenAIServer, FakeReply

IN, OUT, CACHED = Decimal("2.5e-06"), Decimal("1e-05"), Decimal("1.25e-06")  # gpt-4o


def expected_nano(prompt: int, completion: int, cached: int = 0) -> int:
    return usd_to_nano((prompt - cached) * IN + cached * CACHED + completion * OUT)


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    reply = FakeReply(content="The refund was issued on Monday.", prompt_tokens=1200,
                      completion_tokens=300, cached_tokens=1024)
    with FakeOpenAIServer(replies=[reply]) as srv:
        yield srv


def model(server: FakeOpenAIServer, **kw) -> ChatOpenAI:
    kw.setdefault("max_tokens", 400)
    return ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="test-key",
                      max_retries=0, **kw)


def guarded(limits: Limits | None = None, session: str = "t1") -> GuardCallbackHandler:
    return GuardCallbackHandler(limits=limits or Limits(max_cost_usd=1), session_id=session)


def test_invoke_records_the_exact_cost(server: FakeOpenAIServer) -> None:
    records = []
    handler = guarded()
    handler.guard.add_record_hook(records.append)
    answer = model(server).invoke("When was my refund issued?",
                                  config={"callbacks": [handler]})
    assert "Monday" in answer.content
    [record] = records
    assert record.cost_nano == expected_nano(1200, 300, cached=1024)
    assert not record.usage_estimated and record.outcome == "ok"
    assert record.model.startswith("gpt-4o")
    usage = handler.guard.usage("t1")
    assert usage.cost_nano == record.cost_nano and usage.reserved_nano == 0
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens) == (1200, 300, 1024)
    assert usage.model_calls == 1


def test_n_choices_are_charged_once_and_reserved_for_all() -> None:
    """n=3: OpenAI reports one usage for the request (all choices' output in it) and
    langchain-openai attaches it to every choice: charged once; the reservation covers
    three choices' worth of max_tokens."""
    reply = FakeReply(content="one of three", prompt_tokens=100, completion_tokens=20)
    with FakeOpenAIServer(replies=[reply]) as srv:
        records = []
        handler = guarded()
        handler.guard.add_record_hook(records.append)
        result = model(srv, n=3).generate([[HumanMessage("pick a name")]],
                                          callbacks=[handler])
    assert len(result.generations[0]) == 3
    [record] = records
    assert (record.usage.input_tokens, record.usage.output_tokens) == (100, 60)
    assert record.cost_nano == expected_nano(100, 60)
    assert record.max_output_tokens == 3 * 400
    assert handler.guard.usage("t1").cost_nano == record.cost_nano


def test_stream_with_usage_chunk_records_the_exact_cost(server: FakeOpenAIServer) -> None:
    handler = guarded()
    chunks = list(model(server, stream_usage=True).stream("hi", config={"callbacks": [handler]}))
    assert "".join(c.content for c in chunks) == "The refund was issued on Monday."
    assert server.requests[-1]["stream_options"] == {"include_usage": True}
    assert handler.guard.usage("t1").cost_nano == expected_nano(1200, 300, cached=1024)


def test_stream_without_usage_is_estimated_never_zero(server: FakeOpenAIServer) -> None:
    records = []
    handler = guarded()
    handler.guard.add_record_hook(records.append)
    list(model(server).stream("When was my refund issued?", config={"callbacks": [handler]}))
    assert "stream_options" not in server.requests[-1]  # base_url set: no usage chunk asked
    [record] = records
    assert record.usage_estimated
    assert record.usage.output_tokens >= 5 and record.usage.input_tokens > 0
    assert record.cost_nano > 0
    assert handler.guard.usage("t1").cost_nano == record.cost_nano


def test_refused_call_never_reaches_the_server(server: FakeOpenAIServer) -> None:
    handler = guarded(Limits(max_cost_usd="0.001"))  # 400 output tokens alone cost $0.004
    with pytest.raises(BudgetExceeded) as info:
        model(server).invoke("hi", config={"callbacks": [handler]})
    assert server.request_count == 0
    assert info.value.session == "t1"
    assert handler.guard.usage("t1").reserved_nano == 0


async def test_refusal_raises_under_ainvoke_too(server: FakeOpenAIServer) -> None:
    handler = guarded(Limits(max_cost_usd="0.001"))
    with pytest.raises(BudgetExceeded):
        await model(server).ainvoke("hi", config={"callbacks": [handler]})
    assert server.request_count == 0


async def test_ainvoke_and_astream_settle(server: FakeOpenAIServer) -> None:
    handler = guarded()
    await model(server).ainvoke("hi", config={"callbacks": [handler]})
    async for _ in model(server, stream_usage=True).astream("hi", config={"callbacks": [handler]}):
        pass
    usage = handler.guard.usage("t1")
    assert usage.cost_nano == 2 * expected_nano(1200, 300, cached=1024)
    assert usage.model_calls == 2 and usage.reserved_nano == 0


def test_cap_stops_the_second_call(server: FakeOpenAIServer) -> None:
    # a call reserves ~$0.0040 (400 output tokens at $10/M) and settles at $0.00472,
    # so the second worst case no longer fits in $0.008
    handler = guarded(Limits(max_cost_usd="0.008"))
    llm = model(server)
    llm.invoke("a", config={"callbacks": [handler]})
    with pytest.raises(BudgetExceeded):
        llm.invoke("b", config={"callbacks": [handler]})
    assert server.request_count == 1


def test_a_stream_past_its_reservation_is_stopped_and_charged() -> None:
    long_answer = " ".join(["word"] * 300)
    with FakeOpenAIServer(replies=[FakeReply(content=long_answer)]) as srv:
        handler = guarded()
        llm = model(srv, max_tokens=20)  # the fake server ignores max_tokens
        got = []
        with pytest.raises(OutputCapExceeded) as info:
            for chunk in llm.stream("talk", config={"callbacks": [handler]}):
                got.append(chunk.content)
        assert info.value.cap == 20
        assert 0 < len(got) < 300
        usage = handler.guard.usage("t1")
        assert usage.output_tokens > 20 and usage.cost_nano > 0 and usage.reserved_nano == 0


def test_langchain_cache_hits_are_not_charged(server: FakeOpenAIServer) -> None:
    records = []
    handler = guarded()
    handler.guard.add_record_hook(records.append)
    llm = model(server, cache=InMemoryCache())
    llm.invoke("same question", config={"callbacks": [handler]})
    llm.invoke("same question", config={"callbacks": [handler]})
    assert server.request_count == 1
    assert [r.outcome for r in records] == ["ok", "cache_hit"]
    assert records[1].saved_nano == records[0].cost_nano and records[1].cost_nano == 0
    assert handler.guard.usage("t1").cost_nano == records[0].cost_nano


def test_a_provider_error_releases_the_reservation() -> None:
    error = FakeReply(status=429, error_body={"error": {"message": "slow down",
                                                        "type": "rate_limit", "code": None}})
    with FakeOpenAIServer(replies=[error]) as srv:
        handler = guarded()
        with pytest.raises(Exception, match="slow down"):
            model(srv).invoke("hi", config={"callbacks": [handler]})
        usage = handler.guard.usage("t1")
        assert usage.cost_nano == 0 and usage.reserved_nano == 0 and usage.model_calls == 0


def test_the_session_comes_from_thread_id_then_metadata(server: FakeOpenAIServer) -> None:
    guard = Guard(Limits(max_cost_usd=1))
    handler = GuardCallbackHandler(guard, session_id="fallback")
    llm = model(server)
    llm.invoke("a", config={"callbacks": [handler], "metadata": {"thread_id": "th"}})
    llm.invoke("a", config={"callbacks": [handler], "metadata": {"session_id": "se"}})
    llm.invoke("a", config={"callbacks": [handler]})
    assert [guard.usage(s).model_calls for s in ("th", "se", "fallback")] == [1, 1, 1]


def test_caps_are_shared_through_a_sqlite_ledger(server: FakeOpenAIServer, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'guard.db'}"
    limits = Limits(max_model_calls=2)
    first = GuardCallbackHandler(limits=limits, ledger=url, session_id="shared")
    second = GuardCallbackHandler(limits=limits, ledger=url, session_id="shared")
    model(server).invoke("a", config={"callbacks": [first]})
    model(server).invoke("b", config={"callbacks": [second]})
    with pytest.raises(StepLimitExceeded):
        model(server).invoke("c", config={"callbacks": [first]})
    assert server.request_count == 2
