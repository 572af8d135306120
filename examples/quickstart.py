"""Quickstart: cap a tool-using agent at $0.05 per session, offline.

    python examples/quickstart.py

The model is agent-guard's ScriptedChatModel (no key, no network): it keeps
calling tools like a looping agent, with realistic token usage. Swap in
ChatOpenAI(model="gpt-4o", max_tokens=512) and nothing else changes.
"""

from __future__ import annotations

from langchain.agents import create_agent
from langchain_core.messages import AIMessage
from langchain_core.tools import tool

from agent_guard import BudgetExceeded, CallRecord, Guard, GuardCallbackHandler, Limits
from agent_guard.testing import ScriptedChatModel


@tool
def search_orders(customer: str) -> str:
    """Search the order system for a customer's orders."""
    return f"A1000: shipped; A1001: delayed at the depot (customer {customer})"


def keeps_searching(messages):
    n = sum(isinstance(m, AIMessage) for m in messages)
    return AIMessage(content="Let me check again.", tool_calls=[
        {"name": "search_orders", "args": {"customer": "jane@example.com"}, "id": f"c{n}"}])


def show(record: CallRecord) -> None:
    """Print each call the guard accounted: a model call's tokens and cost, a tool call's name."""
    if record.kind == "tool":
        print(f"tool {record.tool}")
    else:
        print(f"call {record.model}: {record.usage.input_tokens} in / "
              f"{record.usage.output_tokens} out -> ${record.cost_usd:.6f}")


def main() -> None:
    guard = Guard(
        limits=Limits(max_cost_usd=0.05, max_tokens=200_000, max_model_calls=40,
                      max_tool_calls=80),
        ledger="memory://",  # or "sqlite:///guard.db", "redis://127.0.0.1:6379/0"
    )
    guard.add_record_hook(show)

    llm = ScriptedChatModel(model_name="gpt-4o", respond=keeps_searching, max_tokens=512)
    agent = create_agent(llm, [search_orders], system_prompt="You are a support agent. " * 50)
    try:
        agent.invoke(
            {"messages": [("user", "Where is my order?")]},
            config={"callbacks": [GuardCallbackHandler(guard)],
                    "configurable": {"thread_id": "ticket-42"}},
        )
    except BudgetExceeded as exc:
        print(f"\nstopped: {exc}\n")
    u = guard.usage("ticket-42")
    print(f"session ticket-42: ${u.cost_usd:.6f} spent, {u.model_calls} model calls, "
          f"{u.tool_calls} tool calls, {u.input_tokens} input / {u.output_tokens} output tokens")


if __name__ == "__main__":
    main()
