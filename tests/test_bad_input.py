"""Bad input and unavailable backends: a clear error, nothing lost, nothing spent."""

from __future__ import annotations

import socket

import pytest
from langchain_core.messages import AIMessage

from agent_guard import (
    Guard,
    GuardCallbackHandler,
    LedgerUnavailable,
    Limits,
    ModelCall,
    Usage,
)
from agent_guard.testing import ScriptedChatModel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_redis_that_is_not_there_fails_closed_with_a_redacted_url() -> None:
    pytest.importorskip("redis")
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    guard = Guard(Limits(max_cost_usd=1), ledger=url)
    with pytest.raises(LedgerUnavailable) as info:
        guard.before_model_call(ModelCall(session="s", model="gpt-4o", input_tokens=10))
    message = str(info.value)
    assert "s3cret" not in message and ":***@127.0.0.1" in message
    assert "call was refused" in message


def test_an_unusable_sqlite_path_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(LedgerUnavailable, match="does not exist"):
        Guard(Limits(), ledger=f"sqlite:///{tmp_path / 'missing' / 'dir' / 'guard.db'}")


@pytest.mark.parametrize("bad", [
    {"input_tokens": -5, "output_tokens": 3, "total_tokens": -2},
    {"input_tokens": 10, "output_tokens": 3, "total_tokens": 13,
     "output_token_details": {"reasoning": 9}},
    {"input_tokens": 10, "output_tokens": 3, "total_tokens": 13,
     "input_token_details": {"cache_read": 50}},
])
def test_malformed_usage_is_replaced_by_a_count_never_zero(bad, caplog) -> None:
    records = []
    guard = Guard(Limits(max_cost_usd=1), on_record=[records.append])
    reply = AIMessage.model_construct(content="an answer of a few tokens", usage_metadata=bad,
                                      tool_calls=[], invalid_tool_calls=[],
                                      response_metadata={}, additional_kwargs={})
    llm = ScriptedChatModel(model_name="gpt-4o", responses=[reply])
    llm.invoke("question", config={"callbacks": [GuardCallbackHandler(guard)]})
    [record] = records
    assert record.usage_estimated and record.cost_nano > 0
    assert record.usage.output_tokens >= 5
    assert "unreadable usage" in caplog.text
    assert guard.usage("default").reserved_nano == 0


def test_usage_values_are_validated() -> None:
    from agent_guard import MalformedUsage

    with pytest.raises(MalformedUsage):
        Usage(input_tokens=-1)
    with pytest.raises(MalformedUsage):
        Usage(input_tokens=1, output_tokens=1, reasoning_tokens=2)
