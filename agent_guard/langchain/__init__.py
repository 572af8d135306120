"""LangChain adapters: the callback handler and the create_agent middleware."""

from .call import priced_tool
from .callback import GuardCallbackHandler, OutputCapExceeded, session_from_metadata
from .middleware import GuardMiddleware

__all__ = ["GuardCallbackHandler", "GuardMiddleware", "OutputCapExceeded", "priced_tool",
           "session_from_metadata"]
