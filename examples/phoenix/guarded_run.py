"""A guarded agent in Arize Phoenix: the trace, the session, the user and the cost.

    docker compose -f examples/phoenix/docker-compose.yml up -d   # or: phoenix serve
    python examples/phoenix/guarded_run.py        # then open http://localhost:6006

``PHOENIX_URL`` names Phoenix (default ``http://localhost:6006``). The run uses a
custom-priced model (``acme-support-1``, priced in the guard's price book only), so the
script first gives Phoenix the guard's prices (``register_prices``): Phoenix computes
costs itself and shows ``None`` for a model it has no price for. It exports with
``configure_otlp(project=..., metrics=False)`` (Phoenix takes traces only), then reads
Phoenix's own cost of the session back and prints it beside the ledger's. Runs offline
on agent-guard's scripted model.
"""

from __future__ import annotations

import os
import sys
import time

import httpx
from langchain.agents import create_agent
from langchain_core.messages import AIMessage
from langchain_core.tools import tool

from agent_guard import Guard, GuardCallbackHandler, GuardError, Limits
from agent_guard.pricing import PriceBook
from agent_guard.telemetry import configure_otlp
from agent_guard.telemetry.phoenix import register_prices
from agent_guard.testing import ScriptedChatModel

MODEL = "acme-support-1"
PROJECT = os.environ.get("PHOENIX_PROJECT_NAME", "agent-guard-demo")
SESSION = "ticket-42"


@tool
def lookup(order: str) -> str:
    """Look up an order."""
    return f"order {order}: delayed at the depot"


def phoenix_session_cost(url: str) -> float | None:
    query = """{ projects { edges { node { name sessions(first: 100) { edges { node {
        sessionId costSummary { total { cost } } } } } } } } }"""
    data = httpx.post(url + "/graphql", json={"query": query}, timeout=10).json()["data"]
    for project in data["projects"]["edges"]:
        if project["node"]["name"] != PROJECT:
            continue
        for session in project["node"]["sessions"]["edges"]:
            if session["node"]["sessionId"] == SESSION:
                return session["node"]["costSummary"]["total"]["cost"]
    return None


def main() -> int:
    url = os.environ.get("PHOENIX_URL", "http://localhost:6006").rstrip("/")
    prices = PriceBook.default().with_overrides({MODEL: {
        "input_cost_per_token": 2e-06, "output_cost_per_token": 8e-06,
        "cache_read_input_token_cost": 5e-07}})
    try:
        register_prices(url, prices, [MODEL])
    except httpx.HTTPError as exc:
        print(f"Phoenix does not answer at {url} ({exc}); start it first", file=sys.stderr)
        return 1
    time.sleep(6)  # Phoenix reloads model prices every 5 s and prices spans on arrival

    telemetry = configure_otlp(url, project=PROJECT, metrics=False,
                               service_name="agent-guard-demo")
    guard = Guard(Limits(max_model_calls=4), prices=prices)
    llm = ScriptedChatModel(model_name=MODEL, max_tokens=256, cached_fraction=0.3,
                            respond=lambda m: AIMessage("Checking again.", tool_calls=[
                                {"name": "lookup", "args": {"order": "A1001"},
                                 "id": f"c{len(m)}"}]))
    agent = create_agent(llm, [lookup], name="support", system_prompt="Be thorough. " * 50)
    try:
        agent.invoke({"messages": [("user", "Where is A1001?")]},
                     config={"callbacks": [GuardCallbackHandler(guard, telemetry=telemetry)],
                             "metadata": {"user_id": "ann", "team": "support",
                                          "feature": "order-status"},
                             "configurable": {"thread_id": SESSION}})
    except GuardError as exc:
        print(f"stopped by the guard: {type(exc).__name__}")
    if not telemetry.flush():
        status = telemetry.export_status
        print(f"the spans did not reach Phoenix: {status.last_error if status else '?'}",
              file=sys.stderr)
        return 1
    ledger = guard.usage(SESSION).cost_usd
    shown = None
    for _ in range(40):  # Phoenix ingests spans asynchronously
        shown = phoenix_session_cost(url)
        if shown is not None and abs(shown - float(ledger)) < 1e-9:
            break
        time.sleep(0.25)
    print(f"ledger: ${ledger} for session {SESSION}; Phoenix shows ${shown}")
    print(f"open {url} -> project {PROJECT} -> Sessions -> {SESSION} (user ann, team support)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
