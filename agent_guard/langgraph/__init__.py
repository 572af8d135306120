"""LangGraph adapters: guarded_graph() and the budget gate."""

from ..errors import link_graph_bubble_up
from .graph import GuardedStateGraph, budget_gate, guarded_graph, session_of

__all__ = ["GuardedStateGraph", "budget_gate", "guarded_graph", "session_of"]

link_graph_bubble_up()  # LangGraph is loaded now: a GuardError is a GraphBubbleUp
