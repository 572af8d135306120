"""Send a guarded agent run to Jaeger v2 (or any OTLP/HTTP collector that takes traces).

    docker compose -f examples/jaeger/docker-compose.yml up -d
    python examples/jaeger/guarded_run.py            # then open http://localhost:16686

``AGENT_GUARD_OTLP`` names the collector (default ``http://localhost:4318``); the
standard ``OTEL_*`` variables (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``...)
apply as well. Jaeger takes traces only, so no metrics are sent. Runs offline on
agent-guard's scripted model. Exits 1, saying why, when the spans did not get there.
"""

from __future__ import annotations

import os
import sys

from langchain.agents import create_agent
from langchain_core.messages import AIMessage
from langchain_core.tools import tool

from agent_guard import BudgetExceeded, Guard, GuardCallbackHandler, Limits
from agent_guard.telemetry import configure_otlp
from agent_guard.testing import ScriptedChatModel


@tool
def lookup(order: str) -> str:
    """Look up an order."""
    return f"order {order}: delayed at the depot"


def main() -> int:
    endpoint = os.environ.get("AGENT_GUARD_OTLP", "http://localhost:4318")
    telemetry = configure_otlp(endpoint, service_name="agent-guard-demo", metrics=False)
    guard = Guard(Limits(max_cost_usd="0.02"), on_threshold=[telemetry.on_threshold])
    llm = ScriptedChatModel(model_name="gpt-4o", max_tokens=256, respond=lambda m: AIMessage(
        "Checking again.", tool_calls=[{"name": "lookup", "args": {"order": "A1001"},
                                        "id": f"c{len(m)}"}]))
    agent = create_agent(llm, [lookup], name="support", system_prompt="Be thorough. " * 100)
    try:
        agent.invoke({"messages": [("user", "Where is A1001?")]},
                     config={"callbacks": [GuardCallbackHandler(guard, telemetry=telemetry)],
                             "metadata": {"user_id": "ann", "team": "support",
                                          "feature": "order-status"},
                             "configurable": {"thread_id": "ticket-42"}})
    except BudgetExceeded as exc:
        print(f"stopped: {exc}")
    if not telemetry.flush():
        status = telemetry.export_status
        print(f"the spans did not reach {endpoint}: "
              f"{status.last_error if status else 'export failed'}", file=sys.stderr)
        return 1
    print(f"spans sent to {endpoint}; open http://localhost:16686 and pick service "
          "agent-guard-demo (search tags: session.id=ticket-42, user.id=ann)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
