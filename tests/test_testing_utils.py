"""The offline test doubles behave like the real thing where the guard looks."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any
from uuid import UUID

import openai
import pytest
from langchain.agents import create_agent
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from agent_guard.testing import FakeOpenAIServer, FakeReply, ScriptedChatModel


def chat(server: FakeOpenAIServer, **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="test", max_retries=0,
                      **kw)


def merge(chunks: Iterable[AIMessageChunk]) -> AIMessageChunk:
    merged: AIMessageChunk | None = None
    for chunk in chunks:
        merged = chunk if merged is None else merged + chunk
    assert merged is not None
    return merged


def usage(message: BaseMessage) -> dict[str, Any]:
    assert isinstance(message, AIMessage) and message.usage_metadata is not None
    return dict(message.usage_metadata)


@tool
def double(x: int) -> int:
    """Double a number."""
    return 2 * x


LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"id": {"type": "string"}}}}}


# -- FakeOpenAIServer ----------------------------------------------------------------------


def test_json_reply_carries_usage_details_and_model_name() -> None:
    reply = FakeReply("hello", prompt_tokens=50, completion_tokens=9, cached_tokens=32,
                      reasoning_tokens=4)
    with FakeOpenAIServer([reply]) as server:
        msg = chat(server).invoke("hi")
    assert msg.content == "hello"
    assert usage(msg)["input_tokens"] == 50 and usage(msg)["output_tokens"] == 9
    assert usage(msg)["total_tokens"] == 59
    assert usage(msg)["input_token_details"]["cache_read"] == 32
    assert usage(msg)["output_token_details"]["reasoning"] == 4
    assert msg.response_metadata["model_name"] == "gpt-4o-2024-08-06"
    assert msg.response_metadata["finish_reason"] == "stop"
    assert msg.response_metadata["system_fingerprint"] == "fp_fake"


def test_response_model_name_is_configurable() -> None:
    with FakeOpenAIServer(["a", FakeReply("b", model="my-model"), "c"],
                          response_model_suffix="-2025-01-01") as server:
        first, second = chat(server).invoke("x"), chat(server).invoke("x")
        dated = ChatOpenAI(model="gpt-4o-2024-11-20", base_url=server.base_url,
                           api_key="test").invoke("x")
    assert first.response_metadata["model_name"] == "gpt-4o-2025-01-01"
    assert second.response_metadata["model_name"] == "my-model"
    assert dated.response_metadata["model_name"] == "gpt-4o-2024-11-20"  # already dated


def test_computed_counts_follow_the_request() -> None:
    with FakeOpenAIServer([FakeReply("a fairly long answer " * 5, reasoning_tokens=7)]) as server:
        short = usage(chat(server).invoke("hi"))
        long = usage(chat(server).invoke("hi " * 200))
        with_tools = usage(chat(server).bind_tools([LOOKUP]).invoke("hi"))
    assert long["input_tokens"] > short["input_tokens"] + 150
    assert with_tools["input_tokens"] > short["input_tokens"] + 10
    assert short["output_tokens"] >= 20 + 7  # reasoning tokens are part of the completion
    assert short["output_tokens"] == long["output_tokens"]


def test_stream_usage_only_when_asked() -> None:
    with FakeOpenAIServer([FakeReply("one two three four", prompt_tokens=7,
                                     completion_tokens=4, cached_tokens=3)]) as server:
        chunks = list(chat(server, stream_usage=True).stream("hi"))
        merged = merge(chunks)
        assert merged.content == "one two three four"
        assert len([c for c in chunks if c.content]) >= 3  # split into several deltas
        assert [c.usage_metadata is not None for c in chunks].count(True) == 1
        assert usage(merged)["input_tokens"] == 7 and usage(merged)["output_tokens"] == 4
        assert usage(merged)["input_token_details"]["cache_read"] == 3
        assert merged.response_metadata["model_name"] == "gpt-4o-2024-08-06"
        assert server.requests[-1]["stream_options"] == {"include_usage": True}

        plain = merge(chat(server).stream("hi"))
        assert plain.content == "one two three four" and plain.usage_metadata is None
        assert "stream_options" not in server.requests[-1]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_parse_in_json_and_sse(stream: bool) -> None:
    reply = FakeReply(tool_calls=[
        {"name": "lookup", "arguments": {"id": "42", "note": "a long argument string"},
         "id": "c1"},
        {"name": "lookup", "arguments": '{"id": "7"}'},
    ])
    with FakeOpenAIServer([reply]) as server:
        llm = chat(server).bind_tools([LOOKUP])
        msg = merge(llm.stream("find")) if stream else llm.invoke("find")
    assert [(tc["name"], tc["args"]) for tc in msg.tool_calls] == [
        ("lookup", {"id": "42", "note": "a long argument string"}), ("lookup", {"id": "7"})]
    assert msg.tool_calls[0]["id"] == "c1"
    assert str(msg.tool_calls[1]["id"]).startswith("call_")
    assert msg.response_metadata["finish_reason"] == "tool_calls"
    assert server.requests[0]["tools"][0]["function"]["name"] == "lookup"


def test_errors_surface_as_openai_errors() -> None:
    body = {"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}
    with FakeOpenAIServer([FakeReply(status=429, error_body=body),
                           FakeReply(status=500)]) as server:
        with pytest.raises(openai.RateLimitError, match="slow down") as info:
            chat(server).invoke("hi")
        assert info.value.code == "rate_limit_exceeded"
        assert info.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.InternalServerError):
            chat(server).invoke("hi")
        with pytest.raises(openai.InternalServerError):  # the last reply repeats
            chat(server).invoke("hi")
        assert server.request_count == 3


def test_a_retrying_client_gets_through_after_a_429() -> None:
    with FakeOpenAIServer([FakeReply(status=429), "after the retry"]) as server:
        started = time.monotonic()
        llm = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="t", max_retries=1)
        assert llm.invoke("hi").content == "after the retry"
    assert server.request_count == 2
    assert time.monotonic() - started < 1  # retry-after-ms: 10, not a 0.5 s backoff


async def test_async_paths() -> None:
    with FakeOpenAIServer([FakeReply("async ok", prompt_tokens=3, completion_tokens=2)]) as srv:
        msg = await chat(srv).ainvoke("hi")
        chunks = [c async for c in chat(srv, stream_usage=True).astream("hi")]
    assert msg.content == "async ok" and usage(msg)["total_tokens"] == 5
    merged = merge(chunks)
    assert merged.content == "async ok" and usage(merged)["total_tokens"] == 5
    assert srv.request_count == 2


def test_requests_are_recorded_and_reset_restarts_the_script() -> None:
    with FakeOpenAIServer(["first", "second"]) as server:
        assert [chat(server).invoke(q).content for q in ("a", "b", "c")] == [
            "first", "second", "second"]
        assert server.request_count == 3
        assert [r["messages"] for r in server.requests] == [
            [{"role": "user", "content": q}] for q in ("a", "b", "c")]
        assert server.requests[0]["model"] == "gpt-4o"
        server.reset()
        assert server.request_count == 0 and server.requests == []
        assert chat(server).invoke("d").content == "first"
        server.replies = [FakeReply("new script")]
        assert chat(server).invoke("e").content == "new script"
    with FakeOpenAIServer("one reply, not one per character") as server:
        assert chat(server).invoke("f").content == "one reply, not one per character"


def test_a_reply_function_scripts_from_the_request() -> None:
    def echo(body: dict[str, Any]) -> FakeReply:
        return FakeReply(f"{body['model']} heard {body['messages'][-1]['content']}")

    with FakeOpenAIServer(echo) as server:
        assert chat(server).invoke("ping").content == "gpt-4o heard ping"
        assert merge(chat(server).stream("pong")).content == "gpt-4o heard pong"


def test_delay_is_applied() -> None:
    with FakeOpenAIServer([FakeReply("late", delay_s=0.1)]) as server:
        started = time.monotonic()
        chat(server).invoke("hi")
    assert time.monotonic() - started >= 0.1


def http(method: str, url: str, data: bytes | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_models_listing_and_unknown_routes() -> None:
    with FakeOpenAIServer() as server:
        status, models = http("GET", f"{server.base_url}/models")
        assert status == 200 and models["object"] == "list"
        assert {m["id"] for m in models["data"]} >= {"gpt-4o"}
        status, error = http("POST", f"{server.base_url}/embeddings", b"{}")
        assert status == 404 and error["error"]["type"] == "invalid_request_error"
        status, error = http("POST", f"{server.base_url}/chat/completions", b"not json")
        assert status == 400 and "error" in error
        assert server.request_count == 0


def test_lifecycle_and_a_client_that_hangs_up(capfd: pytest.CaptureFixture[str]) -> None:
    server = FakeOpenAIServer([FakeReply("x" * 2000, delay_s=0.05)])
    with pytest.raises(RuntimeError):
        _ = server.base_url
    server.start()
    try:
        with pytest.raises(RuntimeError):
            server.start()
        body = json.dumps({"model": "gpt-4o", "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        for _ in range(100):  # the request was read, the client is gone
            if server.request_count:
                break
            time.sleep(0.01)
        time.sleep(0.1)  # the server writes into the closed connection
        assert chat(server).invoke("still serving").content == "x" * 2000
    finally:
        server.stop()
    server.stop()  # idempotent
    assert "Traceback" not in capfd.readouterr().err


def test_fake_reply_validates_its_script() -> None:
    with pytest.raises(ValueError):
        FakeReply(tool_calls=[{"arguments": {}}])
    with pytest.raises(ValueError):
        FakeReply(status=42)
    with pytest.raises(ValueError):
        FakeReply(prompt_tokens=-1)


# -- ScriptedChatModel ---------------------------------------------------------------------


class Recorder(BaseCallbackHandler):
    """Keeps what LangChain tells callbacks at the start of each chat model run."""

    def __init__(self) -> None:
        self.starts: list[dict[str, Any]] = []

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[BaseMessage]],
                            *, run_id: UUID, **kwargs: Any) -> None:
        self.starts.append({"metadata": kwargs.get("metadata") or {},
                            "params": kwargs.get("invocation_params") or {}})


def test_scripted_model_drives_create_agent() -> None:
    model = ScriptedChatModel(model_name="gpt-4o", max_tokens=300, responses=[
        AIMessage("", tool_calls=[{"name": "double", "args": {"x": 21}, "id": "c1"}]),
        "The answer is 42.",
    ])
    recorder = Recorder()
    result = create_agent(model, [double]).invoke({"messages": [("user", "double 21")]},
                                                  config={"callbacks": [recorder]})
    messages = result["messages"]
    assert [m.type for m in messages] == ["human", "ai", "tool", "ai"]
    assert messages[2].content == "42"  # the tool really ran
    assert messages[-1].content == "The answer is 42."
    for m in messages[1::2]:
        assert usage(m)["input_tokens"] > 0 and usage(m)["output_tokens"] > 0
        assert m.response_metadata["model_name"] == "gpt-4o"
        assert str(m.id).startswith("lc_run--")
    assert usage(messages[3])["input_tokens"] > usage(messages[1])["input_tokens"]
    assert messages[1].response_metadata["finish_reason"] == "tool_calls"
    assert model.calls == 2
    [first, _] = recorder.starts
    assert first["metadata"]["ls_model_name"] == "gpt-4o"
    assert first["metadata"]["ls_provider"] == "openai"
    assert first["metadata"]["ls_max_tokens"] == 300
    assert first["params"]["max_tokens"] == 300
    assert first["params"]["tools"][0]["function"]["name"] == "double"


def test_scripted_model_streams_in_a_graph_with_usage() -> None:
    model = ScriptedChatModel(responses=[
        AIMessage("", tool_calls=[{"name": "double", "args": {"x": 2}, "id": "c1"}]), "4"])
    agent = create_agent(model, [double])
    streamed = [chunk for chunk, _ in agent.stream({"messages": [("user", "double 2")]},
                                                   stream_mode="messages")
                if isinstance(chunk, AIMessageChunk)]
    assert [c.usage_metadata is not None for c in streamed].count(True) == 2  # one per call
    assert model.calls == 2


def test_scripted_model_streams_usage_and_tool_calls_on_the_last_chunk() -> None:
    model = ScriptedChatModel(cached_fraction=0.5, responses=[AIMessage(
        "a longer answer, then a call", tool_calls=[{"name": "double", "args": {"x": 1},
                                                     "id": "c9"}])])
    chunks = list(model.bind_tools([double]).stream("go"))
    assert len(chunks) > 3
    assert all(c.usage_metadata is None for c in chunks[:-1])
    merged = merge(chunks)
    assert merged.content == "a longer answer, then a call"
    assert usage(merged)["output_tokens"] > 5
    assert usage(merged)["input_token_details"]["cache_read"] == usage(merged)["input_tokens"] // 2
    assert merged.tool_calls == [{"name": "double", "args": {"x": 1}, "id": "c9",
                                  "type": "tool_call"}]
    assert merge(model.stream("go", stream_usage=False)).usage_metadata is None
    assert merge(ScriptedChatModel(stream_usage=False).stream("go")).usage_metadata is None


def test_scripted_usage_counts_prompt_tools_and_answer() -> None:
    model = ScriptedChatModel(model_name="gpt-4o", responses=["same answer"])
    plain = usage(model.invoke("hi"))
    longer = usage(model.invoke("hi " * 100))
    with_tools = usage(model.bind_tools([double]).invoke("hi"))
    assert longer["input_tokens"] >= plain["input_tokens"] + 90
    assert with_tools["input_tokens"] > plain["input_tokens"] + 10
    assert plain["output_tokens"] == longer["output_tokens"] == 2
    assert plain["total_tokens"] == plain["input_tokens"] + plain["output_tokens"]
    given = {"input_tokens": 1000, "output_tokens": 10, "total_tokens": 1010}
    scripted = ScriptedChatModel(responses=[AIMessage("x", usage_metadata=given)])
    assert usage(scripted.invoke("hi")) == given


def test_scripted_model_honours_max_tokens() -> None:
    model = ScriptedChatModel(responses=["word " * 500], max_tokens=10)
    msg = model.invoke("talk")
    assert usage(msg)["output_tokens"] == 10
    assert msg.response_metadata["finish_reason"] == "length"
    assert 0 < len(str(msg.content)) < 100
    capped = model.bind(max_tokens=3).invoke("talk")
    assert usage(capped)["output_tokens"] == 3
    calls = ScriptedChatModel(max_tokens=5, responses=[AIMessage("", tool_calls=[
        {"name": "double", "args": {"x": "a very long argument " * 10}, "id": "c1"}])])
    cut = calls.invoke("go")
    assert cut.tool_calls == [] and cut.response_metadata["finish_reason"] == "length"


def test_scripts_cycle_or_respond_and_calls_are_counted() -> None:
    model = ScriptedChatModel(responses=["a", "b"])
    assert [model.invoke("x").content for _ in range(3)] == ["a", "b", "a"]
    echo = ScriptedChatModel(respond=lambda messages: f"you said {messages[-1].content}")
    assert echo.invoke("hi").content == "you said hi"
    assert ScriptedChatModel().invoke("x").content == "ok"
    many = ScriptedChatModel(responses=["x"])
    many.batch(["q"] * 20, config={"max_concurrency": 8})
    assert many.calls == 20
    with pytest.raises(ValueError):
        ScriptedChatModel(responses=["a"], respond=lambda m: "b")
    assert ScriptedChatModel(model="gpt-4o").model_name == "gpt-4o"


def test_scripted_model_stop_sequences() -> None:
    model = ScriptedChatModel(responses=["first line\nsecond line"])
    msg = model.invoke("go", stop=["\n"])
    assert msg.content == "first line" and msg.response_metadata["finish_reason"] == "stop"


async def test_scripted_model_async() -> None:
    model = ScriptedChatModel(responses=["async answer"], latency_s=0.01)
    msg = await model.ainvoke("hi")
    merged = merge([c async for c in model.astream("hi")])
    assert msg.content == merged.content == "async answer"
    assert usage(msg) == usage(merged)
    assert model.calls == 2


# -- what the fake provider bills ----------------------------------------------------------


def test_billed_records_usage_with_hidden_reasoning_even_when_the_stream_has_no_usage() -> None:
    from agent_guard.pricing import PriceBook

    reply = FakeReply("the answer", prompt_tokens=40, cached_tokens=16, reasoning_tokens=300)
    with FakeOpenAIServer([reply, FakeReply(status=429), FakeReply(status=500)]) as server:
        answer = merge(chat(server).stream("hi"))  # no stream_options: no usage chunk
        assert answer.usage_metadata is None
        with pytest.raises(openai.RateLimitError):
            chat(server).invoke("refused")
        with pytest.raises(openai.InternalServerError):
            chat(server).invoke("failed")
        bills = server.billed
    assert len(bills) == 1  # error replies are not billed
    (bill,) = bills
    assert (bill.model, bill.prompt_tokens, bill.cached_tokens, bill.reasoning_tokens,
            bill.stream) == ("gpt-4o-2024-08-06", 40, 16, 300, True)
    from agent_guard.testing.openai_server import count_output

    assert bill.completion_tokens == 300 + count_output("the answer", [], "gpt-4o") > 300
    prices = PriceBook.default()
    assert server.billed_nano(prices) == prices.cost("gpt-4o", bill.usage()).total_nano > 0
    assert server.billed_usage() == bill.usage()


def test_billed_counts_every_choice_once() -> None:
    with FakeOpenAIServer([FakeReply("ab", prompt_tokens=5, completion_tokens=3,
                                     reasoning_tokens=2)]) as server:
        msg = chat(server, n=2).invoke("hi")
    assert usage(msg)["output_tokens"] == 6
    assert [(b.completion_tokens, b.reasoning_tokens) for b in server.billed] == [(6, 4)]


def test_an_answer_the_client_gave_up_on_is_billed_in_full() -> None:
    """A client timeout during generation, and a stream closed early: both billed."""
    slow = FakeReply("late answer", prompt_tokens=10, completion_tokens=20, delay_s=0.3)
    cut = FakeReply("x" * 400, prompt_tokens=10, completion_tokens=100, chunk_delay_s=0.01)
    with FakeOpenAIServer([slow, cut]) as server:
        with pytest.raises(openai.APITimeoutError):
            chat(server, timeout=0.05).invoke("hi")
        stream = chat(server).stream("hi")
        next(stream), next(stream)
        stream.close()
        assert [(b.prompt_tokens, b.completion_tokens) for b in server.billed] == [
            (10, 20), (10, 100)]
        server.reset()
        assert server.billed == [] and server.billed_nano() == 0


def test_record_billed_is_the_one_way_in_and_checks_its_input() -> None:
    with FakeOpenAIServer() as server:
        server.record_billed("gpt-4o", prompt_tokens=3, completion_tokens=4,
                             endpoint="responses", stream=True)
        assert [b.endpoint for b in server.billed] == ["responses"]
        with pytest.raises(ValueError, match="reasoning_tokens"):
            server.record_billed("gpt-4o", prompt_tokens=1, completion_tokens=1,
                                 reasoning_tokens=2)
        with pytest.raises(ValueError, match="prompt_tokens"):
            server.record_billed("gpt-4o", prompt_tokens=-1, completion_tokens=1)
    with pytest.raises(ValueError, match="chunk_delay_s"):
        FakeReply(chunk_delay_s=-1)
