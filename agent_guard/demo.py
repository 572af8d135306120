"""The demo: a runaway support agent, stopped by its dollar cap.

Runs offline: a scripted chat model answers with realistic token usage
(counted with the same tokenizer the guard uses), no key and no network.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, cast

from langchain.agents import create_agent
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.tools import tool
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from .engine.guard import Guard
from .engine.limits import Limits
from .engine.records import CallRecord
from .errors import GuardError
from .langchain.callback import GuardCallbackHandler
from .testing import ScriptedChatModel

__all__ = ["DemoResult", "run_demo"]

SYSTEM_PROMPT = (
    "You are Ada, a meticulous customer-support agent for an online electronics shop. "
    "Always check the order system and the knowledge base before answering. "
    "Quote order numbers exactly. Never promise a refund before checking the policy. "
) * 12  # a realistic, long system prompt (~600 tokens)

_ORDERS = {f"A{1000 + i}": s for i, s in enumerate(
    ["shipped", "delayed at the depot", "returned", "awaiting payment", "lost in transit"])}


@tool
def search_orders(customer: str) -> str:
    """Search the order system for a customer's orders."""
    return "; ".join(f"{k}: {v}" for k, v in _ORDERS.items()) + f" (customer {customer})"


@tool
def read_policy(topic: str) -> str:
    """Read the knowledge-base article on a topic."""
    return (f"Policy on {topic}: refunds within 30 days of delivery; lost parcels are "
            "re-shipped after a carrier investigation of up to 10 working days. ") * 4


def _runaway(messages: list[BaseMessage]) -> AIMessage:
    """Never satisfied: keeps checking orders and policies, like a looping agent."""
    n = sum(isinstance(m, AIMessage) for m in messages)
    if n % 2 == 0:
        call = {"name": "search_orders", "args": {"customer": "jane@example.com"}}
        text = "Let me look up the customer's orders again to be sure."
    else:
        call = {"name": "read_policy", "args": {"topic": f"refunds, case {n}"}}
        text = "I should double-check the refund policy before answering."
    return AIMessage(content=text, tool_calls=[{**call, "id": f"call_{n}"}])


@dataclass
class DemoResult:
    records: list[CallRecord] = field(default_factory=list)
    stopped_by: GuardError | None = None
    total_usd: Decimal = Decimal(0)
    tool_calls: int = 0
    thresholds: list[str] = field(default_factory=list)


def run_demo(
    cap_usd: str = "0.05",
    *,
    ledger: str = "memory://",
    session: str = "ticket-42",
    model: str = "gpt-4o",
    console: Console | None = None,
) -> DemoResult:
    """Run the runaway agent under a cap and print each call's cost as it happens."""
    console = console or Console()
    logging.getLogger("agent_guard").setLevel(logging.ERROR)  # thresholds are shown below
    result = DemoResult()
    guard = Guard(Limits(max_cost_usd=cap_usd, max_tool_calls=100), ledger=ledger,
                  attributes={"team": "support", "feature": "order-status"})
    store = None
    if not ledger.startswith("memory:"):  # keep the records for `agent-guard report`
        from .finops import UsageStore

        store = UsageStore.for_ledger(guard.ledger).attach(guard)
    cap = Decimal(cap_usd)

    table = Table(title=f"agent-guard demo: session {session!r}, cap ${cap_usd}",
                  title_justify="left")
    for name, justify in (("#", "right"), ("model", "left"), ("input", "right"),
                          ("cached", "right"), ("output", "right"), ("cost", "right"),
                          ("session total", "right"), ("left", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]

    def show(record: CallRecord) -> None:
        if record.kind != "model":  # the table shows what costs money
            return
        result.records.append(record)
        spent = sum((r.cost_usd for r in result.records), Decimal(0))
        u = record.usage
        table.add_row(str(len(result.records)), record.model, f"{u.input_tokens:,}",
                      f"{u.cache_read_tokens:,}", f"{u.output_tokens:,}",
                      f"${record.cost_usd:.6f}", f"${spent:.6f}", f"${cap - spent:.6f}")

    guard.add_record_hook(show)
    guard.add_threshold_hook(
        lambda e: result.thresholds.append(f"{e.threshold:.0%} of the cap crossed at call "
                                           f"{len(result.records)}"))
    llm = ScriptedChatModel(model_name=model, respond=_runaway, max_tokens=512,
                            cached_fraction=0.6)
    agent = create_agent(llm, [search_orders, read_policy], system_prompt=SYSTEM_PROMPT)
    handler = GuardCallbackHandler(guard)
    try:
        agent.invoke(
            cast(Any, {"messages": [("user", "Where is my order, and can I get a refund?")]}),
            config={"callbacks": [handler], "configurable": {"thread_id": session}},
        )
    except GuardError as exc:
        result.stopped_by = exc
    usage = guard.usage(session)
    if store is not None:
        store.close()
    result.total_usd = usage.cost_usd
    result.tool_calls = usage.tool_calls
    console.print(table)
    for line in result.thresholds:
        console.print(f"[yellow]soft threshold:[/yellow] {line}")
    if result.stopped_by is not None:
        console.print(Panel(str(result.stopped_by), title="stopped by agent-guard",
                            border_style="red"))
    console.print(
        f"session {session!r}: {usage.model_calls} model calls, {usage.tool_calls} tool calls, "
        f"{usage.input_tokens:,} input tokens ({usage.cached_tokens:,} cached), "
        f"{usage.output_tokens:,} output tokens, spent ${usage.cost_usd:.6f} "
        f"of ${cap_usd} (reserved now: ${usage.reserved_usd:.6f})"
    )
    guard.close()
    return result
