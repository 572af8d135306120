"""Offline test doubles: a local OpenAI-compatible server and a scripted chat model."""

from .openai_server import FakeOpenAIServer, FakeReply
from .scripted_model import ScriptedChatModel

__all__ = ["FakeOpenAIServer", "FakeReply", "ScriptedChatModel"]
