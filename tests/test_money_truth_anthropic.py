"""Money truth on Claude (issue 23): the real ``ChatAnthropic`` against
``FakeAnthropicServer``, which bills what Anthropic would at its list prices (cache writes
by duration, reads, thinking as output, the hidden tool-use system prompt, the
long-context tier, answers the client gave up on).

Every row of the issue's table runs through the callback (sync and async), the middleware
(``create_agent``, sync and async) and ``guarded_graph`` (sync and async), on a memory
and a Redis ledger, and asserts: spent <= cap, nothing reserved after, charged >= billed.
The rules are in docs/anthropic.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypedDict

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AnyMessage, HumanMessage, SystemMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from agent_guard import (
    BudgetExceeded,
    Guard,
    GuardCallbackHandler,
    GuardMiddleware,
    Limits,
    guarded_graph,
)
from agent_guard.compat import RunnableCallable
from agent_guard.engine.records import CallRecord
from agent_guard.ledger import Ledger
from agent_guard.testing import AnthropicReply, FakeAnthropicServer

pytest.importorskip("langchain_anthropic")
from langchain_anthropic import ChatAnthropic, _client_utils

SESSION = "claude"
MODEL = "claude-sonnet-4-5"
ADAPTERS = ["callback", "middleware", "graph"]
MODES = ["sync", "async"]
PROSE = ("The committee reviewed the quarterly figures and agreed that the budget for the "
         "next release should stay within the limits set in spring. ")


@pytest.fixture
def ledger(memory_or_redis_ledger: Ledger) -> Ledger:
    return memory_or_redis_ledger


@pytest.fixture(autouse=True)
def quick_sdk_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The anthropic SDK waits 0.5 s and more between its own retries; 10 ms here."""
    monkeypatch.setattr("anthropic._base_client.INITIAL_RETRY_DELAY", 0.01)
    monkeypatch.setattr("anthropic._base_client.MAX_RETRY_DELAY", 0.02)


_LOOP: list[asyncio.AbstractEventLoop] = []


@pytest.fixture(autouse=True)
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for a test's async calls: the anthropic client is bound to the loop
    it first ran on."""
    made = asyncio.new_event_loop()
    _LOOP[:] = [made]
    yield made
    made.close()


def arun(coro: Any) -> Any:
    return _LOOP[0].run_until_complete(coro)


class Books:
    """A guard on ``ledger`` with a dollar cap, and the records it emitted."""

    def __init__(self, ledger: Ledger, cap_usd: str = "1", **limits: Any) -> None:
        self.records: list[CallRecord] = []
        self.guard = Guard(Limits(max_cost_usd=cap_usd, **limits), ledger=ledger,
                           on_record=[self.records.append])
        self.cap_nano = self.guard.limits.max_cost_nano
        self.handlers: list[GuardCallbackHandler] = []

    def model_records(self) -> list[CallRecord]:
        return [r for r in self.records if r.kind == "model"]

    def check(self, server: FakeAnthropicServer, timeout: float = 5.0) -> tuple[int, int]:
        """The three promises; returns (charged, billed) in nano-USD."""
        deadline = time.monotonic() + timeout
        usage = self.guard.usage(SESSION)
        while (usage.reserved_nano or any(h.open_runs for h in self.handlers)) \
                and time.monotonic() < deadline:
            # the test's event loop goes on running, as an application's does: a task a
            # cut stream left behind finishes (and its call ends) there
            arun(asyncio.sleep(0.02))
            usage = self.guard.usage(SESSION)
        billed = server.billed_nano()
        assert usage.reserved_nano == 0, "a hold outlived the run"
        assert usage.cost_nano <= self.cap_nano, "spend passed the cap"
        assert usage.cost_nano >= billed, (
            f"charged {usage.cost_nano} < billed {billed} ({server.billed})")
        # every call's reservation covers its bill: a call admitted at the cap stays under it
        records = self.model_records()
        if len(records) == len(server.billed):
            for record, bill in zip(records, server.billed, strict=True):
                assert record.reserved_nano >= bill.cost_nano(), (record, bill)
        # the figures: pytest -s ... | grep FIGURE
        print(f"\nFIGURE {os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}: charged "
              f"${usage.cost_nano / 1e9:.5f} billed ${billed / 1e9:.5f} cap "
              f"${self.cap_nano / 1e9:.5f} calls {len(server.billed)}")
        return usage.cost_nano, billed


def claude(server: FakeAnthropicServer, **kw: Any) -> ChatAnthropic:
    """``ChatAnthropic`` on ``server``; langchain-anthropic caches its httpx clients by
    base URL, and one bound to an earlier test's loop must not serve this one."""
    _client_utils._get_default_async_httpx_client.cache_clear()
    _client_utils._get_default_httpx_client.cache_clear()
    kw.setdefault("max_retries", 0)
    kw.setdefault("max_tokens", 200)
    kw.setdefault("model", MODEL)
    return ChatAnthropic(base_url=server.base_url, api_key="test", **kw)


class Msgs(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def _graph(llm: Any) -> StateGraph:
    def call(state: Msgs) -> Msgs:
        return {"messages": [llm.invoke(state["messages"])]}

    async def acall(state: Msgs) -> Msgs:
        return {"messages": [await llm.ainvoke(state["messages"])]}

    builder = StateGraph(Msgs)
    builder.add_node("model", RunnableCallable(call, acall))
    builder.add_edge(START, "model")
    builder.add_edge("model", END)
    return builder


def runner(books: Books, llm: Any, adapter: str, mode: str, tools: list[Any] | None = None
           ) -> Callable[[list[Any]], Any]:
    """A function that sends ``messages`` once through ``adapter`` in ``mode``."""
    if adapter == "callback":
        handler = GuardCallbackHandler(books.guard, session_id=SESSION)
        books.handlers.append(handler)
        bound = llm.bind_tools(tools) if tools else llm
        config = {"callbacks": [handler]}
        if mode == "sync":
            return lambda msgs: bound.invoke(msgs, config)
        return lambda msgs: arun(bound.ainvoke(msgs, config))
    if adapter == "middleware":
        agent = create_agent(llm, tools or [], middleware=[
            GuardMiddleware(books.guard, session_id=SESSION)])
        if mode == "sync":
            return lambda msgs: agent.invoke({"messages": msgs})
        return lambda msgs: arun(agent.ainvoke({"messages": msgs}))
    bound = llm.bind_tools(tools) if tools else llm
    graph = guarded_graph(_graph(bound), guard=books.guard, session_id=SESSION)
    if mode == "sync":
        return lambda msgs: graph.invoke({"messages": msgs})
    return lambda msgs: arun(graph.ainvoke({"messages": msgs}))


def cached_system(tokens_of_prose: int, ttl: str = "1h") -> SystemMessage:
    """A system prompt marked for Anthropic's prompt cache."""
    text = PROSE * max(1, tokens_of_prose // 25)
    return SystemMessage(content=[{"type": "text", "text": text,
                                   "cache_control": {"type": "ephemeral", "ttl": ttl}}])


@tool
def lookup(city: str) -> str:
    """The weather of a city."""
    return "sunny"


# -- row 1: 1-hour writes reported under ephemeral_1h_input_tokens ---------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_one_hour_writes_and_reads_are_charged_as_billed(ledger: Ledger, adapter: str,
                                                         mode: str) -> None:
    """2,000 one-hour writes + 8,000 reads; langchain-anthropic reports cache_creation 0
    and the writes under ephemeral_1h_input_tokens. Issue: charged $0.00936 < $0.01536."""
    books = Books(ledger)
    reply = AnthropicReply("Noted.", input_tokens=40, cache_write_1h=2000, cache_read=8000)
    with FakeAnthropicServer([reply]) as server:
        runner(books, claude(server), adapter, mode)([cached_system(10_000), HumanMessage("hi")])
        charged, billed = books.check(server)
    assert charged == billed  # usage was reported: charged exactly


# -- row 2 and 3: prompts written to the 1-hour cache, at and until the cap ------------------


@pytest.mark.parametrize("cap", ["0.0409", "0.2"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_call_at_the_cap_whose_prompt_is_written_to_the_1h_cache(ledger: Ledger,
                                                                    adapter: str, mode: str,
                                                                    cap: str) -> None:
    """Issue: the worst case priced the prompt at the plain input rate: $0.0631 billed
    against a $0.0409 cap. Now the 1-hour write rate is reserved: refused under $0.0409,
    admitted under $0.20 with a reservation above the bill."""
    books = Books(ledger, cap_usd=cap)
    with FakeAnthropicServer([AnthropicReply("Noted.")]) as server:
        send = runner(books, claude(server), adapter, mode)
        with contextlib.suppress(BudgetExceeded):
            send([cached_system(10_000), HumanMessage("hi")])
        books.check(server)
    assert len(server.billed) == (0 if cap == "0.0409" else 1)
    if server.billed:
        assert server.billed[0].cache_write_1h > 10_000


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_repeated_cached_invokes_until_refused(ledger: Ledger, adapter: str,
                                               mode: str) -> None:
    """Issue: $0.107 billed against a $0.10 cap."""
    books = Books(ledger, cap_usd="0.10")
    with FakeAnthropicServer([AnthropicReply("Noted. " * 20)]) as server:
        send = runner(books, claude(server), adapter, mode)
        with pytest.raises(BudgetExceeded):
            for i in range(40):
                send([cached_system(3_000), HumanMessage(f"question {i}")])
        books.check(server)
    assert len(server.billed) >= 2


# -- row 4: a content-block stream broken after 20 chunks ----------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["thinking", "tools"])
def test_a_block_stream_broken_after_20_chunks_is_charged(ledger: Ledger, kind: str,
                                                          mode: str) -> None:
    """Issue: charged $0 for $0.0010-0.0022 billed."""
    books = Books(ledger)
    handler = GuardCallbackHandler(books.guard, session_id=SESSION)
    books.handlers.append(handler)
    if kind == "thinking":
        reply = AnthropicReply(PROSE * 4, thinking=PROSE * 6, chunk_delay_s=0.001)
        llm: Any = claude(server := FakeAnthropicServer([reply]).start(), max_tokens=3000,
                          thinking={"type": "enabled", "budget_tokens": 1024})
    else:
        reply = AnthropicReply(PROSE * 3, tool_uses=[{"name": "lookup",
                                                      "input": {"city": "Paris " * 40}}],
                               chunk_delay_s=0.001)
        llm = claude(server := FakeAnthropicServer([reply]).start(), max_tokens=1000)
        llm = llm.bind_tools([lookup])
    try:
        config = {"callbacks": [handler]}
        if mode == "sync":
            stream = llm.stream("hi", config)
            for i, _ in enumerate(stream):
                if i == 19:
                    break
            stream.close()
        else:
            async def run() -> None:
                stream = llm.astream("hi", config)
                i = 0
                async for _ in stream:
                    i += 1
                    if i == 20:
                        break
                await stream.aclose()

            arun(run())
        server.wait_billed(1)
        books.check(server)
    finally:
        server.stop()


# -- row 5: a plain stream that ends exactly at max_tokens ---------------------------------


@pytest.mark.parametrize("ratio", [1.0, 1.2, 1.4])
@pytest.mark.parametrize("mode", MODES)
def test_a_plain_stream_ending_at_max_tokens_is_not_killed(ledger: Ledger, mode: str,
                                                           ratio: float) -> None:
    """Issue: killed by OutputCapExceeded after 50-88% of the answer."""
    books = Books(ledger)
    handler = GuardCallbackHandler(books.guard, session_id=SESSION)
    books.handlers.append(handler)
    with FakeAnthropicServer([AnthropicReply(PROSE * 40)], token_ratio=ratio) as server:
        llm = claude(server, max_tokens=200)
        config = {"callbacks": [handler]}
        if mode == "sync":
            chunks = list(llm.stream("write", config))
        else:
            async def run() -> list[Any]:
                return [c async for c in llm.astream("write", config)]

            chunks = arun(run())
        assert chunks[-1].response_metadata.get("stop_reason") == "max_tokens"
        books.check(server)


# -- row 6: the tool-use system prompt under a middleware shrink ---------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_shrink_with_a_tool_bound_stays_under_the_cap(ledger: Ledger, adapter: str,
                                                        mode: str) -> None:
    """Issue: 81 tokens estimated, 403 billed (346 hidden): 5.7% over a $0.012 cap. The
    middleware shrinks max_tokens to what is left; the callback and guarded_graph refuse
    (they cannot lower it)."""
    books = Books(ledger, cap_usd="0.012")
    long = AnthropicReply(PROSE * 60)
    with FakeAnthropicServer([long]) as server:
        send = runner(books, claude(server, max_tokens=4000), adapter, mode, tools=[lookup])
        with contextlib.suppress(BudgetExceeded):
            send([HumanMessage("Tell me about Paris.")])
        books.check(server)
    if adapter == "middleware":
        [request] = server.requests
        assert request["max_tokens"] < 4000 and request["tools"]
        [bill] = server.billed
        assert bill.input_tokens > 346  # the tool-use system prompt was billed


# -- row 7: a shrink below thinking.budget_tokens ------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_shrink_below_the_thinking_budget_is_refused_not_sent(ledger: Ledger,
                                                               mode: str) -> None:
    """Issue: the middleware sent max_tokens below budget_tokens: the API answered 400."""
    books = Books(ledger, cap_usd="0.02")
    with FakeAnthropicServer([AnthropicReply("ok", thinking=PROSE * 20)]) as server:
        llm = claude(server, max_tokens=8000,
                     thinking={"type": "enabled", "budget_tokens": 2000})
        send = runner(books, llm, "middleware", mode)
        with pytest.raises(BudgetExceeded):
            send([HumanMessage("think")])
        assert server.requests == []
        books.check(server)


# -- row 8: Claude's tokenizer counts more than o200k --------------------------------------


# Kinds of text and how many Claude tokens the server counts per o200k token for each: the
# issue's 1.3 on English, code and JSON (published measurements of Claude 3+ put English
# at 1.16-1.30), and the ratios Claude's published tokenizer gives on other languages
# (scripts/claude_token_factor.py), rounded up.
KINDS = {
    "prose": (PROSE, 1.3),
    "code": ("def total(items):\n    return sum(i.price * i.qty for i in items if i.ok)\n", 1.3),
    "json": ('{"id": 1234, "name": "widget", "tags": ["a", "b"], "price": 12.5}\n', 1.3),
    "german": ("Die Kommission hat die Quartalszahlen geprüft und beschlossen. ", 1.6),
    "russian": ("Комиссия рассмотрела квартальные показатели и решила. ", 2.5),
    "chinese": ("委员会审查了季度数据并同意下一版本的预算应保持在限额之内。", 1.5),
    "hindi": ("समिति ने तिमाही के आंकड़ों की समीक्षा की और सहमति व्यक्त की। ", 3.8),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_prompt_claude_counts_more_than_o200k_is_reserved_above_its_bill(
        ledger: Ledger, adapter: str, mode: str, kind: str) -> None:
    """Issue: a prompt Claude counts 1.3x o200k, at the cap: $0.01558 billed against a
    $0.01520 cap (the estimate was o200k x 1.2 + 5%). Each call's reservation covers its
    bill, so no call at the cap passes it; then calls until refused."""
    text, ratio = KINDS[kind]
    books = Books(ledger, cap_usd="0.0152")
    with FakeAnthropicServer([AnthropicReply("Noted.")], token_ratio=ratio) as server:
        send = runner(books, claude(server, max_tokens=20), adapter, mode)
        prompt = text * 40
        with pytest.raises(BudgetExceeded):
            for _ in range(100):
                send([HumanMessage(prompt)])
                prompt += text * 40
        books.check(server)
    records = books.model_records()
    assert len(records) == len(server.billed) >= 1
    for record, bill in zip(records, server.billed, strict=True):
        assert record.reserved_nano >= bill.cost_nano(), (record, bill)


# -- row 9: the long-context tier ---------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_210k_prompt_with_the_1m_beta_is_charged_long_context_rates(
        ledger: Ledger, adapter: str, mode: str) -> None:
    """Issue: charged $0.638 for $1.271 billed."""
    books = Books(ledger, cap_usd="5")
    with FakeAnthropicServer([AnthropicReply("ok")], token_ratio=1.0) as server:
        llm = claude(server, betas=["context-1m-2025-08-07"])
        runner(books, llm, adapter, mode)([HumanMessage("word " * 209_000)])
        [bill] = server.billed
        assert bill.long_context
        books.check(server)


# -- row 10: a final stream event with only output_tokens -----------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_stream_whose_final_event_has_only_output_tokens(ledger: Ledger, adapter: str,
                                                           mode: str) -> None:
    """Issue: input recorded as 0."""
    books = Books(ledger)
    reply = AnthropicReply("Paris.", final_usage="output_only")
    with FakeAnthropicServer([reply]) as server:
        llm = claude(server, streaming=True)
        runner(books, llm, adapter, mode)([HumanMessage(PROSE * 40)])
        books.check(server)
    [record] = books.model_records()
    assert record.usage.input_tokens >= server.billed[0].prompt_tokens


# -- row 11: the bundled table prices claude-3-5-haiku-20241022 ------------------------------


@pytest.mark.parametrize("model", ["claude-3-5-haiku-20241022", "claude-3-7-sonnet-20250219",
                                   "claude-sonnet-4-20250514", "claude-opus-4-1-20250805",
                                   "claude-3-haiku-20240307", MODEL, "claude-haiku-4-5",
                                   "claude-opus-4-5"])
def test_claude_models_are_priced_at_list(ledger: Ledger, model: str) -> None:
    """Issue: refused, no price."""
    books = Books(ledger)
    reply = AnthropicReply("Noted.", cache_write_5m=300, cache_write_1h=200, cache_read=500)
    with FakeAnthropicServer([reply]) as server:
        runner(books, claude(server, model=model), "callback", "sync")(
            [cached_system(1000, "5m"), HumanMessage("hi")])
        charged, billed = books.check(server)
    assert charged == billed


# -- usage in every shape langchain-anthropic produces --------------------------------------


SHAPES = {
    "plain": (AnthropicReply("Paris."), {}),
    "5m-writes": (AnthropicReply("Paris.", cache_write_5m=700, cache_read=300), {}),
    "1h-writes": (AnthropicReply("Paris.", cache_write_1h=2000, cache_read=8000), {}),
    "both-writes": (AnthropicReply("Paris.", cache_write_5m=100, cache_write_1h=200), {}),
    "writes-no-breakdown": (AnthropicReply("Paris.", cache_write_5m=500, by_ttl=False), {}),
    "thinking": (AnthropicReply("Paris.", thinking=PROSE * 3),
                 {"max_tokens": 3000, "thinking": {"type": "enabled", "budget_tokens": 1024}}),
    "tool-use": (AnthropicReply("", tool_uses=[{"name": "lookup", "input": {"city": "Oslo"}}]),
                 {}),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_usage_is_read_as_billed_in_every_shape(shape: str, stream: bool) -> None:
    """langchain-anthropic's usage_metadata (invoke and the summed stream) reads as the
    server's bill: 1-hour writes reported under ephemeral_1h_input_tokens with
    cache_creation 0, thinking as reasoning inside the output."""
    from agent_guard.engine.usage import Usage

    reply, kw = SHAPES[shape]
    with FakeAnthropicServer([reply]) as server:
        llm: Any = claude(server, **kw)
        if shape == "tool-use":
            llm = llm.bind_tools([lookup])
        if stream:
            chunks = list(llm.stream("hi"))
            message = chunks[0]
            for chunk in chunks[1:]:
                message = message + chunk
        else:
            message = llm.invoke("hi")
        [bill] = server.billed
    assert Usage.from_usage_metadata(message.usage_metadata) == bill.usage()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_429_and_529_retried_by_the_sdk_are_held_and_charged_once(ledger: Ledger,
                                                                  adapter: str,
                                                                  mode: str) -> None:
    books = Books(ledger)
    replies = [AnthropicReply(status=429), AnthropicReply(status=529), AnthropicReply("ok")]
    with FakeAnthropicServer(replies) as server:
        runner(books, claude(server, max_retries=2), adapter, mode)([HumanMessage("hi")])
        charged, billed = books.check(server)
    assert len(server.requests) == 3 and len(server.billed) == 1
    assert charged == billed


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_anthropic_counts_the_prompt_when_asked(ledger: Ledger, adapter: str) -> None:
    """TokenCounter(claude_prompt_counter=ChatAnthropic.get_num_tokens_from_messages): the
    prompt is reserved at Anthropic's own count (/v1/messages/count_tokens, which includes
    the tool-use system prompt), here 3.8x o200k, where the factor alone would not do."""
    from agent_guard.tokens import TokenCounter

    text, ratio = KINDS["hindi"]
    with FakeAnthropicServer([AnthropicReply("Noted.")], token_ratio=ratio * 1.5) as server:
        llm = claude(server, max_tokens=20)
        books = Books(ledger)
        books.guard = Guard(Limits(max_cost_usd="1"), ledger=ledger,
                            on_record=[books.records.append],
                            token_counter=TokenCounter(
                                claude_prompt_counter=llm.get_num_tokens_from_messages))
        runner(books, llm, adapter, "sync", tools=[lookup])([HumanMessage(text * 40)])
        books.check(server)
        [record] = books.model_records()
        [bill] = server.billed
        assert server.count_tokens_calls >= 1
        assert record.reserved_nano >= bill.cost_nano()


# -- answers the client gave up on, and block streams cut inside agents and graphs ----------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_an_answer_the_client_timed_out_on_is_charged(ledger: Ledger, adapter: str,
                                                      mode: str) -> None:
    """Anthropic bills an answer it generated after the client's read timeout."""
    books = Books(ledger)
    with FakeAnthropicServer([AnthropicReply(PROSE, delay_s=3)]) as server:
        send = runner(books, claude(server, default_request_timeout=0.5), adapter, mode)
        with pytest.raises(Exception, match=r"(?i)time"):
            send([HumanMessage("hi")])
        server.wait_billed(1)
        books.check(server)
    assert all(r.usage_estimated for r in books.model_records())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("adapter", ["middleware", "graph"])
def test_a_thinking_stream_cut_inside_an_agent_or_graph_is_charged(ledger: Ledger,
                                                                   adapter: str,
                                                                   mode: str) -> None:
    """Row 4 through create_agent + GuardMiddleware and guarded_graph: LangGraph's
    stream_mode="messages" cut after 20 chunks."""
    books = Books(ledger)
    reply = AnthropicReply(PROSE * 4, thinking=PROSE * 6, chunk_delay_s=0.001)
    with FakeAnthropicServer([reply]) as server:
        llm = claude(server, max_tokens=3000, streaming=True,
                     thinking={"type": "enabled", "budget_tokens": 1024})
        if adapter == "middleware":
            app: Any = create_agent(llm, [], middleware=[
                GuardMiddleware(books.guard, session_id=SESSION)])
        else:
            app = guarded_graph(_graph(llm), guard=books.guard, session_id=SESSION)
        inputs = {"messages": [HumanMessage("think")]}
        if mode == "sync":
            stream = app.stream(inputs, stream_mode="messages")
            for i, _ in enumerate(stream):
                if i == 19:
                    break
            stream.close()
        else:
            async def run() -> None:
                stream = app.astream(inputs, stream_mode="messages")
                i = 0
                async for _ in stream:
                    i += 1
                    if i == 20:
                        break
                await stream.aclose()

            arun(run())
        server.wait_billed(1)
        books.check(server)
