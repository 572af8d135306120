"""LangGraph adapters: guarded_graph() and the budget gate."""

from .graph import GuardedStateGraph, budget_gate, guarded_graph, session_of

__all__ = ["GuardedStateGraph", "budget_gate", "guarded_graph", "session_of"]
