"""What the provider billed against what the guard charged, path by path (content half).

    python benchmarks/bench_money_truth_content.py

Real ``ChatOpenAI`` (chat completions and the Responses API) against the local
``FakeOpenAIServer``, which bills every request it accepted in full (hidden reasoning
included), on a memory ledger. For each path: the requests the provider billed, their
price, what the guard charged, the stated bound (what the calls reserved), what was
still held after the run, and what happened.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import _checkout  # noqa: F401  (this checkout's agent_guard)
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

from agent_guard import BudgetExceeded, Guard, GuardCallbackHandler, Limits, OutputCapExceeded
from agent_guard.testing import FakeOpenAIServer, FakeReply

SESSION = "bench"
STATED_PRICE = {"input_cost_per_token": "2.5e-06", "output_cost_per_token": "1.5e-05"}


def chat(server: FakeOpenAIServer, model: str = "gpt-4o", **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(model=model, base_url=server.base_url, api_key="x", max_retries=0, **kw)


def run(name: str, replies: list[Any], body: Callable[[FakeOpenAIServer, Any], str],
        limits: Callable[[], Limits], chunk_chars: int = 8) -> None:
    records: list[Any] = []
    try:
        guard = Guard(limits(), on_record=[records.append])
    except ValueError as exc:
        print(f"| {name} | - | - | - | - | - | refused at setup: {str(exc)[:60]}... |")
        return
    with FakeOpenAIServer(replies, chunk_chars=chunk_chars) as server:
        config = {"callbacks": [GuardCallbackHandler(guard, session_id=SESSION)]}
        what = body(server, config)
        usage = guard.usage(SESSION)
        billed = server.billed_nano(guard.prices)
        bound = sum(r.reserved_nano for r in records if r.kind == "model")
        print(f"| {name} | {len(server.billed)} | ${billed / 1e9:.6f} | "
              f"${usage.cost_nano / 1e9:.6f} | ${bound / 1e9:.6f} | "
              f"${usage.reserved_nano / 1e9:.6f} | {what} |")


def stream_all(model: ChatOpenAI, config: Any) -> str:
    chunks = 0
    try:
        for _ in model.stream("hi", config):
            chunks += 1
    except OutputCapExceeded as exc:
        return f"stopped at {exc.spent:,} tokens ({chunks} chunks)"
    return f"not stopped ({chunks} chunks)"


def calls_until_refused(call: Callable[[], Any], n: int = 6) -> str:
    answered = 0
    for _ in range(n):
        try:
            call()
        except BudgetExceeded:
            return f"{answered} answered, then refused"
        answered += 1
    return f"{answered} answered"


def main() -> None:
    logging.disable(logging.WARNING)
    print("| path | requests billed | billed | charged | bound (reserved) | held after | "
          "what happened |")
    print("|---|---|---|---|---|---|---|")
    cap1 = lambda: Limits(max_cost_usd=1)  # noqa: E731

    run("Responses API stream of 6,000 tokens, 4,096 reserved", [FakeReply(" a" * 6000)],
        lambda s, c: stream_all(chat(s, use_responses_api=True), c), cap1, chunk_chars=40)
    run("chat completions `output_version=\"v1\"`, 6,000 tokens", [FakeReply(" a" * 6000)],
        lambda s, c: stream_all(chat(s, output_version="v1"), c), cap1, chunk_chars=40)
    run("Responses API reasoning summary of 6,000 tokens",
        [FakeReply(" ok", reasoning_summary=" think" * 6000)],
        lambda s, c: stream_all(chat(s, use_responses_api=True), c), cap1, chunk_chars=40)

    def cut(server: FakeOpenAIServer, config: Any) -> str:
        stream = chat(server, use_responses_api=True, max_tokens=3000).stream("hi", config)
        for i, _ in enumerate(stream):
            if i == 19:
                stream.close()
                break
        return "closed after 20 chunks"

    run("Responses API stream closed after 20 chunks", [FakeReply(" word" * 2000)], cut, cap1,
        chunk_chars=25)
    run("`deepseek-chat`, 400 one-token chunks, `max_tokens=400`", [FakeReply(" a" * 400)],
        lambda s, c: stream_all(chat(s, model="deepseek-chat", max_tokens=400), c), cap1,
        chunk_chars=2)

    def reasoning(server: FakeOpenAIServer, config: Any) -> str:
        llm = chat(server, model="o3-mini", max_tokens=4000)
        return calls_until_refused(lambda: list(llm.stream("think", config)))

    run("`o3-mini` streamed without usage, 3,000 hidden reasoning tokens, cap $0.05",
        [FakeReply("The answer is 42.", reasoning_tokens=3000)], reasoning,
        lambda: Limits(max_cost_usd="0.05"))

    deployment = [FakeReply("x", prompt_tokens=100, completion_tokens=1000,
                            model="gpt-4o-2024-08-06")]

    def deploy(server: FakeOpenAIServer, config: Any) -> str:
        llm = chat(server, model="prod-gpt4o-deployment", max_tokens=1000)
        return calls_until_refused(lambda: llm.invoke("hi", config), 10)

    run("deployment name, `unknown_price=\"allow\"`, cap $0.03", deployment, deploy,
        lambda: Limits(max_cost_usd="0.03", unknown_price="allow"))
    run("deployment name, `unknown_price={stated price}`, cap $0.03", deployment, deploy,
        lambda: Limits(max_cost_usd="0.03", unknown_price=STATED_PRICE))

    def fallbacks(server: FakeOpenAIServer, config: Any) -> str:
        prompt = ChatPromptTemplate.from_messages([("user", "{q}")])
        chain = (prompt | chat(server, max_tokens=4000)).with_fallbacks(
            [prompt | chat(server, model="gpt-4o-mini", max_tokens=10)])
        with contextlib.suppress(BudgetExceeded):
            return f"answered {chain.invoke({'q': 'hi'}, config).content!r}"
        return "BudgetExceeded raised"

    run("`(prompt | strong).with_fallbacks([prompt | cheap])`, cap $0.01",
        ["cheap answer"], fallbacks, lambda: Limits(max_cost_usd="0.01"))


if __name__ == "__main__":
    main()
