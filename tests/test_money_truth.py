"""Money truth, lifecycle and billing half (issue 13): the ledger against the provider's bill.

Every test drives the real ``ChatOpenAI`` (and ``create_agent`` / LangGraph graphs where
they apply) against ``FakeOpenAIServer``, which records what a real provider would bill
(answers the client gave up on included), on a memory and a Redis ledger, and asserts:

- spent <= cap;
- nothing is reserved once the run is over;
- charged >= billed (``server.billed_nano``);
- charged <= the stated conservative bound: what the calls reserved (an abandoned call
  is charged its reserved worst case, never more).

The rules are in docs/money-truth.md.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, TypedDict

import httpx
import openai
import pytest
from langchain.agents import create_agent
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph

from agent_guard import BudgetExceeded, Guard, GuardCallbackHandler, Limits, guarded_graph
from agent_guard.engine.records import CallRecord
from agent_guard.ledger import Ledger
from agent_guard.testing import FakeOpenAIServer, FakeReply

SESSION = "money"
MAX_TOKENS = 100
ANSWER = FakeReply("Paris is the capital of France.", completion_tokens=60)
# when a client-side timeout cuts a call the provider is still answering (slow(): 5 s);
# long enough for the request to be sent on a loaded machine
CUT_AFTER = 1.5


# -- fixtures and checks -------------------------------------------------------------------


@pytest.fixture
def ledger(memory_or_redis_ledger: Ledger) -> Ledger:
    return memory_or_redis_ledger


class Books:
    """A guard on ``ledger`` with a dollar cap, and the records it emitted."""

    def __init__(self, ledger: Ledger, cap_usd: float = 1.0, **limits: Any) -> None:
        self.records: list[CallRecord] = []
        self.handlers: list[GuardCallbackHandler] = []
        self.guard = Guard(Limits(max_cost_usd=cap_usd, **limits), ledger=ledger,
                           on_record=[self.records.append])
        self.cap_nano = self.guard.limits.max_cost_nano

    def handler(self, **kw: Any) -> GuardCallbackHandler:
        handler = GuardCallbackHandler(self.guard, session_id=SESSION, **kw)
        self.handlers.append(handler)
        return handler

    def model_records(self) -> list[CallRecord]:
        return [r for r in self.records if r.kind == "model"]

    def settle_check(self, server: FakeOpenAIServer, *, timeout: float = 5.0) -> int:
        """Wait until nothing is reserved (a cancelled call is finished by its task's end
        or by the lease keeper), then check the four promises; return what was charged."""
        deadline = time.monotonic() + timeout
        usage = self.guard.usage(SESSION)
        # the call's record is appended just after its settle (the keeper's thread may
        # finish an abandoned call while this reads): wait for it as for the hold
        while (usage.reserved_nano or any(h.open_runs for h in self.handlers)
               or usage.cost_nano > sum(r.reserved_nano for r in self.model_records())) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
            usage = self.guard.usage(SESSION)
        billed = server.billed_nano(self.guard.prices)
        bound = sum(r.reserved_nano for r in self.model_records())
        assert usage.reserved_nano == 0, "a hold outlived the run"
        assert not any(h.open_runs for h in self.handlers), "a handler kept a run"
        assert usage.cost_nano <= self.cap_nano, "spend passed the cap"
        assert usage.cost_nano >= billed, (
            f"charged {usage.cost_nano} < billed {billed} ({len(server.billed)} requests)")
        assert usage.cost_nano <= bound, f"charged {usage.cost_nano} > reserved {bound}"
        return usage.cost_nano


def chat(server: FakeOpenAIServer, **kw: Any) -> ChatOpenAI:
    """``ChatOpenAI`` on ``server``, with an async client of its own: langchain-openai
    caches its default one per base URL, and one bound to the closed loop of an earlier
    ``asyncio.run`` would break a later test whose server gets the same port."""
    kw = {"model": "gpt-4o", "max_retries": 0, "max_tokens": MAX_TOKENS, **kw}
    return ChatOpenAI(base_url=server.base_url, api_key="test",
                      http_async_client=httpx.AsyncClient(), **kw)


@pytest.fixture(scope="module", autouse=True)
def warm() -> None:
    """Load the tokenizer and the OpenAI client once, so a test's client timeouts
    measure the provider, not the first import."""
    from agent_guard.tokens import TokenCounter

    TokenCounter().count_text("warm up", "gpt-4o")
    with FakeOpenAIServer(["ok"]) as server:
        chat(server).invoke("warm up")
        asyncio.run(chat(server).ainvoke("warm up"))


@pytest.fixture(autouse=True)
def quick_sdk_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The openai SDK waits 0.5 s and more between its own retries; 10 ms is enough here."""
    monkeypatch.setattr("openai._base_client.INITIAL_RETRY_DELAY", 0.01)


def slow(delay: float = 5.0) -> FakeReply:
    """An answer the client gives up on: the server bills it when the request arrives."""
    return FakeReply(ANSWER.content, completion_tokens=ANSWER.completion_tokens, delay_s=delay)


def streamed(chunks: int = 40, delay: float = 0.02) -> FakeReply:
    return FakeReply("word " * chunks, completion_tokens=80, chunk_delay_s=delay)


# -- row 1: cancellation skips the model's end callbacks --------------------------------------


def test_wait_for_around_ainvoke_charges_the_answer_and_frees_the_hold(ledger: Ledger) -> None:
    books = Books(ledger)
    with FakeOpenAIServer([slow()]) as server:
        async def run() -> None:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(
                    chat(server).ainvoke("hi", config={"callbacks": [books.handler()]}), CUT_AFTER)

        asyncio.run(run())
        server.wait_billed(1)
        books.settle_check(server)
    [record] = books.model_records()
    assert record.usage_estimated and record.outcome == "aborted"


@pytest.mark.parametrize("cut", ["break_aclose", "timeout", "events_aclose"])
def test_agent_astream_cut_charges_what_the_provider_billed(ledger: Ledger, cut: str) -> None:
    books = Books(ledger)
    reply = slow() if cut == "timeout" else streamed()
    with FakeOpenAIServer([reply]) as server:
        agent = create_agent(chat(server), tools=[])
        config = {"callbacks": [books.handler()]}
        inputs = {"messages": [HumanMessage("hi")]}

        async def run() -> None:
            if cut == "break_aclose":
                stream = agent.astream(inputs, config, stream_mode="messages")
                async for _ in stream:
                    break
                await stream.aclose()
            elif cut == "events_aclose":
                events = agent.astream_events(inputs, config, version="v2")
                async for event in events:
                    if event["event"] == "on_chat_model_stream":
                        break
                await events.aclose()
            else:
                async def consume() -> None:
                    async for _ in agent.astream(inputs, config, stream_mode="updates"):
                        pass

                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(consume(), CUT_AFTER)

        asyncio.run(run())
        server.wait_billed(1)
        books.settle_check(server)
    assert all(r.usage_estimated for r in books.model_records())


class Fan(TypedDict, total=False):
    answer: str


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("guarded", [False, True])
def test_a_fan_out_whose_sibling_raises(ledger: Ledger, guarded: bool, mode: str) -> None:
    from langgraph._internal._runnable import RunnableCallable

    books = Books(ledger)
    with FakeOpenAIServer([slow(0.5)]) as server:
        model = chat(server)

        def ask(state: Fan) -> Fan:
            return {"answer": str(model.invoke("hi").content)}

        async def aask(state: Fan) -> Fan:
            return {"answer": str((await model.ainvoke("hi")).content)}

        def boom(state: Fan) -> Fan:
            server.wait_billed(1)  # the other branch's request was sent
            raise ValueError("a sibling failed")

        async def aboom(state: Fan) -> Fan:
            while not server.request_count:
                await asyncio.sleep(0.01)
            raise ValueError("a sibling failed")

        builder = StateGraph(Fan)
        builder.add_node("ask", RunnableCallable(ask, aask))
        builder.add_node("boom", RunnableCallable(boom, aboom))
        builder.add_edge(START, "ask")
        builder.add_edge(START, "boom")
        builder.add_edge("ask", END)
        builder.add_edge("boom", END)
        if guarded:
            graph: Any = guarded_graph(builder, guard=books.guard, session_id=SESSION)
            config: dict[str, Any] = {}
        else:
            graph = builder.compile()
            config = {"callbacks": [books.handler()]}

        with pytest.raises(ValueError, match="sibling"):
            if mode == "sync":
                graph.invoke({}, config)
            else:
                asyncio.run(graph.ainvoke({}, config))
        server.wait_billed(1)
        books.settle_check(server)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_closed_early_is_charged_as_billed(ledger: Ledger, mode: str) -> None:
    """The provider goes on generating after the client hangs up: the full answer is
    billed, so a cut stream is charged its reserved output, not what was read."""
    books = Books(ledger)
    with FakeOpenAIServer([streamed()]) as server:
        model = chat(server)
        config = {"callbacks": [books.handler()]}
        if mode == "sync":
            stream = model.stream("hi", config)
            next(stream), next(stream)
            stream.close()
        else:
            async def run() -> None:
                astream = model.astream("hi", config)
                await anext(astream)
                await anext(astream)
                await astream.aclose()

            asyncio.run(run())
        books.settle_check(server)
    [record] = books.model_records()
    assert record.usage_estimated


# -- row 2: read timeouts after the request was sent, retried by with_retry ----------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_read_timeouts_retried_by_with_retry_are_each_charged(ledger: Ledger,
                                                               mode: str) -> None:
    probe = Books(ledger)
    with FakeOpenAIServer([slow()]) as server:
        worst = probe.guard.estimate_model_call(_call(server, "hi"))
        books = Books(ledger, cap_usd=4.5 * worst / 1e9)  # room for 4 attempts, not 6
        model = chat(server, timeout=0.05).with_retry(
            stop_after_attempt=6, wait_exponential_jitter=False,
            retry_if_exception_type=(openai.APITimeoutError,))
        config = {"callbacks": [books.handler()]}
        with pytest.raises((openai.APITimeoutError, BudgetExceeded)) as caught:
            if mode == "sync":
                model.invoke("hi", config)
            else:
                asyncio.run(model.ainvoke("hi", config))
        assert caught.type is BudgetExceeded  # the cap stops the retries
        assert len(server.wait_billed(4)) == 4
        books.settle_check(server)
    records = books.model_records()
    assert len(records) == 4 and all(r.usage_estimated for r in records)


def _call(server: FakeOpenAIServer, text: str) -> Any:
    from agent_guard.engine.admission import ModelCall

    return ModelCall(session=SESSION, model="gpt-4o", provider="openai",
                     messages=[HumanMessage(text)], max_output_tokens=MAX_TOKENS)


# -- row 3: the SDK's own retries inside one guarded call ------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("last", ["timeout", "answer"])
def test_sdk_retries_after_timeouts_are_charged(ledger: Ledger, mode: str, last: str) -> None:
    books = Books(ledger)
    final = slow() if last == "timeout" else ANSWER
    with FakeOpenAIServer([slow(), slow(), final]) as server:
        model = chat(server, timeout=0.1, max_retries=2)
        config = {"callbacks": [books.handler()]}

        def run() -> None:
            if mode == "sync":
                model.invoke("hi", config)
            else:
                asyncio.run(model.ainvoke("hi", config))

        if last == "timeout":
            with pytest.raises(openai.APITimeoutError):
                run()
        else:
            run()
        assert len(server.wait_billed(3)) == 3  # one guarded call, three requests billed
        books.settle_check(server)
    assert len(books.model_records()) == 1


# -- row 7: another callback raises; several prompts in one generate --------------------------


class Raiser(BaseCallbackHandler):
    raise_error = True

    def __init__(self, event: str) -> None:
        self.event = event

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        if self.event == "start":
            raise RuntimeError("user callback failed at start")

    def on_llm_end(self, *args: Any, **kwargs: Any) -> None:
        if self.event == "end":
            raise RuntimeError("user callback failed at end")


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("where", ["model", "agent"])
@pytest.mark.parametrize("event", ["start", "end"])
@pytest.mark.parametrize("order", ["user_first", "guard_first"])
def test_another_callback_raising_leaks_nothing(ledger: Ledger, mode: str, where: str,
                                                event: str, order: str) -> None:
    books = Books(ledger)
    with FakeOpenAIServer([ANSWER]) as server:
        handlers: list[Any] = [Raiser(event), books.handler()]
        if order == "guard_first":
            handlers.reverse()
        runnable: Any = chat(server)
        inputs: Any = "hi"
        if where == "agent":
            runnable = create_agent(runnable, tools=[])
            inputs = {"messages": [HumanMessage("hi")]}
        with pytest.raises(RuntimeError, match="user callback"):
            if mode == "sync":
                runnable.invoke(inputs, {"callbacks": handlers})
            else:
                asyncio.run(runnable.ainvoke(inputs, {"callbacks": handlers}))
        assert len(server.billed) == (1 if event == "end" else 0)
        books.settle_check(server)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_generate_with_a_refused_prompt_holds_nothing(ledger: Ledger, mode: str) -> None:
    probe = Books(ledger)
    with FakeOpenAIServer([ANSWER]) as server:
        worst = probe.guard.estimate_model_call(_call(server, "first"))
        books = Books(ledger, cap_usd=1.5 * worst / 1e9)  # one prompt fits, not two
        prompts = [[HumanMessage("first")], [HumanMessage("other")]]
        with pytest.raises(BudgetExceeded):
            if mode == "sync":
                chat(server).generate(prompts, callbacks=[books.handler()])
            else:
                asyncio.run(chat(server).agenerate(prompts, callbacks=[books.handler()]))
        assert server.billed == []
        assert books.settle_check(server) == 0


# -- row 8: one request seen by several handlers or guards -------------------------------------


class Q(TypedDict, total=False):
    question: str
    answer: str


def _graph(model: ChatOpenAI) -> StateGraph:
    def ask(state: Q) -> Q:
        return {"answer": str(model.invoke(state["question"]).content)}

    async def aask(state: Q) -> Q:
        return {"answer": str((await model.ainvoke(state["question"])).content)}

    from langgraph._internal._runnable import RunnableCallable

    builder = StateGraph(Q)
    builder.add_node("ask", RunnableCallable(ask, aask))
    builder.add_edge(START, "ask")
    builder.add_edge("ask", END)
    return builder


def _sub_then_outer(model: ChatOpenAI, inner_guard: Guard) -> StateGraph:
    inner = guarded_graph(_graph(model), guard=inner_guard, session_id=SESSION)
    outer = StateGraph(Q)
    outer.add_node("inner", inner)
    outer.add_edge(START, "inner")
    outer.add_edge("inner", END)
    return outer


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("shape", ["model_and_invoke", "guarded_graph_with_config",
                                   "guarded_subgraph_other_guard"])
def test_one_request_is_charged_once(ledger: Ledger, mode: str, shape: str) -> None:
    books = Books(ledger)
    with FakeOpenAIServer([ANSWER]) as server:
        inputs: Any = {"question": "hi"}
        if shape == "model_and_invoke":
            runnable: Any = chat(server, callbacks=[books.handler()])
            inputs = "hi"
            config: dict[str, Any] = {"callbacks": [books.handler()]}
        elif shape == "guarded_graph_with_config":
            runnable = guarded_graph(_graph(chat(server)), guard=books.guard,
                                     session_id=SESSION).with_config(
                callbacks=[books.handler()])
            config = {}
        else:
            other = Guard(Limits(max_cost_usd=1.0), ledger=ledger,
                          on_record=[books.records.append])
            runnable = guarded_graph(_sub_then_outer(chat(server), other), guard=books.guard,
                                     session_id=SESSION)
            config = {}
        if mode == "sync":
            runnable.invoke(inputs, config)
        else:
            asyncio.run(runnable.ainvoke(inputs, config))
        assert len(server.billed) == 1
        charged = books.settle_check(server)
        assert charged == server.billed_nano(books.guard.prices)
    assert len(books.model_records()) == 1
    assert books.guard.usage(SESSION).model_calls == 1


# -- row 9: a call longer than its lease keeps its hold ----------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async", "stream", "astream"])
def test_a_long_call_keeps_its_hold_past_the_lease(ledger: Ledger, mode: str) -> None:
    """A call running past its lease keeps its hold: the lease keeper renews it while its
    frame (invoke), its task (ainvoke) or its streamed chunks (a stream between chunks
    has neither) show it is running; a second call is refused meanwhile."""
    probe = Books(ledger)
    # streams: 1.5 s of chunks, 0.1 s apart (each chunk a sign of life)
    with FakeOpenAIServer([_long(mode), ANSWER]) as server:
        worst = probe.guard.estimate_model_call(_call(server, "hi"))
        books = Books(ledger, cap_usd=1.5 * worst / 1e9, lease_seconds=0.6)
        config: Any = {"callbacks": [books.handler()]}
        # (the stream's usage reported: charged as billed)
        second = _beside_a_second_call(server, lambda: _drive(
            chat(server, stream_usage=True), mode, "hi", config), "hi", config)
        assert isinstance(second, BudgetExceeded), "a second call was admitted"
        server.wait_billed(1)
        books.settle_check(server)


def _long(mode: str) -> FakeReply:
    """An answer running 1.5 s: a slow first byte (invoke), or chunks 0.1 s apart."""
    return slow(1.5) if mode in ("sync", "async") else FakeReply(
        "word " * 16, completion_tokens=ANSWER.completion_tokens, chunk_delay_s=0.1)


def _drive(runnable: Any, mode: str, inputs: Any, config: Any, **stream: Any) -> None:
    """Run ``runnable`` to its end by invoke, ainvoke, stream or astream."""
    if mode == "sync":
        runnable.invoke(inputs, config)
    elif mode == "async":
        asyncio.run(runnable.ainvoke(inputs, config))
    elif mode == "stream":
        list(runnable.stream(inputs, config, **stream))
    else:
        async def consume() -> None:
            async for _ in runnable.astream(inputs, config, **stream):
                pass
        asyncio.run(consume())


def _beside_a_second_call(server: FakeOpenAIServer, run: Callable[[], Any], prompt: str,
                          config: Any, sent: int = 1) -> BaseException | None:
    """``run()`` while another caller makes a second call (``prompt`` with ``config``)
    1 s after the ``sent``-th request reached the server, well past a 0.6 s lease; that
    call's refusal, or None if it was admitted."""
    second: list[BaseException | None] = []

    def later() -> None:
        deadline = time.monotonic() + 10
        while server.request_count < sent and time.monotonic() < deadline:
            time.sleep(0.01)  # until the long request is sent
        time.sleep(1.0)  # well past the lease into it
        try:
            chat(server).invoke(prompt, config)
            second.append(None)
        except BudgetExceeded as exc:
            second.append(exc)

    thread = threading.Thread(target=later)
    thread.start()
    run()
    thread.join()
    return second[0]


@pytest.mark.parametrize("mode", ["sync", "async", "stream", "astream"])
@pytest.mark.parametrize("shape", ["threads", "parallel"])
def test_calls_at_once_past_their_lease_keep_their_holds(ledger: Ledger, mode: str,
                                                         shape: str) -> None:
    """Three calls running past their lease at once keep all three holds: ``threads``,
    each in its own thread (task) with its own handler (each a source of the lease
    keeper); ``parallel``, the branches of one RunnableParallel under one handler (one
    source with three open runs). A fourth call, well past the lease, is refused (a
    hold lost would make room for it), and the books end with nothing held and every
    billed call charged as billed."""
    from langchain_core.runnables import RunnableParallel

    probe = Books(ledger)
    long = slow(1.5) if mode in ("sync", "async") else FakeReply(
        "word " * 16, completion_tokens=ANSWER.completion_tokens, chunk_delay_s=0.1)
    with FakeOpenAIServer([long, long, long, ANSWER]) as server:
        worst = probe.guard.estimate_model_call(_call(server, "hi"))
        books = Books(ledger, cap_usd=3.5 * worst / 1e9, lease_seconds=0.6)
        model = chat(server, stream_usage=True)
        fourth: list[BaseException | None] = []

        def later() -> None:
            time.sleep(1.0)  # well past the lease into the three calls
            try:
                chat(server).invoke("hi", {"callbacks": [books.handler()]})
                fourth.append(None)
            except BudgetExceeded as exc:
                fourth.append(exc)

        def one() -> None:
            config = {"callbacks": [books.handler()]}
            if mode == "sync":
                model.invoke("hi", config)
            elif mode == "stream":
                list(model.stream("hi", config))

        async def aone() -> None:
            config = {"callbacks": [books.handler()]}
            if mode == "async":
                await model.ainvoke("hi", config)
            else:
                async for _ in model.astream("hi", config):
                    pass

        thread = threading.Thread(target=later)
        thread.start()
        if shape == "parallel":
            fan = RunnableParallel(a=model, b=model, c=model)
            config = {"callbacks": [books.handler()]}
            if mode == "sync":
                fan.invoke("hi", config)
            elif mode == "stream":
                list(fan.stream("hi", config))
            elif mode == "async":
                asyncio.run(fan.ainvoke("hi", config))
            else:
                async def consume() -> None:
                    async for _ in fan.astream("hi", config):
                        pass
                asyncio.run(consume())
        elif mode in ("sync", "stream"):
            threads = [threading.Thread(target=one) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            async def three() -> None:
                await asyncio.gather(aone(), aone(), aone())
            asyncio.run(three())
        thread.join()
        assert isinstance(fourth[0], BudgetExceeded), "a fourth call was admitted"
        server.wait_billed(3)
        charged = books.settle_check(server)
        assert charged == server.billed_nano(books.guard.prices)
    assert [r.outcome for r in books.model_records()] == ["ok"] * 3


def test_a_stream_read_a_chunk_at_a_time_by_wait_for_is_charged_as_billed(ledger: Ledger
                                                                          ) -> None:
    """``asyncio.wait_for`` around each chunk (an idle timeout) reads the stream in a task
    per chunk on Python 3.11: the task that started the call is over at its first chunk
    while the stream goes on. The stream keeps its hold past its lease (a second call is
    refused meanwhile) and is charged as billed, not ended as abandoned at its worst case
    after its first chunk."""
    probe = Books(ledger)
    long = FakeReply("word " * 16, completion_tokens=ANSWER.completion_tokens,
                     chunk_delay_s=0.1)
    with FakeOpenAIServer([long, ANSWER]) as server:
        worst = probe.guard.estimate_model_call(_call(server, "hi"))
        books = Books(ledger, cap_usd=1.5 * worst / 1e9, lease_seconds=0.6)
        second: list[BaseException | None] = []

        def later() -> None:
            time.sleep(1.0)  # well past the lease into the stream
            try:
                chat(server).invoke("hi", {"callbacks": [books.handler()]})
                second.append(None)
            except BudgetExceeded as exc:
                second.append(exc)

        async def run() -> None:
            stream = chat(server, stream_usage=True).astream(
                "hi", {"callbacks": [books.handler()]})
            while True:
                try:
                    await asyncio.wait_for(stream.__anext__(), 5)
                except StopAsyncIteration:
                    return

        thread = threading.Thread(target=later)
        thread.start()
        asyncio.run(run())
        thread.join()
        assert isinstance(second[0], BudgetExceeded), "a second call was admitted"
        server.wait_billed(1)
        assert books.settle_check(server) == server.billed_nano(books.guard.prices)
    assert [r.outcome for r in books.model_records()] == ["ok"]


def _agent_beside_a_second_call(server: FakeOpenAIServer, books: Books, middleware: list[Any],
                                mode: str, sent: int = 1) -> BaseException | None:
    """A ``create_agent`` agent with ``middleware`` run to its end (streams in
    ``messages`` mode) beside a second call of another caller (another prompt: not the
    same request): see :func:`_beside_a_second_call`."""
    agent = create_agent(chat(server, stream_usage=True), tools=[], middleware=middleware)
    config: Any = {"configurable": {"thread_id": SESSION}}
    inputs = {"messages": [HumanMessage("hi")]}
    return _beside_a_second_call(
        server, lambda: _drive(agent, mode, inputs, config, stream_mode="messages"),
        "another question", {"callbacks": [books.handler()]}, sent)


@pytest.mark.parametrize("mode", ["sync", "async", "stream", "astream"])
def test_a_middleware_call_past_its_lease_keeps_its_hold(ledger: Ledger, mode: str) -> None:
    """GuardMiddleware alone (no callback handler joining its admission): a model call
    running past its lease keeps its hold, renewed while the wrapped call runs; a second
    call (another prompt: not the same request) is refused meanwhile."""
    from agent_guard import GuardMiddleware

    probe = Books(ledger)
    with FakeOpenAIServer([_long(mode), ANSWER]) as server:
        worst = probe.guard.estimate_model_call(_call(server, "hi"))
        books = Books(ledger, cap_usd=1.5 * worst / 1e9, lease_seconds=0.6)
        second = _agent_beside_a_second_call(server, books, [GuardMiddleware(books.guard)],
                                             mode)
        assert isinstance(second, BudgetExceeded), "a second call was admitted"
        server.wait_billed(1)
        assert books.settle_check(server) == server.billed_nano(books.guard.prices)


@pytest.mark.parametrize("mode", ["sync", "async", "stream", "astream"])
@pytest.mark.parametrize("order", ["guard_outer", "guard_inner"])
@pytest.mark.parametrize("kind", ["retry", "fallback"])
def test_a_retried_or_fallback_attempt_past_its_lease_keeps_its_hold(
        ledger: Ledger, kind: str, order: str, mode: str) -> None:
    """``ModelRetryMiddleware`` or ``ModelFallbackMiddleware`` inside GuardMiddleware
    (``guard_outer``: each attempt after the first admitted at its own price inside the
    one wrapped call) or outside it (``guard_inner``: each attempt a wrapped call of its
    own). The first attempt fails before generating (a 500: released), the next runs past
    its lease: its hold is renewed while it runs, so a second call (another caller) is
    refused meanwhile, and the attempt is charged as billed."""
    from langchain.agents.middleware import ModelFallbackMiddleware, ModelRetryMiddleware

    from agent_guard import GuardMiddleware

    probe = Books(ledger)
    with FakeOpenAIServer([FakeReply(status=500), _long(mode), ANSWER]) as server:
        worst = probe.guard.estimate_model_call(_call(server, "hi"))
        books = Books(ledger, cap_usd=1.5 * worst / 1e9, lease_seconds=0.6)
        # the fallback is the same model (another instance): its hold is the primary's size
        other = (ModelRetryMiddleware(max_retries=1, initial_delay=0, jitter=False)
                 if kind == "retry" else
                 ModelFallbackMiddleware(chat(server, stream_usage=True, temperature=0.5)))
        guard = GuardMiddleware(books.guard)
        second = _agent_beside_a_second_call(
            server, books, [guard, other] if order == "guard_outer" else [other, guard],
            mode, sent=2)
        assert len(server.requests) == 2 + (second is None)
        assert isinstance(second, BudgetExceeded), "a second call was admitted"
        server.wait_billed(1)
        assert books.settle_check(server) == server.billed_nano(books.guard.prices)
    assert [r.outcome for r in books.model_records()] == ["error", "ok"]


def test_a_forked_child_lets_go_of_its_parents_open_runs(ledger: Ledger) -> None:
    """A process forked while a handler has a run open (its parent's call, still running
    in another thread): the child's copy of the handler holds no open run (the run is the
    parent's), so once the child's own call through that handler is over the child's
    lease keeper holds no source and sleeps (no 50 ms polling for the rest of the child's
    life). The parent's call keeps its hold and is charged as billed."""
    import os

    from agent_guard.engine.keeper import keeper

    if not hasattr(os, "fork"):
        pytest.skip("no os.fork")
    with FakeOpenAIServer([slow(1.0), ANSWER]) as server:
        books = Books(ledger)
        handler = books.handler()
        config: Any = {"callbacks": [handler]}
        parent = threading.Thread(target=lambda: chat(server).invoke("hi", config))
        parent.start()
        deadline = time.monotonic() + 10
        while not (handler.open_runs and server.request_count) and time.monotonic() < deadline:
            time.sleep(0.01)  # until the parent's call is open and sent

        def child() -> dict[str, Any]:
            seen: dict[str, Any] = {"inherited": handler.open_runs}
            # its own call, through the inherited handler (a client of its own)
            chat(server, http_client=httpx.Client()).invoke("another question", config)
            seen["after"] = handler.open_runs
            end = time.monotonic() + 5
            while not (keeper._idle and not keeper._sources) and time.monotonic() < end:
                time.sleep(0.01)  # until the keeper's pass after the call
            return {**seen, "sources": len(keeper._sources), "kept": handler.kept,
                    "idle": keeper._idle}

        seen = in_a_fork(child)
        parent.join()
        assert seen == {"inherited": 0, "after": 0, "sources": 0, "kept": False, "idle": True}
        usage = books.guard.usage(SESSION)
        assert (usage.cost_nano, usage.reserved_nano) == (billed_here(books, ledger, server), 0)


def in_a_fork(child: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``child()`` in a forked process; what it returned (or the error it raised,
    as ``{"error": repr}``), once the child is gone."""
    import json
    import os

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        seen: dict[str, Any] = {}
        try:
            seen = child()
        except BaseException as exc:
            seen = {"error": repr(exc)}
        finally:
            os.write(write, json.dumps(seen).encode())
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        return dict(json.loads(pipe.read()))


def billed_here(books: Books, ledger: Ledger, server: FakeOpenAIServer) -> int:
    """What this process's ledger should hold after a forked child made the second of
    two billed requests: both on a shared ledger; on a memory one, the first only (the
    child charged its own copy)."""
    from agent_guard.ledger.memory import MemoryLedger

    own, _ = server.wait_billed(2)
    return books.guard.prices.cost(own.model, own.usage()).total_nano if isinstance(
        ledger, MemoryLedger) else server.billed_nano(books.guard.prices)


@pytest.mark.parametrize("mode", ["sync", "async", "stream", "astream"])
@pytest.mark.parametrize("shape", ["two_requests", "two_agent_runs", "two_handlers",
                                   "handler_listed_twice"])
def test_one_run_id_given_to_two_runs_charges_both(ledger: Ledger, shape: str,
                                                   mode: str) -> None:
    """The same ``run_id`` (a config reused by two callers) on two runs open at once under
    one handler: two model requests (the second joined the first's admission: one charge
    for two bills), or two agent runs (the end of the second ended the first's model call
    as abandoned while it ran: its hold gone, charged its worst case); or two requests,
    each under a handler of its own on the same ledger (the second joined the first's
    admission too). Each request is reserved on its own and charged as billed. One
    request the handler sees twice (listed twice in ``callbacks``) is still charged
    once."""
    import uuid

    with FakeOpenAIServer([FakeReply(ANSWER.content, completion_tokens=60, delay_s=1.0),
                           FakeReply("Yes.", completion_tokens=5)]) as server:
        books = Books(ledger)
        handler = books.handler()
        model = chat(server, stream_usage=True)
        config: Any = {"callbacks": [handler] * (2 if shape == "handler_listed_twice" else 1),
                       "run_id": uuid.uuid4()}
        if shape == "two_agent_runs":
            runnable: Any = create_agent(model, tools=[])
            stream: dict[str, Any] = {"stream_mode": "messages"}
        else:
            runnable, stream = model, {}

        def ask(text: str, config: Any = config) -> None:
            inputs = {"messages": [HumanMessage(text)]} if shape == "two_agent_runs" else text
            _drive(runnable, mode, inputs, config, **stream)

        def second() -> None:
            deadline = time.monotonic() + 10
            while not server.request_count and time.monotonic() < deadline:
                time.sleep(0.01)  # the first request is sent, and open for 1 s
            ask("another question", {**config, "callbacks": [books.handler()]}
                if shape == "two_handlers" else config)

        thread = threading.Thread(target=second)
        if shape != "handler_listed_twice":
            thread.start()
        ask("hi")
        if thread.is_alive():
            thread.join()
        bills = len(server.wait_billed(1 if shape == "handler_listed_twice" else 2))
        assert books.settle_check(server) == server.billed_nano(books.guard.prices)
    assert [r.outcome for r in books.model_records()] == ["ok"] * bills


# -- what is released: only what the provider certainly did not bill --------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("status", [400, 429, 500, 503])
def test_an_http_error_before_generation_is_released(ledger: Ledger, mode: str,
                                                     status: int) -> None:
    books = Books(ledger)
    with FakeOpenAIServer([FakeReply(status=status)]) as server:
        with pytest.raises(openai.APIStatusError):
            if mode == "sync":
                chat(server).invoke("hi", {"callbacks": [books.handler()]})
            else:
                asyncio.run(chat(server).ainvoke("hi", {"callbacks": [books.handler()]}))
        assert server.billed == []
        assert books.settle_check(server) == 0
    [record] = books.model_records()
    assert record.outcome == "error" and record.cost_nano == 0


def test_a_request_never_sent_is_released(ledger: Ledger) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    books = Books(ledger)
    model = ChatOpenAI(model="gpt-4o", base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                       max_retries=0, max_tokens=MAX_TOKENS)
    with pytest.raises(openai.APIConnectionError):
        model.invoke("hi", {"callbacks": [books.handler()]})
    usage = books.guard.usage(SESSION)
    assert (usage.cost_nano, usage.reserved_nano) == (0, 0)
