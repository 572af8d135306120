"""Who a call was for, on the wire: user, session and the guard's scopes on every span;
metrics broken down by a bounded set of them; the OpenInference names Phoenix and Arize
read. Real ChatOpenAI against the local OpenAI-compatible server, spans through the real
OTLP/HTTP exporter to a local receiver."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk")

from langchain.agents import create_agent
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from agent_guard import Guard, GuardCallbackHandler, Limits, StepLimitExceeded
from agent_guard.telemetry import Attr, GuardTelemetry
from agent_guard.testing import FakeOpenAIServer, FakeReply

from .otlp_receiver import OtlpReceiver, kv

SCOPES = {"user": "u-7", "team": "core", "tenant": "acme", "feature": "support",
          "project": "p1", "environment": "prod"}
# how a run's metadata names them (user_id and env are the aliases)
METADATA = {"user_id": "u-7", "team": "core", "tenant": "acme", "feature": "support",
            "project": "p1", "env": "prod"}
SPAN_SCOPES = {"user.id": "u-7", "agent_guard.team": "core", "agent_guard.tenant": "acme",
               "agent_guard.feature": "support", "agent_guard.project": "p1",
               "agent_guard.environment": "prod"}


@tool
def lookup(order: str) -> str:
    """Look up an order."""
    return f"order {order}: shipped"


CALL = FakeReply(tool_calls=[{"name": "lookup", "arguments": {"order": "A1"}}],
                 prompt_tokens=120, completion_tokens=15, cached_tokens=40)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


def wire(receiver: OtlpReceiver, **options: Any
         ) -> tuple[GuardTelemetry, TracerProvider, InMemoryMetricReader]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(
        OTLPSpanExporter(endpoint=receiver.base + "/v1/traces")))
    reader = InMemoryMetricReader()
    telemetry = GuardTelemetry(provider, MeterProvider(metric_readers=[reader]), **options)
    return telemetry, provider, reader


def own_async_client() -> httpx.AsyncClient:
    """A client of this test's own: langchain-openai caches its default async client per
    base URL, and one left bound to a closed event loop (asyncio.run) breaks a later test
    whose server gets the same port."""
    return httpx.AsyncClient()


def run_agent(server: FakeOpenAIServer, handler: GuardCallbackHandler, how: str,
              metadata: dict, thread: str) -> None:
    llm = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="x", max_tokens=50,
                     stream_usage=True, http_async_client=own_async_client())
    agent = create_agent(llm, [lookup], name="support")
    config = {"callbacks": [handler], "metadata": metadata,
              "configurable": {"thread_id": thread}}
    inputs = {"messages": [("user", "where is A1?")]}
    if how == "invoke":
        agent.invoke(inputs, config=config)
    elif how == "ainvoke":
        asyncio.run(agent.ainvoke(inputs, config=config))
    else:
        for _ in agent.stream(inputs, config=config, stream_mode="messages"):
            pass


@pytest.mark.parametrize("how, metadata", [
    ("invoke", METADATA), ("ainvoke", METADATA), ("stream", METADATA),
    ("invoke", SCOPES),  # the scope kinds' own names
    ("ainvoke", {"agent_guard": SCOPES}),  # the nested dict
])
def test_every_span_says_who_the_call_was_for(receiver: OtlpReceiver, how: str,
                                               metadata: dict) -> None:
    """Root, model calls (the refused one too) and tools carry session.id, user.id and the
    guard's scopes, plus OpenInference's metadata JSON of them; the records agree."""
    telemetry, provider, _ = wire(receiver)
    records: list = []
    guard = Guard(Limits(max_model_calls=2), on_record=[records.append])
    handler = GuardCallbackHandler(guard, telemetry=telemetry)
    with FakeOpenAIServer([CALL]) as server, pytest.raises(StepLimitExceeded):
        run_agent(server, handler, how, metadata, "t-1")
    provider.force_flush()

    spans = {(s.name, s.span_id): kv(s.attributes) for s in receiver.spans}
    names = sorted(name for name, _ in spans)
    assert names == ["chat gpt-4o"] * 3 + ["execute_tool lookup"] * 2 + [
        "invoke_agent support"]
    for (name, _), a in spans.items():
        assert a[Attr.SESSION_ID] == "t-1", name
        assert {k: a.get(k) for k in SPAN_SCOPES} == SPAN_SCOPES, name
        assert json.loads(a[Attr.OI_METADATA]) == SCOPES, name
    assert [dict(r.attributes) for r in records] == [SCOPES] * 4  # 2 model + 2 tool
    assert telemetry.open_spans() == 0


def test_no_metadata_no_scope_attributes(receiver: OtlpReceiver) -> None:
    telemetry, provider, _ = wire(receiver)
    handler = GuardCallbackHandler(Guard(Limits(max_model_calls=2)), telemetry=telemetry)
    with FakeOpenAIServer([CALL]) as server, pytest.raises(StepLimitExceeded):
        run_agent(server, handler, "invoke", {}, "t-2")
    provider.force_flush()
    for span in receiver.spans:
        a = kv(span.attributes)
        assert not any(k == "user.id" or k.startswith("agent_guard.team") for k in a)
        assert Attr.OI_METADATA not in a and a[Attr.SESSION_ID] == "t-2"


def cost_points(reader: InMemoryMetricReader, name: str = "agent_guard.cost") -> list:
    return [p for rm in reader.get_metrics_data().resource_metrics
            for sm in rm.scope_metrics for m in sm.metrics if m.name == name
            for p in m.data.data_points]


RUNS = [({"user_id": "ann", "team": "core", "feature": "search"}, "t-a"),
        ({"user_id": "bob", "team": "core", "feature": "search"}, "t-b"),
        ({"user_id": "cy", "team": "growth", "feature": "search"}, "t-c")]


@pytest.mark.parametrize("kinds, expected_keys", [
    (None, {"agent_guard.team", "agent_guard.feature"}),  # the default: team and feature
    (("user",), {"user.id"}),
    (("team", "tenant"), {"agent_guard.team"}),  # no tenant in these runs: left off
    ((), set()),
])
def test_metrics_break_down_by_a_bounded_set_of_scopes(
        receiver: OtlpReceiver, kinds: tuple | None, expected_keys: set) -> None:
    options = {} if kinds is None else {"metric_attributes": kinds}
    telemetry, _, reader = wire(receiver, **options)
    records: list = []
    handler = GuardCallbackHandler(Guard(Limits(max_model_calls=2), on_record=[records.append]),
                                   telemetry=telemetry)
    with FakeOpenAIServer([CALL]) as server:
        for metadata, thread in RUNS:
            with pytest.raises(StepLimitExceeded):
                run_agent(server, handler, "invoke", metadata, thread)
    base = {Attr.OPERATION, Attr.REQUEST_MODEL, Attr.PROVIDER}
    points = cost_points(reader)
    for point in points:
        assert set(point.attributes) - base == expected_keys
    # each series is the exact sum of its calls' costs
    for point in points:
        extra = {k: v for k, v in point.attributes.items() if k not in base}
        calls = [r for r in records if r.kind == "model" and all(
            r.attributes.get("user" if k == "user.id" else k.removeprefix("agent_guard."))
            == v for k, v in extra.items())]
        assert point.value == pytest.approx(sum(r.cost_nano for r in calls) / 1e9)
    used = ("team", "feature") if kinds is None else kinds
    assert len(points) == len({tuple(r.attributes.get(k) for k in used)
                               for r in records if r.kind == "model"})
    histogram = [p for rm in reader.get_metrics_data().resource_metrics
                 for sm in rm.scope_metrics for m in sm.metrics
                 if m.name == "gen_ai.client.token.usage" for p in m.data.data_points]
    for point in histogram:
        assert set(point.attributes) - base - {Attr.TOKEN_TYPE} == expected_keys


def test_a_metric_attribute_must_name_a_scope_kind() -> None:
    with pytest.raises(ValueError, match="metric_attributes"):
        GuardTelemetry(TracerProvider(), metric_attributes=("team", ""))


def test_openinference_names_phoenix_and_arize_read(receiver: OtlpReceiver) -> None:
    """openinference.span.kind per span, llm.* model, provider, token counts (cache reads
    in prompt_details) and cost equal to the record's; tool.name and tool.id."""
    telemetry, provider, _ = wire(receiver)
    records: list = []
    handler = GuardCallbackHandler(Guard(Limits(max_model_calls=2), on_record=[records.append]),
                                   telemetry=telemetry)
    with FakeOpenAIServer([CALL]) as server, pytest.raises(StepLimitExceeded):
        run_agent(server, handler, "invoke", METADATA, "t-oi")
    provider.force_flush()
    by_kind: dict[str, list] = {}
    for span in receiver.spans:
        a = kv(span.attributes)
        by_kind.setdefault(a[Attr.OI_SPAN_KIND], []).append(a)
    assert sorted((k, len(v)) for k, v in by_kind.items()) == [
        ("AGENT", 1), ("LLM", 3), ("TOOL", 2)]
    ok = [a for a in by_kind["LLM"] if Attr.LLM_TOKENS_PROMPT in a]
    model_records = [r for r in records if r.kind == "model"]
    assert len(ok) == len(model_records) == 2
    for a, r in zip(ok, model_records, strict=True):
        assert a[Attr.LLM_MODEL_NAME] == r.model == "gpt-4o-2024-08-06"
        assert a[Attr.LLM_PROVIDER] == a[Attr.LLM_SYSTEM] == "openai"
        assert a[Attr.LLM_TOKENS_PROMPT] == r.usage.input_tokens == 120
        assert a[Attr.LLM_TOKENS_COMPLETION] == r.usage.output_tokens == 15
        assert a[Attr.LLM_TOKENS_TOTAL] == 135
        assert a[Attr.LLM_TOKENS_CACHE_READ] == 40
        assert a[Attr.LLM_COST_TOTAL] == pytest.approx(r.cost_nano / 1e9)
        assert a[Attr.LLM_COST_PROMPT] + a[Attr.LLM_COST_COMPLETION] == pytest.approx(
            a[Attr.LLM_COST_TOTAL])
    for a in by_kind["TOOL"]:
        assert a[Attr.OI_TOOL_NAME] == "lookup" and a[Attr.OI_TOOL_ID].startswith("call_")
    refused = [a for a in by_kind["LLM"] if Attr.LLM_TOKENS_PROMPT not in a]
    assert len(refused) == 1 and refused[0][Attr.LLM_MODEL_NAME] == "gpt-4o"


def test_openinference_names_can_be_turned_off(receiver: OtlpReceiver) -> None:
    telemetry, provider, _ = wire(receiver, openinference=False)
    handler = GuardCallbackHandler(Guard(Limits(max_model_calls=2)), telemetry=telemetry)
    with FakeOpenAIServer([CALL]) as server, pytest.raises(StepLimitExceeded):
        run_agent(server, handler, "invoke", METADATA, "t-off")
    provider.force_flush()
    for span in receiver.spans:
        a = kv(span.attributes)
        assert not any(k.startswith(("llm.token_count", "openinference", "tool."))
                       for k in a)
        assert a["user.id"] == "u-7"  # attribution stays


@pytest.mark.parametrize("how", ["invoke", "ainvoke"])
def test_a_middleware_cache_hit_span_sits_in_the_run_with_its_attribution(
        receiver: OtlpReceiver, how: str) -> None:
    """GuardMiddleware answers a repeated tool call from the cache (the tool never runs);
    its span goes under the run's root span, with session, user and scopes."""
    from agent_guard.cache import ResultCache
    from agent_guard.langchain import GuardMiddleware

    telemetry, provider, _ = wire(receiver)
    guard = Guard(Limits(max_cost_usd=1))
    cache = ResultCache(ttl={"orders": 60})
    middleware = GuardMiddleware(guard, cache=cache, cache_tools={"lookup": "orders"},
                                 telemetry=telemetry)
    with FakeOpenAIServer([CALL, CALL, FakeReply(content="shipped")]) as server:
        llm = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="x", max_tokens=50,
                         http_async_client=own_async_client())
        agent = create_agent(llm, [lookup], middleware=[middleware], name="support")
        config: Any = {"callbacks": [GuardCallbackHandler(guard, telemetry=telemetry,
                                                          count_tools=False)],
                       "metadata": METADATA, "configurable": {"thread_id": "t-mw"}}
        inputs = {"messages": [("user", "where is A1?")]}
        if how == "invoke":
            agent.invoke(inputs, config=config)
        else:
            asyncio.run(agent.ainvoke(inputs, config=config))
    provider.force_flush()
    [root] = [s for s in receiver.spans if s.name == "invoke_agent support"]
    hits = [s for s in receiver.spans if kv(s.attributes).get(Attr.CACHE_HIT) is True]
    assert len(hits) == 1 and cache.stats()["lookup"].hits == 1
    [hit] = hits
    assert hit.trace_id == root.trace_id and hit.parent_span_id == root.span_id
    a = kv(hit.attributes)
    assert a[Attr.SESSION_ID] == "t-mw" and {k: a.get(k) for k in SPAN_SCOPES} == SPAN_SCOPES


def test_a_guarded_graph_run_says_who_it_was_for(receiver: OtlpReceiver) -> None:
    """guarded_graph: the handler passed with the run (carrying telemetry) replaces the
    graph's own; its spans carry the run's scopes."""
    from langgraph.graph import START, MessagesState, StateGraph

    from agent_guard import guarded_graph

    telemetry, provider, _ = wire(receiver)
    guard = Guard(Limits(max_cost_usd=1))
    with FakeOpenAIServer([FakeReply(content="shipped")]) as server:
        llm = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="x", max_tokens=50)

        def model(state: MessagesState) -> dict:
            return {"messages": [llm.invoke(state["messages"])]}

        builder = StateGraph(MessagesState)
        builder.add_node("model", model)
        builder.add_edge(START, "model")
        graph = guarded_graph(builder, guard=guard)
        graph.invoke({"messages": [("user", "where is A1?")]},
                     config={"callbacks": [GuardCallbackHandler(guard, telemetry=telemetry)],
                             "metadata": METADATA, "configurable": {"thread_id": "t-g"}})
    provider.force_flush()
    names = sorted(s.name for s in receiver.spans)
    assert names[0] == "chat gpt-4o" and names[1].startswith("invoke_agent")
    for span in receiver.spans:
        a = kv(span.attributes)
        assert a[Attr.SESSION_ID] == "t-g" and {k: a.get(k) for k in SPAN_SCOPES} == SPAN_SCOPES
