"""agent-guard: FinOps guardrails for LangChain and LangGraph agents."""
