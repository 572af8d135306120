"""Offline test doubles for guarded agents: no key, no network.

- :class:`FakeOpenAIServer` with :class:`FakeReply`: a local OpenAI-compatible
  chat-completions server (JSON and SSE) to point the real ``ChatOpenAI`` at,
  so the provider's own request and parsing code runs. ``server.billed`` records
  what a real provider would bill (hidden reasoning and answers the client gave
  up on included); ``server.billed_nano(prices)`` prices it.
- :class:`FakeAnthropicServer` with :class:`AnthropicReply`: the same for Anthropic's
  Messages API and the real ``ChatAnthropic``; ``server.billed`` is what Anthropic would
  bill (cache writes by duration, thinking, the tool-use system prompt, the long-context
  tier) and ``server.billed_nano()`` prices it at Anthropic's list prices.
- :class:`ScriptedChatModel`: an in-process ``BaseChatModel`` that answers from a
  script with realistic ``usage_metadata``, model name and provider.

    from agent_guard.testing import FakeOpenAIServer, FakeReply, ScriptedChatModel

    with FakeOpenAIServer([FakeReply("hi", prompt_tokens=12)]) as server:
        ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="test").invoke("hello")

    model = ScriptedChatModel(model_name="gpt-4o", responses=["The answer is 42."])
"""

from .anthropic_server import AnthropicBill, AnthropicReply, FakeAnthropicServer
from .openai_server import BilledRequest, FakeOpenAIServer, FakeReply, ReplyScript
from .scripted_model import ScriptedChatModel

__all__ = ["AnthropicBill", "AnthropicReply", "BilledRequest", "FakeAnthropicServer",
           "FakeOpenAIServer", "FakeReply", "ReplyScript", "ScriptedChatModel"]
