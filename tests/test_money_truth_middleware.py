"""Money truth through GuardMiddleware (issue 14): the money-truth rows (cancellations,
timeouts, the SDK's retries, retry middleware, content-block streams, reasoning without
usage, abandoned calls, provider errors) re-run with ``create_agent(...,
middleware=[GuardMiddleware(...)])`` instead of the callback, sync and async, on a
memory and a Redis ledger.

Every row checks what ``Books.settle_check`` checks for the callback: nothing reserved
once the run is over, spent <= cap, charged >= billed (``FakeOpenAIServer.billed``),
charged <= what the calls reserved; a row whose usage is reported in full checks
charged == billed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
from langchain.agents import create_agent
from langchain_core.messages import HumanMessage

from agent_guard import GuardMiddleware
from agent_guard.testing import FakeOpenAIServer, FakeReply
from agent_guard.testing.openai_server import truncate_to_tokens

from . import test_money_truth as truth
from .test_money_truth import ANSWER, CUT_AFTER, SESSION, Books, chat, slow, streamed

# the money-truth suite's fixtures: a memory and a Redis ledger; quick SDK retries; warm-up
ledger = truth.ledger
quick_sdk_retries = truth.quick_sdk_retries
warm = truth.warm

INPUTS = {"messages": [HumanMessage("hi")]}


# -- how a row drives the agent ------------------------------------------------------------


def invoke(agent: Any, mode: str, raises: Any = None) -> None:
    async def arun() -> None:
        await agent.ainvoke(INPUTS)

    def run() -> None:
        if mode == "sync":
            agent.invoke(INPUTS)
        else:
            asyncio.run(arun())

    if raises is None:
        run()
    else:
        with pytest.raises(raises):
            run()


def stream(agent: Any, mode: str, stop_after: int | None = None) -> None:
    """Stream the run's messages (the model streams); stop reading after ``stop_after``
    chunks and close the stream (close / aclose)."""
    if mode == "sync":
        chunks = agent.stream(INPUTS, stream_mode="messages")
        for n, _ in enumerate(chunks, 1):
            if stop_after is not None and n >= stop_after:
                break
        chunks.close()
        return

    async def arun() -> None:
        chunks = agent.astream(INPUTS, stream_mode="messages")
        n = 0
        async for _ in chunks:
            n += 1
            if stop_after is not None and n >= stop_after:
                break
        await chunks.aclose()

    asyncio.run(arun())


def cancel(agent: Any, mode: str) -> None:
    """Async: ``asyncio.wait_for`` gives up on the run (the task is cancelled). Sync: a
    blocking call cannot be cancelled; the consumer walks away from a streamed run (the
    model's thread finishes the call, which is charged from its answer)."""
    if mode == "sync":
        stream(agent, mode, stop_after=1)
        return

    async def arun() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(agent.ainvoke(INPUTS), CUT_AFTER)

    asyncio.run(arun())


# -- the rows --------------------------------------------------------------------------------


def honouring_cap(text: str, **kw: Any) -> Callable[[dict[str, Any]], FakeReply]:
    """A provider's answer: ``text`` cut at the output cap the request carries (the
    server itself ignores caps)."""
    def reply(body: dict[str, Any]) -> FakeReply:
        cap = next((body[k] for k in ("max_output_tokens", "max_completion_tokens",
                                      "max_tokens") if body.get(k)), None)
        if cap is not None:
            text_ = truncate_to_tokens(text, cap, str(body.get("model") or "gpt-4o"))
        return FakeReply(text if cap is None else text_, **kw)

    return reply


@dataclass(frozen=True)
class Row:
    replies: Callable[[str], Any]  # the provider's answers, by mode
    drive: Callable[[Any, str], None]
    model: dict[str, Any] = field(default_factory=dict)
    billed: int = 1  # requests the provider bills
    exact: bool = False  # usage reported in full: charged == billed
    inner: Callable[[], list[Any]] = list  # middleware inside GuardMiddleware


def _retry_middleware() -> list[Any]:
    from langchain.agents.middleware import ModelRetryMiddleware

    return [ModelRetryMiddleware(max_retries=2, initial_delay=0, jitter=False,
                                 retry_on=(openai.APITimeoutError,))]


ROWS = {
    "answer": Row(lambda _: [ANSWER], invoke, exact=True),
    "streamed_answer": Row(lambda _: [streamed()], stream, model={"stream_usage": True},
                           exact=True),
    # row 1: cancellation and cut streams skip the model's end callbacks
    "cancelled": Row(lambda mode: [slow() if mode == "async" else slow(0.5)], cancel,
                     model={"stream_usage": True}),
    "stream_closed": Row(lambda _: [streamed()], lambda a, m: stream(a, m, stop_after=3),
                         model={"stream_usage": True}),
    # row 2: a client read timeout after the request was sent
    "read_timeout": Row(lambda _: [slow()],
                        lambda a, m: invoke(a, m, raises=openai.APITimeoutError),
                        model={"timeout": 0.2}),
    # row 3: the SDK's own retries inside one guarded call
    "sdk_retries": Row(lambda _: [slow(), slow(), ANSWER], invoke,
                       model={"timeout": 0.2, "max_retries": 2}, billed=3),
    "sdk_retries_streamed": Row(lambda _: [slow(), streamed()], stream, billed=2,
                                model={"timeout": 0.2, "max_retries": 1,
                                       "stream_usage": True}),
    # with_retry's counterpart in an agent: ModelRetryMiddleware inside GuardMiddleware
    "retry_middleware": Row(lambda _: [slow(), slow(), ANSWER], invoke,
                            model={"timeout": 0.2}, billed=3, inner=_retry_middleware),
    # row 4: content-block streams (Responses API, output_version v1), no max_tokens: the
    # middleware sends the cap it reserved and the provider stops there
    "content_blocks": Row(lambda _: honouring_cap(" word" * 6000), stream, exact=True,
                          model={"max_tokens": None, "use_responses_api": True,
                                 "output_version": "v1"}),
    "content_blocks_cut": Row(lambda _: honouring_cap(" word" * 2000, chunk_delay_s=0.005),
                              lambda a, m: stream(a, m, stop_after=20),
                              model={"use_responses_api": True, "output_version": "v1"}),
    # row 6: hidden reasoning streamed without a usage chunk
    "reasoning_without_usage": Row(
        lambda _: [FakeReply("The answer is 42.", reasoning_tokens=3000)], stream,
        model={"model": "o3-mini", "max_tokens": 4000}),
    # an abandoned call without max_tokens: the cap the middleware sent bounds the bill
    "abandoned_without_max_tokens": Row(
        lambda _: honouring_cap("word " * 6000, chunk_delay_s=0.005),
        lambda a, m: stream(a, m, stop_after=3), model={"max_tokens": None}),
    # only a request the provider certainly did not bill is released
    "http_error": Row(lambda _: [FakeReply(status=500)],
                      lambda a, m: invoke(a, m, raises=openai.APIStatusError),
                      billed=0, exact=True),
}


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("row", list(ROWS))
def test_money_truth_through_the_middleware(ledger: Any, row: str, mode: str) -> None:
    spec = ROWS[row]
    books = Books(ledger, default_max_output_tokens=300)
    with FakeOpenAIServer(spec.replies(mode), chunk_chars=25) as server:
        agent = create_agent(chat(server, **spec.model), tools=[], middleware=[
            GuardMiddleware(books.guard, session_id=SESSION), *spec.inner()])
        spec.drive(agent, mode)
        if spec.billed:
            assert len(server.wait_billed(spec.billed)) == spec.billed
        charged = books.settle_check(server)
        assert len(server.billed) == spec.billed
        if spec.exact:
            assert charged == server.billed_nano(books.guard.prices)
    if row == "content_blocks":  # the provider stopped at the cap the middleware sent
        assert server.requests[0]["max_output_tokens"] == 300
