"""Spans on the wire: a guarded create_agent run exported with the real OTLPSpanExporter to a
local OTLP/HTTP receiver that decodes the protobuf; metrics through an in-memory reader."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("opentelemetry.sdk")

from langchain.agents import create_agent
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from agent_guard import Guard, GuardCallbackHandler, Limits, StepLimitExceeded
from agent_guard.telemetry import Attr, GuardTelemetry
from agent_guard.testing import ScriptedChatModel


class Receiver:
    """A minimal OTLP/HTTP trace receiver: decodes ExportTraceServiceRequest bodies."""

    def __init__(self) -> None:
        self.spans: list = []
        self.content_types: list[str] = []
        self.paths: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.content_types.append(self.headers["Content-Type"])
                receiver.paths.append(self.path)
                if not self.path.endswith("/v1/traces"):
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for rs in request.resource_spans:
                    for ss in rs.scope_spans:
                        receiver.spans.extend(ss.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/traces"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.httpd.shutdown()


def attrs(span) -> dict:
    out = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        value = getattr(kv.value, kind)
        out[kv.key] = [x.string_value for x in value.values] if kind == "array_value" else value
    return out


@tool
def lookup(order: str) -> str:
    """Look up an order."""
    return f"order {order}: shipped"


def test_a_guarded_agent_run_on_the_wire(receiver: Receiver, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="langchain_core.callbacks.manager")
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.url)))
    reader = InMemoryMetricReader()
    telemetry = GuardTelemetry(provider, MeterProvider(metric_readers=[reader]),
                               cost_attributes=(Attr.COST, Attr.LLM_COST_TOTAL))
    guard = Guard(Limits(max_model_calls=2), on_threshold=[telemetry.on_threshold])
    handler = GuardCallbackHandler(guard, telemetry=telemetry, session_id="default")
    llm = ScriptedChatModel(model_name="gpt-4o", max_tokens=100, cached_fraction=0.5,
                            respond=lambda m: AIMessage("", tool_calls=[
                                {"name": "lookup", "args": {"order": "A1"}, "id": "call_1"}]))
    agent = create_agent(llm, [lookup], name="support")
    with pytest.raises(StepLimitExceeded):
        agent.invoke({"messages": [("user", "where is A1?")]},
                     config={"callbacks": [handler], "configurable": {"thread_id": "t-9"}})
    provider.force_flush()

    assert receiver.content_types and receiver.content_types[0] == "application/x-protobuf"
    by_name: dict[str, list] = {}
    for span in receiver.spans:
        by_name.setdefault(span.name, []).append(span)
    [root] = by_name["invoke_agent support"]
    chats = by_name["chat gpt-4o"]
    tools = by_name["execute_tool lookup"]
    assert len(chats) == 3 and len(tools) == 2  # 2 admitted calls + 1 refused; 2 tools
    assert root.kind == root.SPAN_KIND_INTERNAL and root.parent_span_id == b""
    for span in chats + tools:
        assert span.trace_id == root.trace_id and span.parent_span_id == root.span_id
    assert all(c.kind == c.SPAN_KIND_CLIENT for c in chats)

    ok = [c for c in chats if c.status.code != c.status.STATUS_CODE_ERROR]
    refused = [c for c in chats if c.status.code == c.status.STATUS_CODE_ERROR]
    assert len(ok) == 2 and len(refused) == 1
    assert [e.name for e in refused[0].events] == ["agent_guard.refusal"]
    a = attrs(ok[0])
    assert a[Attr.OPERATION] == "chat" and a[Attr.PROVIDER] == "openai"
    assert a[Attr.REQUEST_MODEL] == "gpt-4o" and a[Attr.RESPONSE_MODEL] == "gpt-4o"
    assert a[Attr.REQUEST_MAX_TOKENS] == 100
    assert a[Attr.INPUT_TOKENS] > 0 and a[Attr.OUTPUT_TOKENS] > 0
    assert a[Attr.CACHE_READ_TOKENS] == a[Attr.INPUT_TOKENS] // 2
    assert a[Attr.FINISH_REASONS] == ["tool_calls"]
    assert a[Attr.CONVERSATION_ID] == a[Attr.SESSION_ID] == "t-9"
    assert a[Attr.COST] == a[Attr.LLM_COST_TOTAL] > 0
    assert abs(a[Attr.LLM_COST_PROMPT] + a[Attr.LLM_COST_COMPLETION] - a[Attr.COST]) < 1e-9
    assert a[Attr.ESTIMATED] is False and a[Attr.CACHE_HIT] is False
    t = attrs(tools[0])
    assert t[Attr.TOOL_NAME] == "lookup" and t[Attr.TOOL_CALL_ID] == "call_1"
    r = attrs(root)
    assert r[Attr.SESSION_MODEL_CALLS] == 2 and r[Attr.SESSION_COST_USD] > 0
    assert root.status.code == root.status.STATUS_CODE_ERROR
    thresholds = [e for e in root.events if e.name == "agent_guard.threshold"]
    assert [attrs(e)["agent_guard.threshold"] for e in thresholds] == [0.5, 0.8, 1.0]
    assert not any(k.startswith("gen_ai.usage") for k in r)  # backends sum those
    assert telemetry.open_spans() == 0  # nothing leaked
    text = " ".join(str(attrs(s)) for s in receiver.spans)
    assert "where is A1" not in text  # no message content by default

    metrics = {m.name: m for rm in reader.get_metrics_data().resource_metrics
               for sm in rm.scope_metrics for m in sm.metrics}
    usage = metrics["gen_ai.client.token.usage"].data.data_points
    assert {p.attributes[Attr.TOKEN_TYPE] for p in usage} == {"input", "output"}
    assert usage[0].explicit_bounds[:3] == (1, 4, 16)
    assert metrics["gen_ai.client.operation.duration"].data.data_points[0].count == 2
    assert metrics["agent_guard.cost"].data.data_points[0].value == pytest.approx(
        r[Attr.SESSION_COST_USD])


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_configure_otlp_exports_to_a_collector(receiver: Receiver, how: str) -> None:
    """In a fresh interpreter: the one-line setup, by argument or by OTEL_* variables."""
    import os
    import subprocess
    import sys
    import textwrap

    base = receiver.url.removesuffix("/v1/traces")
    arg = repr(base) if how == "argument" else "None"
    script = textwrap.dedent(f"""
        from opentelemetry import metrics, trace
        from agent_guard import Guard, GuardCallbackHandler, Limits
        from agent_guard.telemetry import configure_otlp
        from agent_guard.testing import ScriptedChatModel
        telemetry = configure_otlp({arg}, service_name="svc-under-test")
        handler = GuardCallbackHandler(Guard(Limits(max_cost_usd=1)), telemetry=telemetry,
                                       session_id="default")
        ScriptedChatModel(model_name="gpt-4o").invoke("hi", config={{"callbacks": [handler]}})
        trace.get_tracer_provider().force_flush()
        metrics.get_meter_provider().force_flush()
    """)
    env = {**os.environ}
    if how == "environment":
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = base
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [s.name for s in receiver.spans] == ["chat gpt-4o"]
    assert "/v1/metrics" in receiver.paths


def scripted_tool_loop(n_calls: int) -> ScriptedChatModel:
    """A model that asks for the same lookup ``n_calls`` times, then answers."""
    seen = {"n": 0}

    def respond(messages):
        seen["n"] += 1
        if seen["n"] <= n_calls:
            return AIMessage("", tool_calls=[{"name": "lookup", "args": {"order": "A1"},
                                              "id": f"call_{seen['n']}"}])
        return AIMessage("shipped")

    return ScriptedChatModel(model_name="gpt-4o", max_tokens=100, respond=respond)


def tool_spans(receiver: Receiver) -> list:
    spans = [s for s in receiver.spans if s.name == "execute_tool lookup"]
    return sorted(spans, key=lambda s: s.start_time_unix_nano)


def test_tool_spans_say_when_the_result_cache_answered(receiver: Receiver) -> None:
    """Callback path: cached_tool tells the handler (a custom event on the tool's run)."""
    from agent_guard.cache import ResultCache, cached_tool

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.url)))
    telemetry = GuardTelemetry(provider, MeterProvider(metric_readers=[InMemoryMetricReader()]))
    handler = GuardCallbackHandler(Guard(Limits(max_cost_usd=1)), telemetry=telemetry,
                                   session_id="default")
    cache = ResultCache(ttl={"orders": 60})
    agent = create_agent(scripted_tool_loop(2), [cached_tool(lookup, cache, "orders",
                                                             cost_usd="0.005")])
    agent.invoke({"messages": [("user", "where is A1?")]}, config={"callbacks": [handler]})
    provider.force_flush()

    first, second = (attrs(s) for s in tool_spans(receiver))
    assert first[Attr.CACHE_HIT] is False and Attr.CACHE_SAVED_USD not in first
    assert second[Attr.CACHE_HIT] is True
    assert second[Attr.CACHE_SAVED_USD] == pytest.approx(0.005)
    assert second[Attr.TOOL_CALL_ID] == "call_2"
    assert cache.stats()["lookup"].hits == 1
    assert telemetry.open_spans() == 0


def test_a_paid_tool_s_span_carries_its_cost(receiver: Receiver) -> None:
    """A tool priced with ToolPrice: its execute_tool span carries the cost the guard
    settled and what it reserved, under the chat spans' cost attribute names."""
    from agent_guard.langchain import priced_tool
    from agent_guard.pricing import ToolPrice

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.url)))
    reader = InMemoryMetricReader()
    telemetry = GuardTelemetry(provider, MeterProvider(metric_readers=[reader]),
                               cost_attributes=(Attr.COST, Attr.LLM_COST_TOTAL))
    records: list = []
    handler = GuardCallbackHandler(Guard(Limits(max_cost_usd=1), on_record=[records.append]),
                                   telemetry=telemetry, session_id="default")
    paid = priced_tool(lookup.model_copy(), ToolPrice("0.01", service="Orders API"))
    agent = create_agent(scripted_tool_loop(2), [paid])
    agent.invoke({"messages": [("user", "where is A1?")]}, config={"callbacks": [handler]})
    provider.force_flush()

    spans = [attrs(s) for s in tool_spans(receiver)]
    assert len(spans) == 2
    for a in spans:
        assert a[Attr.COST] == a[Attr.LLM_COST_TOTAL] == pytest.approx(0.01)
        assert a[Attr.RESERVED_USD] == pytest.approx(0.01)
        assert a[Attr.ESTIMATED] is False
    assert sum(r.cost_nano for r in records if r.kind == "tool") == 20_000_000
    assert telemetry.open_spans() == 0
    points = [p for m in reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics
              if m.name == "agent_guard.cost" for p in m.data.data_points]
    tool_points = [p for p in points if p.attributes.get(Attr.TOOL_NAME) == "lookup"]
    assert [p.value for p in tool_points] == [pytest.approx(0.02)]
    assert sum(p.value for p in points) == pytest.approx(
        sum(r.cost_nano for r in records) / 1e9)


@pytest.mark.parametrize("capture", [False, True])
def test_middleware_cache_hits_get_a_tool_span(receiver: Receiver, capture: bool) -> None:
    """Middleware path: the middleware makes every tool call's span under its agent
    span; a hit (the tool never runs) says so, with the call's arguments and the cached
    result when content is captured."""
    import json

    from agent_guard.cache import ResultCache
    from agent_guard.langchain import GuardMiddleware

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.url)))
    telemetry = GuardTelemetry(provider, MeterProvider(metric_readers=[InMemoryMetricReader()]),
                               capture_content=capture)
    cache = ResultCache(ttl={"orders": 60})
    middleware = GuardMiddleware(limits=Limits(max_cost_usd=1), cache=cache,
                                 cache_tools={"lookup": "orders"}, telemetry=telemetry,
 session_id="default")
    agent = create_agent(scripted_tool_loop(3), [lookup], middleware=[middleware])
    agent.invoke({"messages": [("user", "where is A1?")]})
    provider.force_flush()

    ran, *spans = tool_spans(receiver)
    assert attrs(ran)[Attr.CACHE_HIT] is False  # the first call ran the tool
    assert len(spans) == 2  # the two calls answered from the cache
    for span in spans:
        a = attrs(span)
        assert a[Attr.CACHE_HIT] is True and a[Attr.CACHE_SAVED_USD] == 0.0
        assert a[Attr.OPERATION] == "execute_tool" and a[Attr.TOOL_NAME] == "lookup"
        if capture:
            assert json.loads(a[Attr.TOOL_CALL_ARGUMENTS]) == {"order": "A1"}
            assert a[Attr.TOOL_CALL_RESULT] == "order A1: shipped"
        else:
            assert not set(a) & set(CONTENT_ATTRS)
    assert [attrs(s)[Attr.TOOL_CALL_ID] for s in spans] == ["call_2", "call_3"]
    [root] = [s for s in receiver.spans if s.name.startswith("invoke_agent")]
    assert all(s.parent_span_id == root.span_id for s in [ran, *spans])
    assert cache.stats()["lookup"].hits == 2


def test_cost_counters_sum_every_telemetry_of_a_meter_provider() -> None:
    """agent_guard.cost / saved_cost are observable counters over in-process sums: two
    GuardTelemetry on one MeterProvider feed one monotonic cumulative Sum per attribute
    set, with the exact nano-dollar total of the calls (the SDK would ignore a second
    callback registered under the same name)."""
    import dataclasses
    import uuid

    from opentelemetry.sdk.metrics.export import AggregationTemporality

    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    records: list = []
    handlers = []
    for _ in range(2):
        telemetry = GuardTelemetry(TracerProvider(), meters)
        guard = Guard(Limits(max_cost_usd=10), on_record=[records.append])
        handlers.append(GuardCallbackHandler(guard, session_id="s", telemetry=telemetry))
    llm = ScriptedChatModel(model_name="gpt-4o", max_tokens=50)
    for i in range(5):
        llm.invoke(f"question {i}", config={"callbacks": [handlers[i % 2]]})
    # a cache hit seen by the second telemetry: counted as saved, not spent
    hit = dataclasses.replace(records[0], outcome="cache_hit", cost_nano=0, saved_nano=1234)
    run = uuid.uuid4()
    handlers[1].telemetry.chat_start(run, None, model="gpt-4o", provider=None,
                                     max_tokens=None, session="s")
    handlers[1].telemetry.chat_end(run, hit)

    def points(name: str) -> list:
        data = [m.data for rm in reader.get_metrics_data().resource_metrics
                for sm in rm.scope_metrics for m in sm.metrics if m.name == name]
        assert len(data) == 1 and data[0].is_monotonic
        assert data[0].aggregation_temporality == AggregationTemporality.CUMULATIVE
        return list(data[0].data_points)

    [cost] = points("agent_guard.cost")
    assert cost.value == sum(r.cost_nano for r in records) / 1e9 > 0
    assert cost.attributes == {Attr.OPERATION: "chat", Attr.REQUEST_MODEL: "gpt-4o",
                               Attr.PROVIDER: records[0].provider}
    [saved] = points("agent_guard.saved_cost")
    assert saved.value == 1234 / 1e9
    for _ in range(2):  # cumulative: collecting again gives the same totals
        assert points("agent_guard.cost")[0].value == cost.value


def content_run(receiver: Receiver, telemetry: GuardTelemetry, provider) -> dict[str, list]:
    """A create_agent run with a system prompt, one tool call and a final answer."""
    handler = GuardCallbackHandler(Guard(Limits(max_cost_usd=1)), telemetry=telemetry,
                                   session_id="default")
    agent = create_agent(scripted_tool_loop(1), [lookup], system_prompt="Be brief.")
    agent.invoke({"messages": [("user", "where is A1?")]}, config={"callbacks": [handler]})
    provider.force_flush()
    by_name: dict[str, list] = {}
    for span in sorted(receiver.spans, key=lambda s: s.start_time_unix_nano):
        by_name.setdefault(span.name, []).append(attrs(span))
    assert telemetry.open_spans() == 0
    return by_name


CONTENT_ATTRS = (Attr.INPUT_MESSAGES, Attr.OUTPUT_MESSAGES, Attr.SYSTEM_INSTRUCTIONS,
                 Attr.TOOL_CALL_ARGUMENTS, Attr.TOOL_CALL_RESULT)


def test_message_content_on_spans_when_the_user_opts_in(receiver: Receiver) -> None:
    """capture_content=True: the conventions' JSON messages, system instructions apart,
    tool calls and results as parts, and the tool span's arguments and result."""
    import json

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.url)))
    telemetry = GuardTelemetry(provider, MeterProvider(metric_readers=[InMemoryMetricReader()]),
                               capture_content=True)
    spans = content_run(receiver, telemetry, provider)
    first, second = spans["chat gpt-4o"]
    assert json.loads(first[Attr.SYSTEM_INSTRUCTIONS]) == [
        {"type": "text", "content": "Be brief."}]
    assert json.loads(first[Attr.INPUT_MESSAGES]) == [
        {"role": "user", "parts": [{"type": "text", "content": "where is A1?"}]}]
    assert json.loads(first[Attr.OUTPUT_MESSAGES]) == [
        {"role": "assistant", "finish_reason": "tool_calls",
         "parts": [{"type": "tool_call", "name": "lookup", "arguments": {"order": "A1"},
                    "id": "call_1"}]}]
    turns = json.loads(second[Attr.INPUT_MESSAGES])
    assert [t["role"] for t in turns] == ["user", "assistant", "tool"]
    assert turns[2]["parts"] == [{"type": "tool_call_response", "id": "call_1",
                                  "response": "order A1: shipped"}]
    assert json.loads(second[Attr.OUTPUT_MESSAGES])[0]["parts"] == [
        {"type": "text", "content": "shipped"}]
    [tool] = spans["execute_tool lookup"]
    assert json.loads(tool[Attr.TOOL_CALL_ARGUMENTS]) == {"order": "A1"}
    assert tool[Attr.TOOL_CALL_RESULT] == "order A1: shipped"


@pytest.mark.parametrize("env, captured", [(None, False), ("false", False),
                                           ("NO_CONTENT", False), ("EVENT_ONLY", False),
                                           ("true", True), ("SPAN_ONLY", True),
                                           ("span_and_event", True)])
def test_content_follows_the_conventions_environment_variable(
        receiver: Receiver, monkeypatch, env: str | None, captured: bool) -> None:
    from agent_guard.telemetry.content import CAPTURE_CONTENT_ENV

    if env is None:
        monkeypatch.delenv(CAPTURE_CONTENT_ENV, raising=False)
    else:
        monkeypatch.setenv(CAPTURE_CONTENT_ENV, env)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.url)))
    telemetry = GuardTelemetry(provider, MeterProvider(metric_readers=[InMemoryMetricReader()]))
    assert telemetry.capture_content is captured
    spans = content_run(receiver, telemetry, provider)
    found = {k for group in spans.values() for a in group for k in a if k in CONTENT_ATTRS}
    text = str(spans)
    if captured:
        assert found == set(CONTENT_ATTRS)
    else:
        assert found == set() and "where is A1" not in text and "Be brief" not in text
    # an explicit argument wins over the environment
    assert GuardTelemetry(provider, capture_content=False).capture_content is False


def test_an_unreadable_content_setting_is_refused(monkeypatch) -> None:
    from agent_guard.telemetry.content import CAPTURE_CONTENT_ENV

    monkeypatch.setenv(CAPTURE_CONTENT_ENV, "maybe")
    with pytest.raises(ValueError, match="SPAN_ONLY"):
        GuardTelemetry(TracerProvider())


def test_content_parts_for_multimodal_reasoning_and_legacy_prompts() -> None:
    """Images are named, not copied; reasoning blocks are their own part; a plain prompt
    string is a user message."""
    from langchain_core.messages import HumanMessage

    from agent_guard.telemetry.content import input_messages, output_messages

    image = HumanMessage(content=[
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])
    system, rest = input_messages([image, "plain prompt"])
    assert system == []
    assert rest == [{"role": "user", "parts": [{"type": "text", "content": "what is this?"},
                                               {"type": "image_url"}]},
                    {"role": "user", "parts": [{"type": "text", "content": "plain prompt"}]}]
    thought = AIMessage(content=[{"type": "reasoning", "reasoning": "think"},
                                 {"type": "text", "text": "42"}])
    assert output_messages([thought, "legacy"], ["stop", "length"]) == [
        {"role": "assistant", "finish_reason": "stop",
         "parts": [{"type": "reasoning", "content": "think"}, {"type": "text", "content": "42"}]},
        {"role": "assistant", "finish_reason": "length",
         "parts": [{"type": "text", "content": "legacy"}]}]


def test_content_roles_of_chunks_chat_messages_and_tool_images() -> None:
    from langchain_core.messages import (
        ChatMessage,
        HumanMessageChunk,
        SystemMessageChunk,
        ToolMessage,
        ToolMessageChunk,
    )

    from agent_guard.telemetry.content import input_messages

    system, rest = input_messages([
        SystemMessageChunk(content="be brief"), ChatMessage(role="developer", content="dev"),
        HumanMessageChunk(content="hi"), ChatMessage(role="user", content="there"),
        ToolMessageChunk(content="chunked", tool_call_id="c1"),
        ToolMessage(content=[{"type": "text", "text": "a screenshot"},
                             {"type": "image", "base64": "QUJD" * 1000,
                              "mime_type": "image/png"}], tool_call_id="c2")])
    assert system == [{"type": "text", "content": "be brief"},
                      {"type": "text", "content": "dev"}]
    assert [m["role"] for m in rest] == ["user", "user", "tool", "tool"]
    assert rest[2]["parts"] == [{"type": "tool_call_response", "response": "chunked",
                                 "id": "c1"}]
    assert rest[3]["parts"][0]["response"] == [{"type": "text", "content": "a screenshot"},
                                               {"type": "image"}]  # named, not copied


def test_content_that_json_cannot_hold_is_written_as_text_and_never_fails_a_call(
        receiver: Receiver, caplog) -> None:
    """Non-string keys and cycles become text; a value whose str() itself fails is left
    off the span with a warning, and the tool call, its span and its record complete."""
    import datetime
    import json

    from agent_guard.telemetry.content import to_json

    cyclic: list = [1]
    cyclic.append(cyclic)
    assert json.loads(to_json({datetime.date(2026, 1, 1): "new year", (1, 2): "pair"})) == {
        "2026-01-01": "new year", "(1, 2)": "pair"}
    assert json.loads(to_json(cyclic))[0] == 1

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no str")

    @tool
    def odd(x: int) -> dict:
        """Return something JSON cannot hold."""
        return {Unprintable(): x}

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.url)))
    telemetry = GuardTelemetry(provider, MeterProvider(metric_readers=[InMemoryMetricReader()]),
                               capture_content=True)
    records: list = []
    handler = GuardCallbackHandler(Guard(Limits(max_tool_calls=5), on_record=[records.append]),
                                   session_id="s", telemetry=telemetry)
    with caplog.at_level(logging.WARNING, logger="agent_guard"):
        result = odd.invoke({"x": 3}, config={"callbacks": [handler]})
    provider.force_flush()
    assert list(result.values()) == [3]
    [span] = [attrs(s) for s in receiver.spans if s.name == "execute_tool odd"]
    assert json.loads(span[Attr.TOOL_CALL_ARGUMENTS]) == {"x": 3}
    assert Attr.TOOL_CALL_RESULT not in span
    assert "message content left off a span" in caplog.text
    assert telemetry.open_spans() == 0
    assert [r.kind for r in records] == ["tool"] and records[0].outcome == "ok"


def metric_points(reader: InMemoryMetricReader) -> dict[str, list]:
    data = reader.get_metrics_data()
    if data is None:
        return {}
    return {m.name: list(m.data.data_points) for rm in data.resource_metrics
            for sm in rm.scope_metrics for m in sm.metrics}


def guarded_agent_run(telemetry: GuardTelemetry) -> None:
    """A create_agent run (root, two model calls, one tool call) under the callback."""
    handler = GuardCallbackHandler(Guard(Limits(max_cost_usd=1)), telemetry=telemetry,
                                   session_id="default")
    agent = create_agent(scripted_tool_loop(1), [lookup])
    agent.invoke({"messages": [("user", "where is A1?")]}, config={"callbacks": [handler]})


@pytest.mark.parametrize("how", ["sampled out", "traces off"])
def test_calls_without_a_recorded_span_still_count_in_the_metrics(how: str) -> None:
    """A sampler that drops the trace (or a provider that is off) gets no span and no
    span attributes, and the calls are in the metrics all the same."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
    from opentelemetry.trace import NoOpTracerProvider

    exporter = InMemorySpanExporter()
    provider: object = NoOpTracerProvider()
    if how == "sampled out":
        provider = TracerProvider(sampler=ALWAYS_OFF)
        provider.add_span_processor(SimpleSpanProcessor(exporter))  # type: ignore[attr-defined]
    reader = InMemoryMetricReader()
    telemetry = GuardTelemetry(provider, MeterProvider(metric_readers=[reader]))
    guarded_agent_run(telemetry)

    assert exporter.get_finished_spans() == ()
    assert telemetry.open_spans() == 0
    points = metric_points(reader)
    assert [p.count for p in points["gen_ai.client.operation.duration"]] == [2]
    assert sum(p.sum for p in points["gen_ai.client.token.usage"]) > 0
    assert points["agent_guard.cost"][0].value > 0


def test_metrics_off_leaves_the_spans_as_they_were() -> None:
    """A meter provider that is off (configure_otlp(metrics=False)) changes no span."""
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    def spans(meters: object) -> list[tuple[str, dict]]:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        guarded_agent_run(GuardTelemetry(provider, meters))
        return [(s.name, dict(s.attributes)) for s in exporter.get_finished_spans()]

    on = spans(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    off = spans(NoOpMeterProvider())
    assert [n for n, _ in off] == [n for n, _ in on] == [
        "chat gpt-4o", "execute_tool lookup", "chat gpt-4o", "invoke_agent LangGraph"]
    assert [set(a) for _, a in off] == [set(a) for _, a in on]


def test_the_callback_and_the_middleware_on_one_telemetry_make_one_span_per_call() -> None:
    """Both adapters see the same model run: the first to start it owns its span, which
    ends once, with the call's cost."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from agent_guard.langchain import GuardMiddleware

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    telemetry = GuardTelemetry(provider, MeterProvider(metric_readers=[reader]))
    guard = Guard(Limits(max_cost_usd=1))
    agent = create_agent(scripted_tool_loop(1), [lookup],
                         middleware=[GuardMiddleware(guard, telemetry=telemetry)])
    agent.invoke({"messages": [("user", "where is A1?")]}, config={
        "callbacks": [GuardCallbackHandler(guard, telemetry=telemetry)],
        "configurable": {"thread_id": "t-1"}})

    chats = [s for s in exporter.get_finished_spans() if s.name == "chat gpt-4o"]
    assert len(chats) == 2 and all(s.attributes[Attr.COST] > 0 for s in chats)
    assert telemetry.open_spans() == 0


def test_token_details_are_written_when_the_provider_reports_some() -> None:
    """Cache reads, cache writes and reasoning tokens under both names (GenAI and
    OpenInference) when a call has some; a call with none carries no detail attribute
    (a 0 would say nothing more, and every attribute costs each call)."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    details = {"input_tokens": 900, "output_tokens": 60, "total_tokens": 960,
               "input_token_details": {"cache_read": 300, "cache_creation": 200},
               "output_token_details": {"reasoning": 25}}
    plain = {"input_tokens": 900, "output_tokens": 60, "total_tokens": 960}
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    handler = GuardCallbackHandler(Guard(Limits(max_cost_usd=1)), session_id="s",
                                   telemetry=GuardTelemetry(provider, MeterProvider()))
    llm = ScriptedChatModel(model_name="gpt-4o", max_tokens=100, responses=[
        AIMessage("a", usage_metadata=details), AIMessage("b", usage_metadata=plain)])
    for _ in range(2):
        llm.invoke("hi", config={"callbacks": [handler]})

    with_details, without = (dict(s.attributes) for s in exporter.get_finished_spans())
    names = {Attr.CACHE_READ_TOKENS: 300, Attr.LLM_TOKENS_CACHE_READ: 300,
             Attr.CACHE_CREATION_TOKENS: 200, Attr.LLM_TOKENS_CACHE_WRITE: 200,
             Attr.REASONING_TOKENS: 25, Attr.LLM_TOKENS_REASONING: 25}
    assert {k: with_details.get(k) for k in names} == names
    assert not set(names) & set(without)
    for a in (with_details, without):
        assert a[Attr.INPUT_TOKENS] == a[Attr.LLM_TOKENS_PROMPT] == 900
        assert a[Attr.OUTPUT_TOKENS] == a[Attr.LLM_TOKENS_COMPLETION] == 60
