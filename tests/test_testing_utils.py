"""The offline test doubles behave like the real thing where the guard looks."""

from __future__ import annotations

import openai
import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from agent_guard.testing import FakeOpenAIServer, FakeReply, ScriptedChatModel


def chat(server: FakeOpenAIServer, **kw) -> ChatOpenAI:
    return ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="test", max_retries=0,
                      **kw)


def test_json_reply_carries_usage_details_and_model_name() -> None:
    reply = FakeReply("hello", prompt_tokens=50, completion_tokens=9, cached_tokens=32,
                      reasoning_tokens=4)
    with FakeOpenAIServer([reply]) as server:
        msg = chat(server).invoke("hi")
    assert msg.content == "hello"
    assert msg.usage_metadata["input_tokens"] == 50
    assert msg.usage_metadata["output_tokens"] == 9
    assert msg.usage_metadata["input_token_details"]["cache_read"] == 32
    assert msg.usage_metadata["output_token_details"]["reasoning"] == 4
    assert msg.response_metadata["model_name"] == "gpt-4o-2024-08-06"
    assert server.requests[0]["messages"] == [{"role": "user", "content": "hi"}]


def test_computed_counts_follow_the_request() -> None:
    with FakeOpenAIServer([FakeReply("a fairly long answer " * 5)]) as server:
        short = chat(server).invoke("hi").usage_metadata
        long = chat(server).invoke("hi " * 200).usage_metadata
    assert long["input_tokens"] > short["input_tokens"] + 150
    assert short["output_tokens"] >= 20


def test_stream_usage_only_when_asked() -> None:
    with FakeOpenAIServer([FakeReply("one two three four", prompt_tokens=7,
                                     completion_tokens=4)]) as server:
        merged = None
        for chunk in chat(server, stream_usage=True).stream("hi"):
            merged = chunk if merged is None else merged + chunk
        assert merged is not None and merged.content == "one two three four"
        assert merged.usage_metadata["input_tokens"] == 7
        merged = None
        for chunk in chat(server).stream("hi"):
            merged = chunk if merged is None else merged + chunk
        assert merged is not None and merged.usage_metadata is None


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_parse_in_json_and_sse(stream: bool) -> None:
    reply = FakeReply(tool_calls=[{"name": "lookup", "arguments": {"id": "42"}, "id": "c1"}])
    with FakeOpenAIServer([reply]) as server:
        llm = chat(server).bind_tools([{"type": "function", "function": {
            "name": "lookup", "parameters": {"type": "object", "properties": {
                "id": {"type": "string"}}}}}])
        if stream:
            msg = None
            for chunk in llm.stream("find 42"):
                msg = chunk if msg is None else msg + chunk
        else:
            msg = llm.invoke("find 42")
    assert msg is not None
    assert [(tc["name"], tc["args"], tc["id"]) for tc in msg.tool_calls] == [
        ("lookup", {"id": "42"}, "c1")]


def test_errors_surface_as_openai_errors() -> None:
    with FakeOpenAIServer([FakeReply(status=429), FakeReply(status=500)]) as server:
        with pytest.raises(openai.RateLimitError):
            chat(server).invoke("hi")
        with pytest.raises(openai.InternalServerError):
            chat(server).invoke("hi")
        assert server.request_count == 2


async def test_async_paths() -> None:
    with FakeOpenAIServer([FakeReply("async ok", prompt_tokens=3, completion_tokens=2)]) as srv:
        msg = await chat(srv).ainvoke("hi")
        chunks = [c async for c in chat(srv, stream_usage=True).astream("hi")]
    assert msg.content == "async ok"
    assert "".join(str(c.content) for c in chunks) == "async ok"


@tool
def double(x: int) -> int:
    """Double a number."""
    return 2 * x


def test_scripted_model_drives_create_agent() -> None:
    model = ScriptedChatModel(model_name="gpt-4o", responses=[
        AIMessage("", tool_calls=[{"name": "double", "args": {"x": 21}, "id": "c1"}]),
        "The answer is 42.",
    ])
    result = create_agent(model, [double]).invoke({"messages": [("user", "double 21")]})
    messages = result["messages"]
    assert messages[-1].content == "The answer is 42."
    assert messages[2].content == "42"  # the tool really ran
    for m in messages:
        if isinstance(m, AIMessage):
            assert m.usage_metadata["input_tokens"] > 0
            assert m.response_metadata["model_name"] == "gpt-4o"
    assert model.calls == 2


def test_scripted_model_streams_usage_and_tool_calls_on_the_last_chunk() -> None:
    model = ScriptedChatModel(responses=[AIMessage("ok then", tool_calls=[
        {"name": "double", "args": {"x": 1}, "id": "c9"}])])
    chunks = list(model.bind_tools([double]).stream("go"))
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    assert merged.usage_metadata is not None and merged.usage_metadata["output_tokens"] > 0
    assert merged.tool_calls[0]["args"] == {"x": 1}
    assert all(c.usage_metadata is None for c in chunks[:-1])


def test_scripted_model_honours_max_tokens() -> None:
    model = ScriptedChatModel(responses=["word " * 500], max_tokens=10)
    msg = model.invoke("talk")
    assert msg.usage_metadata["output_tokens"] == 10
    assert msg.response_metadata["finish_reason"] == "length"
