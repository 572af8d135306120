"""Offline test doubles for guarded agents: no key, no network.

- :class:`FakeOpenAIServer` with :class:`FakeReply`: a local OpenAI-compatible
  chat-completions server (JSON and SSE) to point the real ``ChatOpenAI`` at,
  so the provider's own request and parsing code runs.
- :class:`ScriptedChatModel`: an in-process ``BaseChatModel`` that answers from a
  script with realistic ``usage_metadata``, model name and provider.

    from agent_guard.testing import FakeOpenAIServer, FakeReply, ScriptedChatModel

    with FakeOpenAIServer([FakeReply("hi", prompt_tokens=12)]) as server:
        ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="test").invoke("hello")

    model = ScriptedChatModel(model_name="gpt-4o", responses=["The answer is 42."])
"""

from .openai_server import FakeOpenAIServer, FakeReply, ReplyScript
from .scripted_model import ScriptedChatModel

__all__ = ["FakeOpenAIServer", "FakeReply", "ReplyScript", "ScriptedChatModel"]
