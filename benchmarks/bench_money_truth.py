"""What the provider billed against what the guard charged, path by path (lifecycle half).

    python benchmarks/bench_money_truth.py

Real ``ChatOpenAI`` against the local ``FakeOpenAIServer`` (which bills every request
it accepted, answers the client gave up on included), a memory ledger, gpt-4o
prices, ``max_tokens=100``. For each path: the requests the provider billed, their
price, what the guard charged, and the stated bound (what the calls reserved).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import _checkout  # noqa: F401  (this checkout's agent_guard)
import openai
from langchain_openai import ChatOpenAI

from agent_guard import BudgetExceeded, Guard, GuardCallbackHandler, Limits
from agent_guard.testing import FakeOpenAIServer, FakeReply

openai._base_client.INITIAL_RETRY_DELAY = 0.01  # type: ignore[attr-defined]  # fast SDK retries
SESSION = "bench"
ANSWER = FakeReply("Paris is the capital of France.", completion_tokens=60)


def slow(delay: float = 3.0) -> FakeReply:
    return FakeReply(ANSWER.content, completion_tokens=60, delay_s=delay)


def chat(server: FakeOpenAIServer, **kw: Any) -> ChatOpenAI:
    kw.setdefault("max_retries", 0)
    return ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="x", max_tokens=100,
                      **kw)


def run(name: str, replies: list[Any], body: Callable[[FakeOpenAIServer, Guard, Any], Any],
        cap_usd: float = 1.0, **limits: Any) -> None:
    records: list[Any] = []
    guard = Guard(Limits(max_cost_usd=cap_usd, **limits), on_record=[records.append])
    with FakeOpenAIServer(replies) as server:
        handler = GuardCallbackHandler(guard, session_id=SESSION)
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            body(server, guard, {"callbacks": [handler]})
        deadline = time.monotonic() + 5
        while (guard.usage(SESSION).reserved_nano or getattr(handler, "open_runs", 0)) and \
                time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # requests a timed-out client sent last
        usage = guard.usage(SESSION)
        billed = server.billed_nano(guard.prices)
        bound = sum(r.reserved_nano for r in records if r.kind == "model")
        print(f"| {name} | {len(server.billed)} | ${billed / 1e9:.6f} | "
              f"${usage.cost_nano / 1e9:.6f} | ${bound / 1e9:.6f} | "
              f"${usage.reserved_nano / 1e9:.6f} |")


def main() -> None:
    from agent_guard.tokens import TokenCounter

    TokenCounter().count_text("warm up", "gpt-4o")
    print("| path | requests billed | billed | charged | bound (reserved) | held after |")
    print("|---|---|---|---|---|---|")

    def wait_for(server: FakeOpenAIServer, guard: Guard, config: Any) -> None:
        asyncio.run(asyncio.wait_for(chat(server).ainvoke("hi", config), 1.0))

    run("`wait_for(ainvoke)` times out", [slow()], wait_for)

    def cut_stream(server: FakeOpenAIServer, guard: Guard, config: Any) -> None:
        stream = chat(server).stream("hi", config)
        next(stream), next(stream)
        stream.close()

    run("`stream()` closed after 2 chunks", [FakeReply("word " * 40, completion_tokens=80,
                                                        chunk_delay_s=0.02)], cut_stream)

    def with_retry(server: FakeOpenAIServer, guard: Guard, config: Any) -> None:
        chat(server, timeout=0.05).with_retry(
            stop_after_attempt=6, wait_exponential_jitter=False,
            retry_if_exception_type=(openai.APITimeoutError,)).invoke("hi", config)

    run("read timeouts, `with_retry(6)`, cap $0.0045", [slow()], with_retry, cap_usd=0.0045)

    def sdk(server: FakeOpenAIServer, guard: Guard, config: Any) -> None:
        chat(server, timeout=0.1, max_retries=2).invoke("hi", config)

    run("SDK `max_retries=2`, 3 timeouts", [slow()], sdk)
    run("SDK `max_retries=2`, answer after 2 timeouts", [slow(), slow(), ANSWER], sdk)

    def zero_retries(server: FakeOpenAIServer, guard: Guard, config: Any) -> None:
        chat(server, timeout=0.1).with_retry(
            stop_after_attempt=3, wait_exponential_jitter=False,
            retry_if_exception_type=(openai.APITimeoutError,)).invoke("hi", config)

    run("`max_retries=0` + `with_retry(3)`, answer after 2 timeouts",
        [slow(), slow(), ANSWER], zero_retries)

    def two_handlers(server: FakeOpenAIServer, guard: Guard, config: Any) -> None:
        other = GuardCallbackHandler(guard, session_id=SESSION)
        chat(server, callbacks=[other]).invoke("hi", config)

    run("two handlers of one guard see one request", [ANSWER], two_handlers)

    def long_call(server: FakeOpenAIServer, guard: Guard, config: Any) -> None:
        refused: list[bool] = []

        def later() -> None:
            time.sleep(0.6)
            try:
                chat(server).invoke("hi", config)
                refused.append(False)
            except BudgetExceeded:
                refused.append(True)

        thread = __import__("threading").Thread(target=later)
        thread.start()
        chat(server).invoke("hi", config)
        thread.join()
        print(f"  (second call during a 1 s call, lease 0.3 s: "
              f"{'refused' if refused[0] else 'ADMITTED'})")

    run("a 1 s call, `lease_seconds=0.3`, cap for one call", [slow(1.0), ANSWER], long_call,
        cap_usd=0.0015, lease_seconds=0.3)


if __name__ == "__main__":
    main()
