"""A guarded three-node graph with a SQLite checkpointer, run in a child process that the
crash test kills mid-call (``python -m tests.graph_worker <base_url> <dir>``)."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AnyMessage
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from agent_guard import Guard, GuardCallbackHandler, Limits, guarded_graph

THREAD = "crash-1"
LEASE = 1.0


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def build(base_url: str, folder: Path) -> tuple[Any, Guard]:
    guard = Guard(Limits(max_cost_usd=1, lease_seconds=LEASE),
                  ledger=f"sqlite:///{folder / 'ledger.db'}")
    llm = ChatOpenAI(model="gpt-4o", base_url=base_url, api_key="test-key", max_tokens=50,
                     max_retries=0, timeout=120)

    def node(state: State) -> dict[str, Any]:
        return {"messages": [llm.invoke(state["messages"])]}

    builder = StateGraph(State)
    for name in ("a", "b", "c"):
        builder.add_node(name, node)
    builder.add_edge(START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("b", "c")
    builder.add_edge("c", END)
    saver = SqliteSaver(sqlite3.connect(folder / "checkpoints.db", check_same_thread=False))
    return guarded_graph(builder, guard=guard, checkpointer=saver), guard


def config(guard: Guard) -> dict[str, Any]:
    return {"configurable": {"thread_id": THREAD},
            "callbacks": [GuardCallbackHandler(guard)]}


if __name__ == "__main__":
    graph, guard = build(sys.argv[1], Path(sys.argv[2]))
    # "sync": each step's checkpoint is written before the next step starts. With LangGraph's
    # default ("async") a kill during "c" can come before "b"'s checkpoint is on disk, and the
    # resume then runs "b" again: a fifth request, paid and charged, which is right but not
    # what this test measures.
    graph.invoke({"messages": [("user", "Plan, patch and test the fix.")]}, config(guard),
                 durability="sync")
