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
from .test_money_truth import MAX_TOKENS, Books, chat

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
