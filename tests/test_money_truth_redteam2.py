"""Money truth, second red-team pass: one ``run_id`` given to two requests at once
("twins"), a forked child, GuardMiddleware attempts renewed inside it, streams.

Same bar as ``test_money_truth.py``: real ``ChatOpenAI`` (``create_agent``, LCEL) against
``FakeOpenAIServer``, on a memory and a Redis ledger; once the run is over nothing is
reserved, spend <= cap, charged >= billed (``server.billed_nano``), charged <= what the
calls reserved.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import pytest

from agent_guard import OutputCapExceeded
from agent_guard.ledger import Ledger
from agent_guard.testing import FakeOpenAIServer, FakeReply

from . import test_money_truth as truth
from .test_money_truth import ANSWER, MAX_TOKENS, Books, chat

# the money-truth suite's fixtures: a memory and a Redis ledger; quick SDK retries; warm-up
ledger = truth.ledger
quick_sdk_retries = truth.quick_sdk_retries
warm = truth.warm


def words(count: int, delay: float = 0.02) -> FakeReply:
    """A streamed answer of ``count`` words, billed as what it sends."""
    return FakeReply("word " * count, completion_tokens=count, chunk_delay_s=delay)


def _wait(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)


# -- twins: one run_id given to two requests at once ---------------------------------------


@pytest.mark.parametrize("shape", ["two_threads", "one_thread_interleaved"])
def test_two_sync_streams_given_one_run_id_each_count_their_own_chunks(
        ledger: Ledger, shape: str) -> None:
    """Two ``model.stream`` calls given the same ``run_id`` (a config reused by two
    callers), open at once: each streams 60 words under ``max_tokens=100``. Each stream's
    chunks and end belong to it: neither is stopped for an output cap the two reach only
    together, and each request is charged as billed."""
    assert 2 * 60 > MAX_TOKENS > 60
    with FakeOpenAIServer([words(60), words(60)]) as server:
        books = Books(ledger)
        config: Any = {"callbacks": [books.handler()], "run_id": uuid.uuid4()}
        model = chat(server, stream_usage=True)
        outcomes: list[Any] = []

        def one(text: str) -> None:
            try:
                outcomes.append(len(list(model.stream(text, config))))
            except OutputCapExceeded as exc:
                outcomes.append(exc)

        if shape == "two_threads":
            threads = [threading.Thread(target=one, args=(text,))
                       for text in ("hi", "another question")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:  # both generators stepped in turn by one thread
            streams = [model.stream("hi", config), model.stream("another question", config)]
            try:
                while streams:
                    for stream in list(streams):
                        if next(stream, None) is None:
                            streams.remove(stream)
                outcomes += ["ok", "ok"]
            except OutputCapExceeded as exc:
                outcomes.append(exc)
        assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
        server.wait_billed(2)
        assert books.settle_check(server) == server.billed_nano(books.guard.prices)
    assert [r.outcome for r in books.model_records()] == ["ok", "ok"]


@pytest.mark.xfail(strict=True, reason="known gap: an async stream's chunks are matched to "
                   "its run by the task that reads them; a task per chunk, or one task "
                   "reading both streams, counts both streams' chunks on the older run "
                   "(a false OutputCapExceeded at 101 of 100 tokens)")
@pytest.mark.parametrize("shape", ["two_tasks_wait_for_per_chunk", "one_task_interleaved"])
def test_two_async_streams_given_one_run_id_each_count_their_own_chunks(
        ledger: Ledger, shape: str) -> None:
    """As above, ``model.astream``: two tasks each reading its stream a chunk at a time
    through ``asyncio.wait_for`` (a task per chunk), or one task stepping both streams
    in turn."""
    with FakeOpenAIServer([words(60), words(60)]) as server:
        books = Books(ledger)
        config: Any = {"callbacks": [books.handler()], "run_id": uuid.uuid4()}
        model = chat(server, stream_usage=True)

        async def step(stream: Any) -> bool:
            try:
                await asyncio.wait_for(stream.__anext__(), 10)
                return True
            except StopAsyncIteration:
                return False

        async def one(text: str) -> None:
            stream = model.astream(text, config)
            while await step(stream):
                pass

        async def run() -> None:
            if shape == "two_tasks_wait_for_per_chunk":
                await asyncio.gather(one("hi"), one("another question"))
                return
            streams = [model.astream("hi", config),
                       model.astream("another question", config)]
            while streams:
                for stream in list(streams):
                    if not await step(stream):
                        streams.remove(stream)

        asyncio.run(run())
        server.wait_billed(2)
        assert books.settle_check(server) == server.billed_nano(books.guard.prices)
    assert [r.outcome for r in books.model_records()] == ["ok", "ok"]


@pytest.mark.xfail(strict=True, reason="known gap: a chain's end ends the open model runs "
                   "under its run id; a sync stream has no liveness to show it still runs "
                   "in another thread, so the other chain's stream is ended as abandoned "
                   "(its worst case charged: 1,057,500 nano for 355,000 billed)")
def test_two_chains_given_one_run_id_each_streaming_a_model(ledger: Ledger) -> None:
    """Two ``RunnableLambda`` chains given the same ``run_id``, each streaming the model
    inside (sync, two threads): the quick one's end must not end the slow one's stream,
    still running in the other thread; each request charged as billed."""
    from langchain_core.runnables import RunnableLambda

    def reply(body: dict[str, Any]) -> FakeReply:
        return words(30, 0.03) if "slow" in str(body["messages"]) else FakeReply(
            "ok", completion_tokens=1)

    with FakeOpenAIServer(reply) as server:
        books = Books(ledger)
        config: Any = {"callbacks": [books.handler()], "run_id": uuid.uuid4()}
        model = chat(server, stream_usage=True)
        chain = RunnableLambda(lambda text: "".join(str(c.content)
                                                    for c in model.stream(text)))
        thread = threading.Thread(target=lambda: chain.invoke("slow, please", config))
        thread.start()
        _wait(lambda: server.request_count)
        chain.invoke("quick", config)
        thread.join()
        server.wait_billed(2)
        assert books.settle_check(server) == server.billed_nano(books.guard.prices)
    assert [r.outcome for r in books.model_records()] == ["ok", "ok"]


@pytest.mark.parametrize("mode", ["batch", "abatch"])
def test_a_batch_whose_configs_share_one_run_id_charges_each_input(ledger: Ledger,
                                                                  mode: str) -> None:
    """``batch``/``abatch`` with one config per input, all naming the same ``run_id``
    (LangChain keeps a run_id only when each input has its config): the three requests
    run at once (executor threads, or tasks) and each is charged as billed."""
    with FakeOpenAIServer([FakeReply(ANSWER.content, completion_tokens=60, delay_s=0.3)] * 3
                          ) as server:
        books = Books(ledger)
        handler = books.handler()
        run_id = uuid.uuid4()
        configs: Any = [{"callbacks": [handler], "run_id": run_id} for _ in range(3)]
        model = chat(server)
        inputs = ["hi", "another question", "a third one"]
        if mode == "batch":
            model.batch(inputs, configs)
        else:
            asyncio.run(model.abatch(inputs, configs))
        server.wait_billed(3)
        assert books.settle_check(server) == server.billed_nano(books.guard.prices)
    assert [r.outcome for r in books.model_records()] == ["ok"] * 3


@pytest.mark.parametrize("end", ["cancelled", "error"])
def test_a_twin_cancelled_or_failed_while_the_other_streams(ledger: Ledger, end: str) -> None:
    """Two tasks given one ``run_id``: one is cancelled while its request runs (its end
    never comes), or its request fails (a 500: never billed), while the other streams.
    The stream is charged exactly what it was billed; the cancelled request its worst
    case (it was billed in full), the failed one nothing; nothing stays held."""
    def reply(body: dict[str, Any]) -> FakeReply:
        if body.get("stream"):
            return words(40)
        return FakeReply(status=500, delay_s=0.2) if end == "error" else truth.slow(2.0)

    with FakeOpenAIServer(reply) as server:
        books = Books(ledger)
        handler = books.handler()
        config: Any = {"callbacks": [handler], "run_id": uuid.uuid4()}
        model = chat(server, stream_usage=True)

        async def run() -> None:
            other = asyncio.create_task(model.ainvoke("another question", config))
            await asyncio.to_thread(_wait, lambda: server.request_count)
            chunks = 0
            async for _ in model.astream("hi", config):
                chunks += 1
                if chunks == 5 and end == "cancelled":
                    other.cancel()
            if end == "cancelled":
                with pytest.raises(asyncio.CancelledError):
                    await other
            else:
                with pytest.raises(Exception, match=r"500|Internal"):
                    await other

        asyncio.run(run())
        billed = server.wait_billed(1 if end == "error" else 2)
        charged = books.settle_check(server)
    records = sorted(books.model_records(), key=lambda r: r.outcome)
    stream_bill = books.guard.prices.cost(billed[-1 if end == "error" else 1].model,
                                          billed[-1 if end == "error" else 1].usage()).total_nano
    ok = [r for r in records if r.outcome == "ok"]
    assert len(ok) == 1 and ok[0].cost_nano == stream_bill
    if end == "error":  # the failed request was never billed, nor charged
        assert charged == stream_bill == server.billed_nano(books.guard.prices)
        assert [r.outcome for r in records] == ["error", "ok"]
    else:  # the cancelled one is charged its worst case: what the calls reserved
        assert charged == sum(r.reserved_nano for r in records) - ok[0].reserved_nano \
            + stream_bill
        assert [r.outcome for r in records] == ["aborted", "ok"]


@pytest.mark.parametrize("sync", ["stream", "invoke"])
@pytest.mark.parametrize("first", ["sync_thread", "async_task"])
def test_twins_across_a_sync_thread_and_an_async_task(ledger: Ledger, first: str,
                                                      sync: str) -> None:
    """One ``run_id`` given to a sync call (``stream`` or ``invoke``) in a thread and an
    ``astream`` in a task at once, either started first: each streams 60 words under
    ``max_tokens=100``; neither is stopped for the other's chunks and each request is
    charged as billed."""
    with FakeOpenAIServer([words(60, 0.03), words(60, 0.03)]) as server:
        books = Books(ledger)
        config: Any = {"callbacks": [books.handler()], "run_id": uuid.uuid4()}
        model = chat(server, stream_usage=True)
        failed: list[BaseException] = []

        def sync_call() -> None:
            try:
                if sync == "stream":
                    list(model.stream("hi", config))
                else:
                    model.invoke("hi", config)
            except BaseException as exc:
                failed.append(exc)

        async def run() -> None:
            thread = threading.Thread(target=sync_call)
            if first == "sync_thread":
                thread.start()
                await asyncio.to_thread(_wait, lambda: server.request_count)
            stream = model.astream("another question", config)
            await stream.__anext__()
            if first == "async_task":
                thread.start()
            async for _ in stream:
                pass
            await asyncio.to_thread(thread.join)

        asyncio.run(run())
        assert not failed, failed
        server.wait_billed(2)
        assert books.settle_check(server) == server.billed_nano(books.guard.prices)
    assert [r.outcome for r in books.model_records()] == ["ok", "ok"]


@pytest.mark.parametrize("mode", ["sync", "async", "stream", "astream"])
def test_a_run_id_reused_one_call_after_another_is_admitted_once_per_call(
        ledger: Ledger, mode: str) -> None:
    """A config with a ``run_id`` reused call after call (never two at once): one
    admission per call (no second one for a twin), no twin left on the handler, each
    call charged as billed."""
    with FakeOpenAIServer([ANSWER] * 3) as server:
        books = Books(ledger)
        handler = books.handler()
        config: Any = {"callbacks": [handler], "run_id": uuid.uuid4()}
        admitted: list[Any] = []
        before = books.guard.before_model_call

        def counting(call: Any, *args: Any, **kw: Any) -> Any:
            admitted.append(call.run_id)
            return before(call, *args, **kw)

        books.guard.before_model_call = counting  # type: ignore[method-assign]
        for text in ("hi", "another question", "a third one"):
            # (a model per call: an async client is bound to its asyncio.run's loop)
            truth._drive(chat(server, stream_usage=True), mode, text, config)
            assert not handler._twins and not handler.open_runs
        server.wait_billed(3)
        assert books.settle_check(server) == server.billed_nano(books.guard.prices)
    assert admitted == [str(config["run_id"])] * 3
    assert [r.outcome for r in books.model_records()] == ["ok"] * 3


# -- retries and fallbacks: each attempt held while it runs ---------------------------------


def _capped(ledger: Ledger, server: FakeOpenAIServer) -> Books:
    """Books whose cap fits one call's worst case and a half, with a 0.6 s lease."""
    worst = Books(ledger).guard.estimate_model_call(truth._call(server, "hi"))
    return Books(ledger, cap_usd=1.5 * worst / 1e9, lease_seconds=0.6)


@pytest.mark.parametrize(("kind", "mode"), [
    # (RunnableRetry retries invoke and batch only: a stream is not retried)
    ("with_retry", "sync"), ("with_retry", "async"),
    ("with_fallbacks", "sync"), ("with_fallbacks", "async"),
    ("with_fallbacks", "stream"), ("with_fallbacks", "astream")])
def test_a_retried_or_fallback_model_past_its_lease_under_the_handler(
        ledger: Ledger, kind: str, mode: str) -> None:
    """``ChatOpenAI.with_retry`` / ``.with_fallbacks`` under the callback handler: the
    first attempt fails before generating (a 500: released), the next runs past its
    lease. Its hold is renewed while it runs: a second caller is refused meanwhile; each
    request is charged as billed."""
    with FakeOpenAIServer([FakeReply(status=500), truth._long(mode), ANSWER]) as server:
        books = _capped(ledger, server)
        model = chat(server, stream_usage=True)
        runnable: Any = (model.with_retry(stop_after_attempt=2, wait_exponential_jitter=False)
                         if kind == "with_retry" else
                         model.with_fallbacks([chat(server, stream_usage=True,
                                                    temperature=0.5)]))
        config: Any = {"callbacks": [books.handler()]}
        second = truth._beside_a_second_call(
            server, lambda: truth._drive(runnable, mode, "hi", config),
            "another question", {"callbacks": [books.handler()]}, sent=2)
        assert isinstance(second, truth.BudgetExceeded), "a second call was admitted"
        server.wait_billed(1)
        assert books.settle_check(server) == server.billed_nano(books.guard.prices)
    assert [r.outcome for r in books.model_records()] == ["error", "ok"]


@pytest.mark.parametrize("handler", [False, True])
def test_astream_events_over_an_agent_retrying_inside_guard_middleware(
        ledger: Ledger, handler: bool) -> None:
    """``astream_events(version="v2")`` over ``create_agent`` with ``ModelRetryMiddleware``
    inside ``GuardMiddleware`` (and a callback handler on the same guard, or none): the
    first attempt fails (a 500), the retry streams past its lease, held while it runs (a
    second caller refused); charged as billed, nothing held."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelRetryMiddleware

    from agent_guard import GuardMiddleware

    with FakeOpenAIServer([FakeReply(status=500), truth._long("astream"), ANSWER]) as server:
        books = _capped(ledger, server)
        agent = create_agent(chat(server, stream_usage=True), tools=[], middleware=[
            GuardMiddleware(books.guard),
            ModelRetryMiddleware(max_retries=1, initial_delay=0, jitter=False)])
        config: Any = {"configurable": {"thread_id": truth.SESSION}}
        if handler:
            config["callbacks"] = [books.handler()]
        streamed: list[str] = []

        async def consume() -> None:
            async for event in agent.astream_events(
                    {"messages": [truth.HumanMessage("hi")]}, config, version="v2"):
                if event["event"] == "on_chat_model_stream":
                    streamed.append(str(event["data"]["chunk"].content))

        second = truth._beside_a_second_call(server, lambda: asyncio.run(consume()),
                                             "another question",
                                             {"callbacks": [books.handler()]}, sent=2)
        assert isinstance(second, truth.BudgetExceeded), "a second call was admitted"
        assert "".join(streamed) == "word " * 16
        server.wait_billed(1)
        assert books.settle_check(server) == server.billed_nano(books.guard.prices)
    assert [r.outcome for r in books.model_records()] == ["error", "ok"]


def test_a_fork_while_a_middleware_attempt_is_open(ledger: Ledger) -> None:
    """A process forked while a GuardMiddleware's retried attempt is running in another
    thread (its hold renewed by the lease keeper): the child's keeper watches none of the
    parent's calls; the child's own agent call through the same middleware is charged
    and, once over, leaves its keeper nothing to watch. The parent's attempt keeps its
    hold and is charged as billed."""
    import os

    import httpx
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelRetryMiddleware

    from agent_guard import GuardMiddleware
    from agent_guard.engine.keeper import keeper

    if not hasattr(os, "fork"):
        pytest.skip("no os.fork")
    with FakeOpenAIServer([FakeReply(status=500), truth.slow(1.0), ANSWER]) as server:
        books = Books(ledger)
        guard = GuardMiddleware(books.guard)
        retry = ModelRetryMiddleware(max_retries=1, initial_delay=0, jitter=False)
        agent = create_agent(chat(server), tools=[], middleware=[guard, retry])
        config: Any = {"configurable": {"thread_id": truth.SESSION}}
        inputs = {"messages": [truth.HumanMessage("hi")]}
        parent = threading.Thread(target=lambda: agent.invoke(inputs, config))
        parent.start()
        _wait(lambda: server.request_count >= 2 and keeper.watching)
        time.sleep(0.1)  # the retried attempt is sent and watched
        assert keeper.watching
        def child() -> dict[str, Any]:
            seen = {"inherited": keeper.watching}
            own = create_agent(chat(server, http_client=httpx.Client()), tools=[],
                               middleware=[guard, retry])
            own.invoke({"messages": [truth.HumanMessage("another question")]}, config)
            end = time.monotonic() + 5
            while not (keeper._idle and not keeper.watching) and time.monotonic() < end:
                time.sleep(0.01)  # until the keeper's pass after the call
            return {**seen, "after": keeper.watching, "idle": keeper._idle}

        seen = truth.in_a_fork(child)
        parent.join()
        assert seen == {"inherited": 0, "after": 0, "idle": True}
        usage = books.guard.usage(truth.SESSION)
        assert (usage.cost_nano, usage.reserved_nano) == (
            truth.billed_here(books, ledger, server), 0)


# -- legacy text models (BaseLLM) -----------------------------------------------------------


def _text_model(server: FakeOpenAIServer) -> Any:
    """A legacy text-completion model (``BaseLLM``) whose answers come from ``server``
    (its chat endpoint, one user message per prompt), with the provider's usage in
    ``llm_output["token_usage"]`` as langchain-openai's ``OpenAI`` gives it."""
    import openai
    from langchain_core.language_models.llms import BaseLLM
    from langchain_core.outputs import Generation, LLMResult

    class ServerLLM(BaseLLM):
        base_url: str
        model_name: str = "gpt-4o"
        max_tokens: int = MAX_TOKENS

        @property
        def _llm_type(self) -> str:
            return "server-llm"

        @property
        def _identifying_params(self) -> dict[str, Any]:
            return {"model_name": self.model_name, "max_tokens": self.max_tokens}

        def _request(self, prompt: str) -> dict[str, Any]:
            return {"model": self.model_name, "max_tokens": self.max_tokens,
                    "messages": [{"role": "user", "content": prompt}]}

        @staticmethod
        def _result(answers: list[Any]) -> LLMResult:
            usage: dict[str, int] = {}
            for answer in answers:
                for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
                    usage[key] = usage.get(key, 0) + getattr(answer.usage, key)
            return LLMResult(
                generations=[[Generation(text=a.choices[0].message.content or "")]
                             for a in answers],
                llm_output={"token_usage": usage, "model_name": answers[0].model})

        def _generate(self, prompts: list[str], stop: Any = None, run_manager: Any = None,
                      **kwargs: Any) -> LLMResult:
            client = openai.OpenAI(base_url=self.base_url, api_key="test", max_retries=0)
            return self._result([client.chat.completions.create(**self._request(p))
                                 for p in prompts])

        async def _agenerate(self, prompts: list[str], stop: Any = None,
                             run_manager: Any = None, **kwargs: Any) -> LLMResult:
            client = openai.AsyncOpenAI(base_url=self.base_url, api_key="test",
                                        max_retries=0)
            return self._result([await client.chat.completions.create(**self._request(p))
                                 for p in prompts])

    return ServerLLM(base_url=server.base_url)


@pytest.mark.parametrize("mode", ["threads", "tasks"])
def test_a_legacy_text_model_given_one_run_id_twice_at_once(ledger: Ledger, mode: str) -> None:
    """A ``BaseLLM`` called twice at once with one ``run_id`` (two threads, or two tasks)
    under one handler: each text prompt is admitted on its own and its run kept open
    while its request runs (``agenerate`` dispatches each start in a task of its own,
    over at once: the call's task is the one awaiting it); each request charged as
    billed, nothing held."""
    with FakeOpenAIServer([FakeReply(ANSWER.content, completion_tokens=60, delay_s=0.5),
                           FakeReply("Yes.", completion_tokens=5)]) as server:
        books = Books(ledger)
        config: Any = {"callbacks": [books.handler()], "run_id": uuid.uuid4()}
        llm = _text_model(server)
        if mode == "threads":
            second = threading.Thread(target=lambda: (
                _wait(lambda: server.request_count), llm.invoke("another question", config)))
            second.start()
            llm.invoke("hi", config)
            second.join()
        else:
            async def run() -> None:
                first = asyncio.create_task(llm.ainvoke("hi", config))
                await asyncio.to_thread(_wait, lambda: server.request_count)
                await llm.ainvoke("another question", config)
                await first

            asyncio.run(run())
        server.wait_billed(2)
        assert books.settle_check(server) == server.billed_nano(books.guard.prices)
    assert [r.outcome for r in books.model_records()] == ["ok", "ok"]


def test_a_legacy_text_model_async_call_cut_by_a_timeout(ledger: Ledger) -> None:
    """``asyncio.wait_for`` around a ``BaseLLM.ainvoke`` whose answer is slow: its end
    never comes; the run is ended with the task that made the call, charged its worst
    case (the provider billed it), nothing held."""
    with FakeOpenAIServer([truth.slow(3.0)]) as server:
        books = Books(ledger)
        llm = _text_model(server)

        async def run() -> None:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(
                    llm.ainvoke("hi", {"callbacks": [books.handler()]}), truth.CUT_AFTER)

        asyncio.run(run())
        server.wait_billed(1)
        books.settle_check(server)
    [record] = books.model_records()
    assert record.outcome == "aborted" and record.usage_estimated
