"""Send a guarded agent run to Jaeger (or any OTLP/HTTP collector).

    docker compose -f examples/jaeger/docker-compose.yml up -d
    python examples/jaeger/guarded_run.py            # then open http://localhost:16686

OTEL_EXPORTER_OTLP_ENDPOINT and the other OTEL_* variables are honoured when no
endpoint is given. Runs offline on agent-guard's scripted model.
"""

from __future__ import annotations

import os

from langchain.agents import create_agent
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from opentelemetry import trace

from agent_guard import BudgetExceeded, Guard, GuardCallbackHandler, Limits
from agent_guard.telemetry import configure_otlp
from agent_guard.testing import ScriptedChatModel


@tool
def lookup(order: str) -> str:
    """Look up an order."""
    return f"order {order}: delayed at the depot"


def main() -> None:
    telemetry = configure_otlp(os.environ.get("AGENT_GUARD_OTLP", "http://localhost:4318"),
                               service_name="agent-guard-demo")
    guard = Guard(Limits(max_cost_usd="0.02"), on_threshold=[telemetry.on_threshold])
    llm = ScriptedChatModel(model_name="gpt-4o", max_tokens=256, respond=lambda m: AIMessage(
        "Checking again.", tool_calls=[{"name": "lookup", "args": {"order": "A1001"},
                                        "id": f"c{len(m)}"}]))
    agent = create_agent(llm, [lookup], name="support", system_prompt="Be thorough. " * 100)
    try:
        agent.invoke({"messages": [("user", "Where is A1001?")]},
                     config={"callbacks": [GuardCallbackHandler(guard, telemetry=telemetry)],
                             "configurable": {"thread_id": "ticket-42"}})
    except BudgetExceeded as exc:
        print(f"stopped: {exc}")
    trace.get_tracer_provider().force_flush()  # type: ignore[attr-defined]
    print("spans sent; open http://localhost:16686 and pick service agent-guard-demo")


if __name__ == "__main__":
    main()
