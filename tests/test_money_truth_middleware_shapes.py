"""Money truth through GuardMiddleware in the shapes the callback's suites drive with
batches, parallel runnables, fan-outs and fallbacks: each shape's middleware
counterpart, sync and async, on a memory and a Redis ledger, with a roomy cap and with
a cap that fits two calls' worst cases of four.

- ``batch``: one agent run per input with ``agent.batch`` / ``abatch``;
- ``parallel``: four agents in a ``RunnableParallel``;
- ``fan_out``: a ``create_agent`` inside each of four parallel nodes of a graph;
- ``fallbacks_model``: the agent's model is ``primary.with_fallbacks([cheaper])``;
- ``fallback_middleware``: ``ModelFallbackMiddleware`` inside ``GuardMiddleware``.

The primary model's requests fail (HTTP 500, not billed) in the two fallback shapes.
Every row checks what ``Books.settle_check`` checks for the callback (nothing reserved
once the run is over, spent <= cap, charged >= billed, charged <= what the calls
reserved) and, when no run was cancelled, charged == billed (every answer reports its
usage). A refused branch of ``parallel`` or ``fan_out`` fails the whole run and its
siblings' calls are cancelled in flight: they are charged their worst case, as the
callback charges them (``test_a_fan_out_whose_sibling_raises``). Multi-prompt
``generate`` has no middleware counterpart (see docs/adapters.md).
"""

from __future__ import annotations

import asyncio
import operator
from typing import Annotated, Any, TypedDict

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import ModelFallbackMiddleware
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableParallel
from langgraph.graph import END, START, StateGraph

from agent_guard import BudgetExceeded, GuardMiddleware
from agent_guard.ledger import Ledger
from agent_guard.testing import FakeOpenAIServer, FakeReply

from . import test_money_truth as truth
from .test_money_truth import ANSWER, SESSION, Books, chat

pytestmark = pytest.mark.slow

ledger = truth.ledger
quick_sdk_retries = truth.quick_sdk_retries
warm = truth.warm

INPUTS = {"messages": [HumanMessage("hi")]}
WIDTH = 4  # agent runs per shape
# two worst cases of gpt-4o at max_tokens=100 fit, not three (as the callback's batch row)
CAPS = {"roomy": 1.0, "tight": 0.0025}


def fails_primary(body: dict[str, Any]) -> FakeReply:
    return FakeReply(status=500) if body.get("model") == "gpt-4o" else ANSWER


def agent(server: FakeOpenAIServer, books: Books, shape: str) -> Any:
    guard = GuardMiddleware(books.guard, session_id=SESSION)
    if shape == "fallbacks_model":
        model: Any = chat(server).with_fallbacks([chat(server, model="gpt-4o-mini")])
        return create_agent(model, tools=[], middleware=[guard])
    if shape == "fallback_middleware":
        return create_agent(chat(server), tools=[], middleware=[
            guard, ModelFallbackMiddleware(chat(server, model="gpt-4o-mini"))])
    return create_agent(chat(server), tools=[], middleware=[guard])


class Fan(TypedDict, total=False):
    answers: Annotated[list[str], operator.add]


def fan_out(run_agent: Any) -> Any:
    """A graph whose WIDTH parallel nodes each run the agent."""
    graph = StateGraph(Fan)

    def node(state: Fan) -> Fan:
        out = run_agent.invoke(INPUTS)
        return {"answers": [out["messages"][-1].content]}

    async def anode(state: Fan) -> Fan:
        out = await run_agent.ainvoke(INPUTS)
        return {"answers": [out["messages"][-1].content]}

    from langgraph._internal._runnable import RunnableCallable

    for i in range(WIDTH):
        graph.add_node(f"branch_{i}", RunnableCallable(node, anode))
        graph.add_edge(START, f"branch_{i}")
        graph.add_edge(f"branch_{i}", END)
    return graph.compile()


def drive(run_agent: Any, shape: str, mode: str) -> list[Any]:
    """Run the shape; what each agent run gave (its refusal, for a refused one)."""
    if shape in ("batch", "fallbacks_model", "fallback_middleware"):
        inputs = [INPUTS] * (WIDTH if shape == "batch" else 1)
        if mode == "sync":
            return run_agent.batch(inputs, return_exceptions=True)
        return asyncio.run(run_agent.abatch(inputs, return_exceptions=True))
    runnable = (RunnableParallel({f"a{i}": run_agent for i in range(WIDTH)})
                if shape == "parallel" else fan_out(run_agent))
    try:
        if mode == "sync":
            return [runnable.invoke(INPUTS if shape == "parallel" else {})]
        return [asyncio.run(runnable.ainvoke(INPUTS if shape == "parallel" else {}))]
    except BudgetExceeded as exc:  # a refused branch fails the whole run
        return [exc]


SHAPES = ["batch", "parallel", "fan_out", "fallbacks_model", "fallback_middleware"]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("cap", sorted(CAPS))
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_through_the_middleware(ledger: Ledger, shape: str, cap: str,
                                       mode: str) -> None:
    books = Books(ledger, cap_usd=CAPS[cap])
    fallback = shape.startswith("fallback")
    with FakeOpenAIServer(fails_primary if fallback else [ANSWER]) as server:
        out = drive(agent(server, books, shape), shape, mode)
        charged = books.settle_check(server)
    refused = [o for o in out if isinstance(o, BudgetExceeded)]
    if cap == "roomy" or shape == "batch" or fallback:
        # nothing was cancelled: every answer was read
        assert charged == server.billed_nano(books.guard.prices)
    answered = [r for r in books.model_records() if r.outcome == "ok"]
    if fallback:
        # the primary's failed request and the fallback's answer, each on its own price
        assert [r.model[:11] for r in answered] == ["gpt-4o-mini"] and not refused
        assert len(server.requests) == 2 and len(server.billed) == 1
    elif cap == "roomy":
        assert not refused and len(answered) == len(server.billed) == WIDTH
    else:  # a batch's refused inputs leave the others be; a refused branch ends the run
        assert refused and (2 if shape == "batch" else 0) <= len(server.billed) < WIDTH
