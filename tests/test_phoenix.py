"""A real Arize Phoenix on loopback: a guarded create_agent run (routing between two
custom-priced models, a cached tool, a refusal) exported by configure_otlp(), then read
back through Phoenix's REST and GraphQL APIs: the span tree, token counts, the session, the
user, and Phoenix's own cost, which must equal the guard's ledger.

Phoenix is heavy and pins its own versions, so it lives in its own virtualenv
(``.venv-phoenix``, made by ``.ci/run``; or the ``phoenix`` executable named by
``AGENT_GUARD_PHOENIX``). Without it the test is skipped locally and fails in CI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk")

ROOT = Path(__file__).resolve().parent.parent
PHOENIX = Path(os.environ.get("AGENT_GUARD_PHOENIX") or ROOT / ".venv-phoenix/bin/phoenix")
PRICES = {"acme-mini": {"input_cost_per_token": 4e-07, "output_cost_per_token": 1.6e-06,
                        "cache_read_input_token_cost": 1e-07},
          "acme-large": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
                         "cache_read_input_token_cost": 7.5e-07}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not PHOENIX.exists():
        message = (f"Phoenix is not installed at {PHOENIX}: python3 -m venv .venv-phoenix && "
                   ".venv-phoenix/bin/pip install 'arize-phoenix>=20,<21' (.ci/run does)")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    workdir = tmp_path_factory.mktemp("phoenix")
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "PHOENIX_WORKING_DIR": str(workdir), "PHOENIX_PORT": str(port),
           "PHOENIX_GRPC_PORT": str(grpc_port), "PHOENIX_HOST": "127.0.0.1",
           "PHOENIX_TELEMETRY_ENABLED": "false"}
    log = (workdir / "phoenix.log").open("wb")
    proc = subprocess.Popen([str(PHOENIX), "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"phoenix serve exited: {(workdir / 'phoenix.log').read_text()}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("phoenix serve did not answer /healthz in 120 s")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def graphql(url: str, query: str, **variables: Any) -> Any:
    body = httpx.post(url + "/graphql", json={"query": query, "variables": variables},
                      timeout=10).json()
    assert not body.get("errors"), body["errors"]
    return body["data"]


PROJECTS = """{ projects { edges { node { name
  costSummary { total { cost tokens } prompt { tokens } completion { tokens } }
  sessions(first: 10) { edges { node { sessionId numTraces
     costSummary { total { cost } } } } } } } } }"""


def project(url: str, name: str) -> dict[str, Any] | None:
    for edge in graphql(url, PROJECTS)["projects"]["edges"]:
        if edge["node"]["name"] == name:
            return edge["node"]
    return None


def wait_until_priced(url: str, models: list[str]) -> None:
    """Phoenix reads new model prices every few seconds and prices a span when it
    arrives: send a probe span per model until Phoenix gives it a cost."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider(resource=Resource({"openinference.project.name": "probe"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(url + "/v1/traces")))
    tracer = provider.get_tracer("probe")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for model in models:
            tracer.start_span("probe", attributes={
                "openinference.span.kind": "LLM", "llm.model_name": model,
                "llm.token_count.prompt": 1, "llm.token_count.completion": 1}).end()
        time.sleep(0.5)
        found = project(url, "probe")
        if found and found["costSummary"]["total"]["cost"]:
            # every model priced: the probe's cost covers one span per model
            spans = httpx.get(url + "/v1/projects/probe/spans", params={"limit": 1000},
                              timeout=10).json()["data"]
            if len(spans) >= len(models) and found["costSummary"]["total"]["tokens"] >= 2 * len(
                    models):
                provider.shutdown()
                return
    provider.shutdown()
    pytest.fail("Phoenix never priced the registered models")


AGENT = textwrap.dedent("""
    import json, sys
    from langchain.agents import create_agent
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from agent_guard import Guard, GuardCallbackHandler, Limits, GuardError
    from agent_guard.cache import ResultCache, cached_tool
    from agent_guard.pricing import PriceBook
    from agent_guard.routing import ModelRouter, when
    from agent_guard.telemetry import configure_otlp
    from agent_guard.testing import FakeOpenAIServer, FakeReply

    url, project, prices = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    telemetry = configure_otlp(url, project=project, metrics=False)
    records = []
    book = PriceBook.default().with_overrides(prices)
    guard = Guard(Limits(max_model_calls=3), prices=book, on_record=[records.append])

    @tool
    def lookup(order: str) -> str:
        \"\"\"Look up an order.\"\"\"
        return f"order {order}: shipped"

    call = FakeReply(tool_calls=[{"name": "lookup", "arguments": {"order": "A1"}}],
                     prompt_tokens=900, completion_tokens=40, cached_tokens=300)
    cache = ResultCache(ttl={"orders": 60})
    with FakeOpenAIServer([call]) as server:
        def model(name):
            return ChatOpenAI(model=name, base_url=server.base_url, api_key="x",
                              max_tokens=64)
        after_tool = when(lambda c: any(m.type == "tool" for m in c.messages), "after_tool")
        router = ModelRouter(tiers={"mini": model("acme-mini"), "large": model("acme-large")},
                             rules=[after_tool >> "mini"], default="large", guard=guard)
        agent = create_agent(router, [cached_tool(lookup, cache, "orders", cost_usd="0.002")],
                             name="support")
        refused = None
        try:
            agent.invoke({"messages": [("user", "where is A1?")]},
                         config={"callbacks": [GuardCallbackHandler(guard, telemetry=telemetry)],
                                 "metadata": {"user_id": "u-42", "team": "core",
                                              "feature": "orders"},
                                 "configurable": {"thread_id": "ticket-7"}})
        except GuardError as exc:
            refused = type(exc).__name__
    flushed = telemetry.flush()
    usage = guard.usage("ticket-7")
    print(json.dumps({
        "flushed": flushed, "refused": refused, "session_cost_nano": usage.cost_nano,
        "records": [{"kind": r.kind, "model": r.model, "tier": r.tier, "cost_nano": r.cost_nano,
                     "input": r.usage.input_tokens, "output": r.usage.output_tokens,
                     "cache_read": r.usage.cache_read_tokens, "outcome": r.outcome}
                    for r in records]}))
""")


def wait_for_spans(url: str, name: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    spans: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/v1/projects/{name}/spans", params={"limit": 1000},
                             timeout=10)
        if response.status_code == 200:
            spans = response.json()["data"]
            if len(spans) >= count:
                return spans
        time.sleep(0.25)
    pytest.fail(f"Phoenix has {len(spans)} spans of project {name}, expected {count}")


def test_a_guarded_agent_run_in_phoenix(phoenix: str) -> None:
    from agent_guard.pricing import PriceBook
    from agent_guard.telemetry.phoenix import register_prices

    book = PriceBook.default().with_overrides(PRICES)
    ids = register_prices(phoenix, book, list(PRICES))
    assert set(ids) == set(PRICES)
    assert register_prices(phoenix, book, list(PRICES)) == ids  # again: updated, not doubled
    wait_until_priced(phoenix, list(PRICES))

    out = subprocess.run([sys.executable, "-c", AGENT, phoenix, "support-bot",
                          json.dumps(PRICES)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    run = json.loads(out.stdout.strip().splitlines()[-1])
    assert run["flushed"] is True and run["refused"] == "StepLimitExceeded"
    assert "405" not in out.stderr and "failed" not in out.stderr  # no metrics sent
    models = [r for r in run["records"] if r["kind"] == "model"]
    tools = [r for r in run["records"] if r["kind"] == "tool"]
    assert [r["tier"] for r in models] == ["large", "mini", "mini"]  # routed
    assert len(tools) == 3

    # the tree: one AGENT root; 4 LLM spans (3 answered, 1 refused) and 3 TOOL spans under it
    spans = wait_for_spans(phoenix, "support-bot", 8)
    [root] = [s for s in spans if s["parent_id"] is None]
    assert root["span_kind"] == "AGENT" and root["name"] == "invoke_agent support"
    assert root["status_code"] == "ERROR"
    children = [s for s in spans if s is not root]
    assert all(s["parent_id"] == root["context"]["span_id"]
               and s["context"]["trace_id"] == root["context"]["trace_id"] for s in children)
    llm = sorted((s for s in children if s["span_kind"] == "LLM"), key=lambda s: s["start_time"])
    tool_spans = sorted((s for s in children if s["span_kind"] == "TOOL"),
                        key=lambda s: s["start_time"])
    assert len(llm) == 4 and len(tool_spans) == 3
    answered, refused = llm[:3], llm[3]
    assert refused["status_code"] == "ERROR"
    assert [e["name"] for e in refused["events"]] == ["agent_guard.refusal"]
    for span, record in zip(answered, models, strict=True):
        a = span["attributes"]
        assert a["llm.model_name"] == record["model"]
        assert a["llm.token_count.prompt"] == record["input"] == 900
        assert a["llm.token_count.completion"] == record["output"] == 40
        assert a["llm.token_count.prompt_details.cache_read"] == record["cache_read"] == 300
        assert a["agent_guard.tier"] == record["tier"]
    assert [s["attributes"]["agent_guard.cache.hit"] for s in tool_spans] == [
        False, True, True]
    assert all(s["attributes"]["tool.name"] == "lookup" for s in tool_spans)
    assert tool_spans[1]["attributes"]["agent_guard.cache.saved_usd"] == pytest.approx(0.002)
    # the user and the session on every span; team and feature as Phoenix metadata
    for span in spans:
        a = span["attributes"]
        assert a["user.id"] == "u-42" and a["session.id"] == "ticket-7", span["name"]
        assert a["metadata.team"] == "core" and a["metadata.feature"] == "orders"

    # Phoenix's own cost (from the registered prices) equals the ledger, per span too
    ledger = sum(r["cost_nano"] for r in models)
    assert ledger == run["session_cost_nano"] > 0
    found = project(phoenix, "support-bot")
    assert found is not None
    assert found["costSummary"]["total"]["cost"] == pytest.approx(ledger / 1e9, abs=1e-12)
    assert found["costSummary"]["prompt"]["tokens"] == 3 * 900
    assert found["costSummary"]["completion"]["tokens"] == 3 * 40
    [session] = [e["node"] for e in found["sessions"]["edges"]]
    assert session["sessionId"] == "ticket-7" and session["numTraces"] == 1
    assert session["costSummary"]["total"]["cost"] == pytest.approx(ledger / 1e9, abs=1e-12)
    for span, record in zip(answered, models, strict=True):
        data = graphql(phoenix, "query($id: ID!) { node(id: $id) { ... on Span { "
                       "costSummary { total { cost } } } } }", id=span["id"])
        assert data["node"]["costSummary"]["total"]["cost"] == pytest.approx(
            record["cost_nano"] / 1e9, abs=1e-12)


def test_the_phoenix_example_shows_the_ledgers_cost(phoenix: str) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "examples/phoenix/guarded_run.py")],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PHOENIX_URL": phoenix, "PYTHONPATH": str(ROOT),
                              "PHOENIX_PROJECT_NAME": "example"})
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("ledger:"))
    ledger, shown = (part.split("$")[1].split()[0] for part in line.split(";"))
    assert float(ledger) > 0 and float(shown) == pytest.approx(float(ledger), abs=1e-12)
