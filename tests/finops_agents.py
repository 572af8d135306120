"""Populate usage stores with real guarded agent runs (create_agent + ScriptedChatModel)."""

from __future__ import annotations

from dataclasses import dataclass, field

from langchain.agents import create_agent
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.tools import tool

from agent_guard import Guard, GuardCallbackHandler, Limits
from agent_guard.engine.records import CallRecord
from agent_guard.finops import UsageStore
from agent_guard.testing import ScriptedChatModel


@tool
def lookup(order: str) -> str:
    """Look an order up."""
    return f"order {order}: shipped on Monday, arriving Thursday " * 5


def _agent_script(steps: int):
    def respond(messages: list[BaseMessage]) -> AIMessage:
        n = sum(isinstance(m, AIMessage) for m in messages)
        if n >= steps:
            return AIMessage(content="Your order arrives on Thursday.")
        return AIMessage(content="Let me check.", tool_calls=[
            {"name": "lookup", "args": {"order": f"A{1000 + n}"}, "id": f"call_{n}"}])
    return respond


@dataclass
class Runs:
    records: list[CallRecord] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)


# (session, team, feature, user, model, tool steps)
SESSIONS = (
    ("t-1", "acme", "support", "jane", "gpt-4o", 3),
    ("t-2", "acme", "search", "joe", "gpt-4o-mini", 2),
    ("t-3", "globex", "support", "ann", "gpt-4o", 1),
)


def run_agents(guard: Guard, store: UsageStore) -> Runs:
    """Three sessions of a tool-using agent, each on its own team/feature/user/model."""
    runs = Runs()
    store.attach(guard)
    guard.add_record_hook(runs.records.append)
    for session, team, feature, user, model, steps in SESSIONS:
        llm = ScriptedChatModel(model_name=model, respond=_agent_script(steps), max_tokens=256,
                                cached_fraction=0.5)
        agent = create_agent(llm, [lookup], system_prompt="You are a support agent. " * 20)
        agent.invoke(
            {"messages": [("user", "Where is my order?")]},
            config={"callbacks": [GuardCallbackHandler(guard)],
                    "configurable": {"thread_id": session},
                    "metadata": {"team": team, "feature": feature, "user": user}},
        )
        runs.sessions.append(session)
    return runs


def big_limits() -> Limits:
    return Limits(max_cost_usd=100, max_tool_calls=100)
