"""Money truth, measured from the provider's side: streamed content in every shape,
tokenizer factors, hidden reasoning, unpriced models, fallbacks, sessions, cache hits.

Each test drives the real ``ChatOpenAI`` (chat completions and the Responses API)
against ``FakeOpenAIServer``, whose ``billed`` record is what a provider bills, and
checks the guard's ledger (memory and Redis) from outside: spent <= cap, nothing
reserved once the run is over, charged >= billed, charged <= the stated bound.
Every test here failed on the code before issue 13 (the failure is noted in each).
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Annotated, Any, TypedDict

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, AnyMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode

from agent_guard import (
    BudgetExceeded,
    Budgets,
    CallRecord,
    Guard,
    GuardCallbackHandler,
    GuardMiddleware,
    Limits,
    OutputCapExceeded,
    SessionRequired,
    UnknownModelPrice,
    guarded_graph,
)
from agent_guard.cache.result import ResultCache, cached_tool
from agent_guard.engine.usage import Usage, usd_to_nano
from agent_guard.finops import UsageStore, report
from agent_guard.testing import FakeOpenAIServer, FakeReply, ScriptedChatModel

from .conftest import REDIS_URL, require_redis

# -- fixtures and the four assertions -------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def ledger(request: pytest.FixtureRequest, redis_namespace: str) -> str:
    if request.param == "memory":
        return "memory://"
    require_redis()
    return f"{REDIS_URL}?namespace={redis_namespace}"


def guard_on(ledger: str, limits: Limits | Budgets, **kw: Any) -> tuple[Guard, list[CallRecord]]:
    records: list[CallRecord] = []
    guard = Guard(limits, ledger=ledger, on_record=[records.append], **kw)
    return guard, records


def chat(server: FakeOpenAIServer, model: str = "gpt-4o", **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(model=model, base_url=server.base_url, api_key="test", max_retries=0,
                      **kw)


def money_truth(guard: Guard, session: str, server: FakeOpenAIServer, *,
                bound_nano: int | None = None, billed_at_least: bool = True) -> int:
    """spent <= cap; nothing reserved; charged >= billed; charged <= the stated bound."""
    usage = guard.usage(session)
    cap = guard.limits.max_cost_nano
    if cap is not None:
        assert usage.cost_nano <= cap
    assert usage.reserved_nano == 0 and usage.reserved_tokens == 0
    if billed_at_least:
        assert usage.cost_nano >= server.billed_nano(guard.prices) > 0
    if bound_nano is not None:
        assert usage.cost_nano <= bound_nano
    return usage.cost_nano


def cost(guard: Guard, model: str, usage: Usage) -> int:
    price = guard.prices.resolve(model)
    assert price is not None
    return price.cost_nano(usage)


def consume(model: Any, prompt: Any, config: dict, mode: str, stop_after: int | None = None
            ) -> list[Any]:
    """Stream ``model`` (sync or async), optionally cutting the stream (break/aclose)."""
    if mode == "async":
        return asyncio.run(aconsume(model, prompt, config, stop_after))
    chunks: list[Any] = []
    stream = model.stream(prompt, config=config)
    for chunk in stream:
        chunks.append(chunk)
        if stop_after is not None and len(chunks) >= stop_after:
            stream.close()
            break
    return chunks


async def aconsume(model: Any, prompt: Any, config: dict, stop_after: int | None = None
                   ) -> list[Any]:
    chunks: list[Any] = []
    stream = model.astream(prompt, config=config)
    try:
        async for chunk in stream:
            chunks.append(chunk)
            if stop_after is not None and len(chunks) >= stop_after:
                break
    finally:
        await stream.aclose()
    return chunks


def six_calls(mode: str, call: Any, acall: Any) -> int:
    """Make up to six calls (``call()`` or, in one event loop, ``await acall()``) until
    the guard refuses one; how many were answered."""
    if mode == "sync":
        answered = 0
        for _ in range(6):
            try:
                call()
            except BudgetExceeded:
                break
            answered += 1
        return answered

    async def go() -> int:
        answered = 0
        for _ in range(6):
            try:
                await acall()
            except BudgetExceeded:
                break
            answered += 1
        return answered

    return asyncio.run(go())


def streamed_text(chunks: list[Any]) -> str:
    out = []
    for c in chunks:
        content = c.content
        if isinstance(content, str):
            out.append(content)
            continue
        for block in content:
            if isinstance(block, dict):
                out.append(block.get("text") or block.get("reasoning") or "")
                for part in block.get("summary") or ():
                    out.append(part.get("text") or "")
    return "".join(out)


# -- row 4: content-block streams are counted, stopped at the reservation, charged when cut --

# ChatOpenAI options and what the answer streams. Old code: every one streamed past the
# 4,096 reserved tokens without a stop (nothing counted in content-block chunks).
SHAPES = {
    "responses": {"use_responses_api": True},
    "responses-v1": {"use_responses_api": True, "output_version": "v1"},
    "responses-v0": {"use_responses_api": True, "output_version": "v0"},
    "chat-completions-v1": {"output_version": "v1"},
}
ANSWERS = {
    "text": FakeReply(" a" * 6000),
    "reasoning-summary": FakeReply(" ok", reasoning_summary=" think" * 6000),
    "text-and-tool-call": FakeReply(" a" * 3000, tool_calls=[
        {"name": "lookup", "arguments": {"q": " b" * 3000}}]),
}


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("answer", list(ANSWERS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_content_block_stream_stops_at_its_reserved_output(shape: str, answer: str,
                                                             mode: str, ledger: str) -> None:
    """No max_tokens: 4,096 output tokens are reserved (Limits default) and the provider
    streams 6,000. The stream stops within one chunk of the reservation and what was
    streamed is charged (a stream cut this way is charged what was streamed; the
    provider-side record bills the whole answer, see docs/money-truth.md)."""
    if shape == "chat-completions-v1" and answer == "reasoning-summary":
        pytest.skip("chat completions carry no reasoning summary")
    guard, records = guard_on(ledger, Limits(max_cost_usd=1))
    with FakeOpenAIServer([ANSWERS[answer]], chunk_chars=40) as server:
        handler = GuardCallbackHandler(guard)
        with pytest.raises(OutputCapExceeded) as info:
            consume(chat(server, **SHAPES[shape]), "hi",
                    {"callbacks": [handler], "metadata": {"session_id": "s"}}, mode)
        assert 4096 < info.value.spent <= 4096 + 40
        [record] = records
        assert record.outcome == "aborted" and record.usage_estimated
        assert 4096 < record.usage.output_tokens <= 4096 + 40
        usage = guard.usage("s")
        assert usage.model_calls == 1 and usage.output_tokens == record.usage.output_tokens
        bound = cost(guard, "gpt-4o", Usage(record.usage.input_tokens, 4096 + 40))
        money_truth(guard, "s", server, bound_nano=bound, billed_at_least=False)
        assert usage.cost_nano == cost(guard, "gpt-4o", record.usage)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("shape", ["responses", "responses-v1", "chat-completions-v1"])
def test_a_cut_content_block_stream_is_charged_what_was_streamed(shape: str, mode: str,
                                                                 ledger: str) -> None:
    """The consumer stops reading after 20 chunks (break, then close/aclose). Old code:
    nothing was counted in content blocks, so the call was released: $0, not a call."""
    guard, records = guard_on(ledger, Limits(max_cost_usd=1))
    with FakeOpenAIServer([FakeReply(" word" * 2000)], chunk_chars=25) as server:
        chunks = consume(chat(server, max_tokens=3000, **SHAPES[shape]), "hi",
                         {"callbacks": [GuardCallbackHandler(guard)],
                          "metadata": {"session_id": "t"}}, mode, stop_after=20)
        seen = guard.tokens.count_text(streamed_text(chunks), "gpt-4o")
        assert seen > 50
        [record] = records
        assert record.outcome == "aborted" and record.usage.output_tokens >= seen
        usage = guard.usage("t")
        assert usage.model_calls == 1
        bound = cost(guard, "gpt-4o", Usage(record.usage.input_tokens, 3000))
        charged = money_truth(guard, "t", server, bound_nano=bound, billed_at_least=False)
        assert charged >= cost(guard, "gpt-4o", Usage(record.usage.input_tokens, seen))


class _Thinking(ScriptedChatModel):
    """Anthropic-style streaming: thinking and text arrive as content blocks."""


def test_anthropic_style_thinking_blocks_are_counted_and_stopped() -> None:
    """Old code: a list of thinking blocks counted as nothing; 6,000 tokens of thinking
    passed a 400-token reservation."""
    reply = AIMessage(content=[{"type": "thinking", "thinking": " hmm" * 6000, "index": 0},
                               {"type": "text", "text": "done", "index": 1}])
    llm = _Thinking(model_name="claude-sonnet-4-5", provider="anthropic", max_tokens=400,
                    responses=[reply], stream_usage=False)
    guard, records = guard_on("memory://", Limits(max_cost_usd=1))
    with pytest.raises(OutputCapExceeded):
        list(llm.stream("hi", config={"callbacks": [GuardCallbackHandler(guard)],
                                      "metadata": {"session_id": "s"}}))
    [record] = records
    assert record.outcome == "aborted" and record.usage.output_tokens >= 6000


# -- row 5: the tokenizer factor is applied to totals, not per chunk -------------------------


@pytest.mark.parametrize("usage_chunk", [False, True])
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("model", ["deepseek-chat", "claude-sonnet-4-5"])
def test_a_stream_without_a_bundled_tokenizer_is_not_cut_by_the_factor(
        model: str, mode: str, usage_chunk: bool, ledger: str) -> None:
    """400 one-token chunks with max_tokens=400. Old code: each chunk counted
    ceil(1 x 1.2) = 2 tokens, so OutputCapExceeded after ~200 chunks."""
    guard, records = guard_on(ledger, Limits(max_cost_usd=1))
    with FakeOpenAIServer([FakeReply(" a" * 400)], chunk_chars=2) as server:
        llm = chat(server, model=model, max_tokens=400, stream_usage=usage_chunk)
        chunks = consume(llm, "hi", {"callbacks": [GuardCallbackHandler(guard)],
                                     "metadata": {"session_id": "t"}}, mode)
        assert streamed_text(chunks) == " a" * 400
        [record] = records
        assert record.outcome == "ok" and record.usage_estimated is not usage_chunk
        # the stated bound: the prompt plus max_tokens scaled by the factor (1.2)
        bound = cost(guard, model, Usage(record.usage.input_tokens,
                                         guard.tokens.scale(400, model)))
        money_truth(guard, "t", server, bound_nano=bound)


# -- row 6: hidden reasoning without a usage chunk is settled at the reserved output ---------


def _reasoning_server() -> FakeOpenAIServer:
    return FakeOpenAIServer([FakeReply("The answer is 42.", reasoning_tokens=3000)])


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_hidden_reasoning_streamed_without_usage_is_charged(mode: str, ledger: str) -> None:
    """o3-mini streamed through ChatOpenAI(base_url=...), which asks for no usage chunk:
    3,000 hidden reasoning tokens a call. Old code: six calls, ~$0.0001 recorded, $0.079
    billed against a $0.05 cap."""
    guard, records = guard_on(ledger, Limits(max_cost_usd="0.05"))
    with _reasoning_server() as server:
        llm = chat(server, model="o3-mini", max_tokens=4000)
        config = {"callbacks": [GuardCallbackHandler(guard)], "metadata": {"session_id": "s"}}
        answered = six_calls(mode, lambda: consume(llm, "think", config, "sync"),
                             lambda: aconsume(llm, "think", config))
        assert answered == 2  # each settled at its reserved 4,000 output tokens
        assert all(r.usage_estimated and r.usage.output_tokens == 4000 for r in records)
        money_truth(guard, "s", server, bound_nano=sum(r.reserved_nano for r in records))


class Messages(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def _one_node_graph(llm: ChatOpenAI) -> StateGraph:
    builder = StateGraph(Messages)
    builder.add_node("model", lambda s: {"messages": [llm.invoke(s["messages"])]})
    builder.add_edge(START, "model")
    builder.add_edge("model", END)
    return builder


@pytest.mark.parametrize("path", ["messages-mode", "guarded_graph", "create_agent-middleware"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_hidden_reasoning_in_langgraph_messages_mode_is_charged(path: str, mode: str,
                                                                ledger: str) -> None:
    """LangGraph's stream_mode="messages" streams the model without a usage chunk: a
    callback on a compiled graph, guarded_graph, and GuardMiddleware in create_agent.
    Old code: the hidden reasoning was never charged (charged < billed)."""
    guard, records = guard_on(ledger, Limits(max_cost_usd="0.05"))
    with _reasoning_server() as server:
        llm = chat(server, model="o3-mini", max_tokens=4000)
        config: dict[str, Any] = {"configurable": {"thread_id": "t"}}
        if path == "messages-mode":
            app: Any = _one_node_graph(llm).compile()
            config["callbacks"] = [GuardCallbackHandler(guard)]
        elif path == "guarded_graph":
            app = guarded_graph(_one_node_graph(llm), guard=guard)
        else:
            app = create_agent(llm, [], middleware=[GuardMiddleware(guard)])

        inputs = {"messages": [("user", "think")]}

        def run() -> None:
            for _ in app.stream(inputs, config, stream_mode="messages"):
                pass

        async def arun() -> None:
            async for _ in app.astream(inputs, config, stream_mode="messages"):
                pass

        # GuardMiddleware shrinks the third call's max_tokens to what is left (its
        # shrink_to_fit), so it answers one call more; the callback cannot shrink
        assert six_calls(mode, run, arun) == (3 if path == "create_agent-middleware" else 2)
        model_records = [r for r in records if r.kind == "model"]
        # each settled at the output it reserved (the shrunk call at its lowered cap)
        assert all(r.usage_estimated and r.usage.output_tokens == r.max_output_tokens
                   for r in model_records)
        money_truth(guard, "t", server,
                    bound_nano=sum(r.reserved_nano for r in model_records))


# -- row 10: an unpriced model under a dollar cap is never admitted at $0 --------------------

STATED = {"input_cost_per_token": "2.5e-06", "output_cost_per_token": "1.5e-05"}


def test_allow_unpriced_under_a_dollar_cap_is_refused_with_the_way_out() -> None:
    """Old code: accepted; a deployment name reserved $0 and settled at the response
    model's price: $0.10 spent against $0.03."""
    with pytest.raises(ValueError, match="could not hold") as info:
        Limits(max_cost_usd="0.03", unknown_price="allow")
    assert "unknown_price={'input_cost_per_token'" in str(info.value)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_deployment_name_is_reserved_at_the_stated_price(mode: str, ledger: str) -> None:
    """An Azure-style deployment name the price book does not know, answered by gpt-4o:
    reserved at the stated price, settled at the response model's. Old code rejected
    the stated price (unknown_price was 'refuse' or 'allow' only)."""
    guard, records = guard_on(ledger, Limits(max_cost_usd="0.03", unknown_price=STATED))
    reply = FakeReply("x" * 10, prompt_tokens=100, completion_tokens=1000,
                      model="gpt-4o-2024-08-06")
    with FakeOpenAIServer([reply]) as server:
        llm = chat(server, model="prod-gpt4o-deployment", max_tokens=1000)
        config = {"callbacks": [GuardCallbackHandler(guard)], "metadata": {"session_id": "s"}}
        answered = six_calls(mode, lambda: llm.invoke("hi", config=config),
                             lambda: llm.ainvoke("hi", config=config))
        assert 0 < answered < 6
        assert all(r.reserved_nano > 0 for r in records)
        money_truth(guard, "s", server, bound_nano=sum(r.reserved_nano for r in records))


def test_an_unpriced_model_under_a_team_dollar_cap_is_refused(ledger: str) -> None:
    """Old code only looked at the session's caps: a team dollar cap admitted an
    unpriced model at $0."""
    guard, _ = guard_on(ledger, Budgets(session=Limits(max_model_calls=10),
                                        team=Limits(max_cost_usd="0.03")))
    with FakeOpenAIServer(["hi"]) as server:
        with pytest.raises(UnknownModelPrice):
            chat(server, model="prod-gpt4o-deployment", max_tokens=100).invoke(
                "hi", config={"callbacks": [GuardCallbackHandler(guard)],
                              "metadata": {"session_id": "s", "team": "acme"}})
        assert server.request_count == 0


# -- row 11: refusals escape with_fallbacks around chains and non-model fallbacks ------------

FALLBACKS = ["chain-to-chain", "model-to-function", "chain-to-function", "nested"]


def _fallback_chain(kind: str, strong: ChatOpenAI, cheap: ChatOpenAI, ran: list[str]) -> Any:
    prompt = ChatPromptTemplate.from_messages([("user", "{q}")])
    canned = RunnableLambda(lambda x: ran.append("canned") or "canned answer")
    if kind == "chain-to-chain":
        return (prompt | strong).with_fallbacks([prompt | cheap])
    if kind == "model-to-function":
        return (prompt | strong.with_fallbacks([canned]))
    if kind == "chain-to-function":
        return (prompt | strong).with_fallbacks([canned])
    return (prompt | strong.with_fallbacks([cheap])).with_fallbacks([canned])


@pytest.mark.parametrize("mode", ["invoke", "ainvoke", "stream", "batch"])
@pytest.mark.parametrize("kind", FALLBACKS)
def test_a_refusal_is_not_answered_by_a_fallback(kind: str, mode: str, ledger: str) -> None:
    """The strong call does not fit the cap; the cheap one (or a function) would answer.
    Old code: the fallback answered, and a cheap fallback was called and paid."""
    guard, _ = guard_on(ledger, Limits(max_cost_usd="0.01"))
    ran: list[str] = []
    with FakeOpenAIServer(["cheap answer"]) as server:
        chain = _fallback_chain(kind, chat(server, max_tokens=4000),
                                chat(server, model="gpt-4o-mini", max_tokens=10), ran)
        config = {"callbacks": [GuardCallbackHandler(guard)], "metadata": {"session_id": "s"}}
        inputs = {"q": "hi"}
        with pytest.raises(BudgetExceeded):
            if mode == "invoke":
                chain.invoke(inputs, config=config)
            elif mode == "ainvoke":
                asyncio.run(chain.ainvoke(inputs, config=config))
            elif mode == "stream":
                list(chain.stream(inputs, config=config))
            else:
                chain.batch([inputs, inputs], config=config)
        assert server.request_count == 0 and ran == []
        assert guard.usage("s").reserved_nano == 0 and guard.usage("s").cost_nano == 0


def test_a_fallback_still_answers_a_provider_error(ledger: str) -> None:
    """Only refusals escape: a 429 from the primary is still answered by the fallback.
    (Old code passed this; it guards the fix against refusing too much.)"""
    def by_model(body: dict) -> FakeReply:
        return FakeReply(status=429) if body["model"] == "gpt-4o" else FakeReply("cheap")

    guard, _ = guard_on(ledger, Limits(max_cost_usd=1))
    with FakeOpenAIServer(by_model) as server:
        prompt = ChatPromptTemplate.from_messages([("user", "{q}")])
        chain = (prompt | chat(server, max_tokens=10)).with_fallbacks(
            [prompt | chat(server, model="gpt-4o-mini", max_tokens=10)])
        out = chain.invoke({"q": "hi"}, config={"callbacks": [GuardCallbackHandler(guard)],
                                                "metadata": {"session_id": "s"}})
        assert out.content == "cheap"
        money_truth(guard, "s", server)


# -- row 12: a run without a session is never pooled silently --------------------------------


@pytest.mark.parametrize("path", ["callback", "callback-async", "middleware", "guarded_graph"])
def test_a_run_without_a_session_is_refused_before_it_spends(path: str) -> None:
    """Old code pooled every such run into a session named 'default'."""
    guard = Guard(Limits(max_cost_usd=1))
    with FakeOpenAIServer(["hi"]) as server:
        llm = chat(server, max_tokens=10)
        with pytest.raises(SessionRequired, match="thread_id"):
            if path == "callback":
                llm.invoke("hi", config={"callbacks": [GuardCallbackHandler(guard)]})
            elif path == "callback-async":
                asyncio.run(llm.ainvoke("hi", config={"callbacks": [GuardCallbackHandler(guard)]}))
            elif path == "middleware":
                create_agent(llm, [], middleware=[GuardMiddleware(guard)]).invoke(
                    {"messages": [("user", "hi")]})
            else:
                guarded_graph(_one_node_graph(llm), guard=guard).invoke(
                    {"messages": [("user", "hi")]})
        assert server.request_count == 0


def test_pooling_runs_without_a_session_is_an_explicit_choice() -> None:
    """GuardCallbackHandler(session_id=...) pools such runs on purpose; a run's own
    session still wins. (Old code passed this too: it guards that the documented
    opt-in keeps working now that a run without a session is refused.)"""
    guard = Guard(Limits(max_cost_usd=1))
    with FakeOpenAIServer([FakeReply("hi", prompt_tokens=10, completion_tokens=2)]) as server:
        llm = chat(server, max_tokens=10)
        handler = GuardCallbackHandler(guard, session_id="shared")
        llm.invoke("hi", config={"callbacks": [handler]})
        llm.invoke("hi", config={"callbacks": [handler], "metadata": {"session_id": "u-1"}})
    assert guard.usage("shared").model_calls == guard.usage("u-1").model_calls == 1
    assert guard.usage("default").model_calls == 0


# -- row 13: cached_tool hits reach the records and the reports on every path --------------

PRICE_LOOKUPS: list[str] = []


@tool
def price_of(item: str) -> str:
    """The price of an item."""
    PRICE_LOOKUPS.append(item)
    return f"{item}: $3"


def _tool_then_answer() -> ScriptedChatModel:
    def respond(messages: list[Any]) -> AIMessage:
        if sum(isinstance(m, AIMessage) for m in messages) == 0:
            return AIMessage("", tool_calls=[{"name": "price_of", "args": {"item": "mug"},
                                              "id": "c1"}])
        return AIMessage("The mug costs $3.")

    return ScriptedChatModel(model_name="gpt-4o", respond=respond, max_tokens=50)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("path", ["callback", "middleware", "guarded_graph"])
def test_cached_tool_hits_reach_records_and_reports(path: str, mode: str, ledger: str) -> None:
    """The same question twice: the second price lookup is a cache hit. Old code: the
    callback path recorded it 'ok' with nothing saved (reports showed 0 hits), and so
    did the middleware for a cached_tool."""
    PRICE_LOOKUPS.clear()
    store = UsageStore.from_url("memory://")
    guard = Guard(Limits(max_cost_usd=1), ledger=ledger)
    store.attach(guard)
    cache = ResultCache("memory://", ttl={"pricing": 3600})
    tools = [cached_tool(price_of, cache, "pricing", cost_usd="0.002")]
    config: dict[str, Any] = {"configurable": {"thread_id": "t"}}
    if path == "callback":
        app: Any = create_agent(_tool_then_answer(), tools)
        config["callbacks"] = [GuardCallbackHandler(guard)]
    elif path == "middleware":
        app = create_agent(_tool_then_answer(), tools, middleware=[GuardMiddleware(guard)])
    else:
        builder = StateGraph(Messages)
        llm = _tool_then_answer().bind_tools(tools)
        builder.add_node("model", lambda s: {"messages": [llm.invoke(s["messages"])]})
        builder.add_node("tools", ToolNode(tools))
        builder.add_edge(START, "model")
        builder.add_conditional_edges(
            "model", lambda s: "tools" if s["messages"][-1].tool_calls else END,
            ["tools", END])
        builder.add_edge("tools", "model")
        app = guarded_graph(builder, guard=guard)
    questions = [{"messages": [("user", f"price of a mug? ({turn})")]} for turn in range(2)]
    if mode == "sync":
        for inputs in questions:
            app.invoke(inputs, config)
    else:
        async def ask() -> None:
            for inputs in questions:
                await app.ainvoke(inputs, config)

        asyncio.run(ask())
    assert PRICE_LOOKUPS == ["mug"] and cache.stats()["price_of"].hits == 1
    tool_rows = [r for r in store.records() if r.kind == "tool"]
    assert [r.outcome for r in tool_rows] == ["ok", "cache_hit"]
    assert tool_rows[1].saved_nano == usd_to_nano(Decimal("0.002"))
    [row] = report(store, (), where={"kind": "tool"})
    assert row["cache_hits"] == 1 and row["saved_nano"] == usd_to_nano(Decimal("0.002"))
    assert guard.usage("t").tool_calls == 2 and guard.usage("t").reserved_nano == 0
