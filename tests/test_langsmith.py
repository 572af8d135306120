"""LangSmith shows the guard's cost: the real langsmith client posts to a local endpoint and
the model runs carry input_cost/output_cost/total_cost and the guard's metadata."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from decimal import Decimal
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from langchain_core.tracers import LangChainTracer
from langsmith import Client

from agent_guard import Guard, GuardCallbackHandler, Limits
from agent_guard.testing import ScriptedChatModel

INFO = {"version": "0.10.0", "batch_ingest_config": {
    "use_multipart_endpoint": True, "size_limit": 100, "size_limit_bytes": 20_971_520,
    "scale_up_qsize_trigger": 1000, "scale_up_nthreads_limit": 16,
    "scale_down_nempty_trigger": 4}}


class LangSmithSink:
    """Accepts what the langsmith client sends and keeps every JSON part."""

    def __init__(self) -> None:
        self.parts: list[tuple[str, Any]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, payload: Any) -> None:
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._reply(INFO if self.path.startswith("/info") else {})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                ctype = self.headers.get("Content-Type", "")
                if ctype.startswith("multipart/"):
                    message = BytesParser(policy=HTTP).parsebytes(
                        f"Content-Type: {ctype}\r\n\r\n".encode() + body)
                    for part in message.iter_parts():
                        name = part.get_param("name", header="content-disposition")
                        data = part.get_payload(decode=True)
                        if data and part.get_content_type() == "application/json":
                            sink.parts.append((str(name), json.loads(data)))
                elif body:
                    sink.parts.append((self.path, json.loads(body)))
                self._reply({})

            do_PATCH = do_POST

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"


def find(obj: Any, key: str) -> list[Any]:
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                found.append(v)
            found.extend(find(v, key))
    elif isinstance(obj, list):
        for v in obj:
            found.extend(find(v, key))
    return found


def traced_runs(agent: Any, inputs: Any, config: Any, how: str, sink: LangSmithSink
                ) -> dict[str, dict]:
    """Run ``agent`` (``invoke``, ``ainvoke``, or its messages ``stream`` / ``astream``)
    with the tracer in ``config``; the runs the sink received: run id -> the run, its
    extra as last sent (post, patch)."""
    import asyncio

    async def astream() -> None:
        async for _ in agent.astream(inputs, config, stream_mode="messages"):
            pass

    if how == "invoke":
        agent.invoke(inputs, config=config)
    elif how == "ainvoke":
        asyncio.run(agent.ainvoke(inputs, config=config))
    elif how == "stream":
        list(agent.stream(inputs, config, stream_mode="messages"))
    else:
        asyncio.run(astream())
    tracer = next(c for c in config["callbacks"] if isinstance(c, LangChainTracer))
    tracer.wait_for_futures()
    tracer.client.flush()
    runs: dict[str, dict] = {}
    for name, part in sink.parts:
        _, run_id, *field = name.split(".")
        run = runs.setdefault(run_id, {})
        if field:
            run[field[0]] = part
        else:
            run.update({k: v for k, v in part.items() if k != "extra"})
    return runs


@pytest.fixture
def sink() -> Iterator[LangSmithSink]:
    s = LangSmithSink()
    yield s
    s.httpd.shutdown()


def test_model_runs_carry_the_guards_cost_and_metadata(sink: LangSmithSink) -> None:
    client = Client(api_url=sink.url, api_key="test-key")
    tracer = LangChainTracer(client=client, project_name="agent-guard-test")
    records: list = []
    guard = Guard(Limits(max_cost_usd="0.5"), on_record=[records.append])
    llm = ScriptedChatModel(model_name="gpt-4o", responses=["An answer."], max_tokens=50)
    llm.invoke("a question", config={"callbacks": [GuardCallbackHandler(guard), tracer],
                                     "metadata": {"session_id": "ls-1"}})
    tracer.wait_for_futures()
    client.flush()
    [record] = records
    totals = [v for _, part in sink.parts for v in find(part, "total_cost")]
    assert totals and Decimal(str(totals[0])) == pytest.approx(record.cost_usd, rel=Decimal("1e-6"))
    inputs = [v for _, part in sink.parts for v in find(part, "input_cost")]
    outputs = [v for _, part in sink.parts for v in find(part, "output_cost")]
    assert inputs[0] > 0 and outputs[0] > 0
    assert inputs[0] + outputs[0] == pytest.approx(totals[0])
    meta = [v for _, part in sink.parts for v in find(part, "agent_guard")]
    assert meta and meta[0]["session"] == "ls-1" and meta[0]["cap_usd"] == "0.5"


@pytest.mark.parametrize("how", ["invoke", "ainvoke"])
def test_tool_runs_carry_their_cost_and_cache_savings(sink: LangSmithSink, how: str) -> None:
    """A cached tool's LangSmith run: the run that called the tool costs its price
    (extra.metadata.usage_metadata.total_cost, LangSmith's "Other" cost); the run answered
    from the cache costs 0 and says what it saved."""

    from langchain.agents import create_agent
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool

    from agent_guard.cache import ResultCache, cached_tool

    @tool
    def lookup(order: str) -> str:
        """Look up an order."""
        return f"order {order}: shipped"

    seen = {"n": 0}

    def respond(messages: Any) -> AIMessage:
        seen["n"] += 1
        if seen["n"] <= 2:
            return AIMessage("", tool_calls=[{"name": "lookup", "args": {"order": "A1"},
                                              "id": f"call_{seen['n']}"}])
        return AIMessage("shipped")

    client = Client(api_url=sink.url, api_key="test-key")
    tracer = LangChainTracer(client=client, project_name="agent-guard-test")
    cache = ResultCache(ttl={"orders": 60})
    agent = create_agent(ScriptedChatModel(model_name="gpt-4o", respond=respond),
                         [cached_tool(lookup, cache, "orders", cost_usd="0.005")])
    config: Any = {"callbacks": [GuardCallbackHandler(Guard(Limits(max_cost_usd=1))), tracer],
                   "metadata": {"session_id": "s"}}
    runs = traced_runs(agent, {"messages": [("user", "where is A1?")]}, config, how, sink)
    # the agent's tool runs (a run cached_tool makes of the wrapped tool sits inside one)
    tools = [r for r in runs.values() if r.get("run_type") == "tool"
             and runs.get(r.get("parent_run_id") or "", {}).get("run_type") != "tool"]
    assert len(tools) == 2
    meta = sorted((r["extra"]["metadata"] for r in tools),
                  key=lambda m: m["agent_guard"]["cache_hit"])
    assert [m["usage_metadata"]["total_cost"] for m in meta] == [0.005, 0.0]
    assert [m["agent_guard"] for m in meta] == [{"cache_hit": False, "saved_usd": 0.0},
                                               {"cache_hit": True, "saved_usd": 0.005}]


@pytest.mark.parametrize("how", ["invoke", "ainvoke", "ainvoke async tool"])
@pytest.mark.parametrize("adapter", ["callback", "callback after tracer", "middleware"])
def test_a_paid_tool_s_run_carries_what_the_guard_charged(sink: LangSmithSink, how: str,
                                                          adapter: str) -> None:
    """A tool priced with ToolPrice: its LangSmith run carries the cost the guard settled
    (extra.metadata.usage_metadata.total_cost), the same number as its record, whether
    the callback handler is listed before or after the tracer, or GuardMiddleware alone
    guards the agent."""

    from langchain.agents import create_agent
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool

    from agent_guard.langchain import priced_tool
    from agent_guard.pricing import ToolPrice

    if how == "ainvoke async tool":  # LangChain's async dispatch (a sync tool runs in
        how = "ainvoke"               # a thread, its callbacks dispatched there)

        @tool
        async def web_search(query: str) -> str:
            """Search the web."""
            return '["a", "b", "c"]'
    else:
        @tool
        def web_search(query: str) -> str:
            """Search the web."""
            return '["a", "b", "c"]'

    priced_tool(web_search, ToolPrice("0.001", per_unit_usd="0.002", units="results",
                                      max_units=10))
    seen = {"n": 0}

    def respond(messages: Any) -> AIMessage:
        seen["n"] += 1
        if seen["n"] == 1:
            return AIMessage("", tool_calls=[{"name": "web_search", "args": {"query": "x"},
                                              "id": "call_1"}])
        return AIMessage("done")

    client = Client(api_url=sink.url, api_key="test-key")
    tracer = LangChainTracer(client=client, project_name="agent-guard-test")
    records: list = []
    guard = Guard(Limits(max_cost_usd=1), on_record=[records.append])
    model = ScriptedChatModel(model_name="gpt-4o", respond=respond)
    config: Any = {"callbacks": [GuardCallbackHandler(guard), tracer],
                   "metadata": {"session_id": "s"}}
    if adapter == "middleware":
        from agent_guard import GuardMiddleware

        agent = create_agent(model, [web_search], middleware=[GuardMiddleware(guard)])
        config["callbacks"] = [tracer]
    else:
        agent = create_agent(model, [web_search])
        if adapter == "callback after tracer":
            config["callbacks"].reverse()
    runs = traced_runs(agent, {"messages": [("user", "search")]}, config, how, sink)
    [record] = [r for r in records if r.kind == "tool"]
    assert record.cost_nano == 7_000_000  # $0.001 + 3 results x $0.002
    [run] = [r for r in runs.values() if r.get("run_type") == "tool"]
    meta = run["extra"]["metadata"]
    assert meta["usage_metadata"]["total_cost"] == pytest.approx(0.007)
    assert meta["agent_guard"]["cost_usd"] == "0.007"


# -- every path: sync, async, streamed, callback or middleware alone (issue 14) -------------


def _run_cost(run: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(input, output, total) cost LangSmith reads on a model run: its
    extra.metadata.usage_metadata, as LangChain's tracer writes it from the answer."""
    usage = ((run.get("extra") or {}).get("metadata") or {}).get("usage_metadata") or {}
    return usage.get("input_cost"), usage.get("output_cost"), usage.get("total_cost")


@pytest.mark.parametrize("how", ["invoke", "ainvoke", "stream", "astream"])
@pytest.mark.parametrize("adapter", ["callback", "middleware"])
def test_every_model_run_carries_the_ledgers_charge(sink: LangSmithSink, adapter: str,
                                                     how: str) -> None:
    """A create_agent run with a tool (two model calls) guarded by the callback or by
    GuardMiddleware alone, invoked, awaited or streamed: each model run LangSmith gets
    carries the cost the ledger charged for that call, and the costs add up to it."""
    from langchain.agents import create_agent
    from langchain_openai import ChatOpenAI

    from agent_guard import GuardMiddleware
    from agent_guard.testing import FakeOpenAIServer

    from .tool_turn import QUESTION, lookup, replies

    client = Client(api_url=sink.url, api_key="test-key")
    tracer = LangChainTracer(client=client, project_name="agent-guard-test")
    records: list = []
    guard = Guard(Limits(max_cost_usd=1), on_record=[records.append])
    with FakeOpenAIServer(replies()) as server:
        model = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="x",
                           max_retries=0, max_tokens=100, stream_usage=True)
        config: Any = {"configurable": {"thread_id": "ls"}, "callbacks": [tracer]}
        if adapter == "callback":
            agent = create_agent(model, tools=[lookup])
            config["callbacks"] = [GuardCallbackHandler(guard), tracer]
        else:
            agent = create_agent(model, tools=[lookup], middleware=[GuardMiddleware(guard)])
        runs = traced_runs(agent, {"messages": [("user", QUESTION)]}, config, how, sink)
        billed = server.billed_nano(guard.prices)
    charged = [r for r in records if r.kind == "model"]
    assert len(charged) == 2 and sum(r.cost_nano for r in charged) >= billed > 0
    model_runs = [r for r in runs.values() if r.get("run_type") == "llm"]
    assert len(model_runs) == 2
    costs = sorted(_run_cost(r) for r in model_runs)
    expected = sorted(r.cost_usd for r in charged)
    for (inp, out, total), want in zip(costs, expected, strict=True):
        assert total is not None, f"a model run without the guard's cost ({adapter}, {how})"
        assert Decimal(str(total)) == pytest.approx(want, rel=Decimal("1e-9"))
        assert inp + out == pytest.approx(total)
    # the tokens LangSmith shows beside them are the provider's, ints
    for run in model_runs:
        usage = run["extra"]["metadata"]["usage_metadata"]
        assert all(isinstance(usage[k], int) for k in ("input_tokens", "output_tokens"))
