"""One tool-using turn, scripted: the model asks ``lookup`` about Paris, then answers."""

from __future__ import annotations

from langchain_core.tools import tool

from agent_guard.testing import FakeReply

QUESTION = "How many people live in Paris?"


@tool
def lookup(city: str) -> str:
    """Look a city up."""
    return f"{city}: 2M people"


def replies(call_tokens: int | None = 11, answer_tokens: int | None = 9,
            call_id: str | None = None) -> list[FakeReply]:
    """The provider's two answers: the tool call, then the final answer."""
    call: dict = {"name": "lookup", "arguments": {"city": "Paris"}}
    if call_id is not None:
        call["id"] = call_id
    return [FakeReply(tool_calls=[call], completion_tokens=call_tokens),
            FakeReply("Paris has 2M people.", completion_tokens=answer_tokens)]
