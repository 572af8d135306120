"""LangChain adapters: the callback handler (and, later, the agent middleware)."""

from .callback import GuardCallbackHandler, OutputCapExceeded, session_from_metadata

__all__ = ["GuardCallbackHandler", "OutputCapExceeded", "session_from_metadata"]
