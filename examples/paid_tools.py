"""A paid search tool in the dollar cap: an agent that keeps searching ($0.01 a search)
stops at its $0.10 cap, on the callback, middleware and guarded_graph paths. Offline:
the real ChatOpenAI against agent-guard's local fake OpenAI server.

    python examples/paid_tools.py
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from langchain.agents import create_agent
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from agent_guard import (
    BudgetExceeded,
    Guard,
    GuardCallbackHandler,
    GuardMiddleware,
    Limits,
    guarded_graph,
)
from agent_guard.langchain import priced_tool
from agent_guard.pricing import ToolPrice
from agent_guard.testing import FakeOpenAIServer, FakeReply

SESSION = "research"


def main() -> None:
    print(f"{'path':<14} {'mode':<6} {'searches':>8} {'model calls':>11} "
          f"{'models $':>10} {'tools $':>8} {'spent $':>9} {'cap $':>6}")
    for path in ("callback", "middleware", "guarded_graph"):
        for mode in ("sync", "async"):
            run(path, mode)


def run(path: str, mode: str) -> None:
    searches = itertools.count(1)

    @tool
    def web_search(query: str) -> str:
        """Search the web."""
        next(searches)
        return f'["a result for {query}"]'

    priced_tool(web_search, ToolPrice("0.01", service="Search API"))
    asks = itertools.count()

    def reply(body: dict[str, Any]) -> FakeReply:  # always one more search
        i = next(asks)
        return FakeReply("", tool_calls=[{"name": "web_search", "id": f"call_{i}",
                                          "arguments": {"query": f"q{i}"}}])

    records: list[Any] = []
    guard = Guard(Limits(max_cost_usd="0.10"), on_record=[records.append])
    with FakeOpenAIServer(reply) as server:
        model = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="test",
                           max_tokens=40, max_retries=0)
        config: dict[str, Any] = {"recursion_limit": 200}
        if path == "callback":
            agent: Any = create_agent(model, [web_search])
            config["callbacks"] = [GuardCallbackHandler(guard, session_id=SESSION)]
        elif path == "middleware":
            agent = create_agent(model, [web_search], middleware=[
                GuardMiddleware(guard, session_id=SESSION, on_exceed="end")])
        else:
            builder = StateGraph(MessagesState)
            bound = model.bind_tools([web_search])
            builder.add_node("agent", lambda s: {"messages": [bound.invoke(s["messages"])]})
            builder.add_node("tools", ToolNode([web_search]))
            builder.add_edge(START, "agent")
            builder.add_conditional_edges("agent", tools_condition)
            builder.add_edge("tools", "agent")
            agent = guarded_graph(builder, guard=guard, session_id=SESSION, on_exceed="end")
        inputs = {"messages": [("user", "research this forever")]}
        try:
            if mode == "sync":
                agent.invoke(inputs, config=config)
            else:
                asyncio.run(agent.ainvoke(inputs, config=config))
        except BudgetExceeded:
            pass  # the callback raises the refusal; the others end the run
    usage = guard.usage(SESSION)
    tools = sum(r.cost_nano for r in records if r.kind == "tool")
    print(f"{path:<14} {mode:<6} {next(searches) - 1:>8} {usage.model_calls:>11} "
          f"{(usage.cost_nano - tools) / 1e9:>10.6f} {tools / 1e9:>8.2f} "
          f"{usage.cost_usd:>9.6f} {usage.cap_usd:>6.2f}")


if __name__ == "__main__":
    main()
