"""LangChain adapters: the callback handler and the create_agent middleware."""

from ..errors import link_graph_bubble_up
from .call import priced_tool
from .callback import GuardCallbackHandler, OutputCapExceeded, session_from_metadata
from .middleware import GuardMiddleware

__all__ = ["GuardCallbackHandler", "GuardMiddleware", "OutputCapExceeded", "priced_tool",
           "session_from_metadata"]

link_graph_bubble_up()  # LangGraph is loaded now: a GuardError is a GraphBubbleUp
