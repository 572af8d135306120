"""Paid tools in the same caps as model calls (issue 20).

An agent whose search tool costs $0.01 a call and loops (the real ``ChatOpenAI`` against
``FakeOpenAIServer``, scripted to ask for another search after every answer) stops at
the dollar cap with spent <= cap: on the callback, the middleware and the
``guarded_graph`` paths, sync and async, on a memory and a Redis ledger. Measured from
the outside: the tool counts its own runs, the server what it billed; the ledger must
hold exactly the tool runs at $0.01 plus at least what the server billed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from agent_guard import (
    BudgetExceeded,
    Budgets,
    Guard,
    GuardCallbackHandler,
    GuardMiddleware,
    Limits,
    StepLimitExceeded,
    guarded_graph,
)
from agent_guard.engine.records import CallRecord
from agent_guard.engine.usage import usd_to_nano
from agent_guard.finops import UsageStore, export_focus, focus_rows, report, validate_focus
from agent_guard.langchain import priced_tool
from agent_guard.ledger import Ledger, MemoryLedger
from agent_guard.pricing import PriceBook, ToolPrice, ToolUse
from agent_guard.testing import FakeOpenAIServer, FakeReply

from .conftest import REDIS_URL, require_redis
from .ledger_workers import (
    MODEL_CAP_USD,
    RACE_TIMEOUT_S,
    TOOL_USD,
    model_race,
    open_ledger,
    run_racing,
)

SESSION = "paid-tools"
SEARCH_USD = Decimal("0.01")
SEARCH_NANO = 10_000_000
CAP_USD = Decimal("0.10")
CAP_NANO = 100_000_000


@pytest.fixture
def ledger(memory_or_redis_ledger: Ledger) -> Ledger:
    return memory_or_redis_ledger


class Search:
    """A paid web search that counts its own runs (what the search API would bill)."""

    def __init__(self) -> None:
        self.runs = 0
        self._lock = threading.Lock()

        @tool
        def web_search(query: str) -> str:
            """Search the web."""
            with self._lock:
                self.runs += 1
            return json.dumps([f"result for {query}"])

        self.tool = web_search


def looping_server() -> FakeOpenAIServer:
    """Every answer asks for one more search (new arguments each time: no loop guard)."""
    n = itertools.count()

    def reply(body: dict[str, Any]) -> FakeReply:
        i = next(n)
        return FakeReply("", tool_calls=[{"name": "web_search", "arguments": {"query": f"q{i}"},
                                          "id": f"call_{i}"}], completion_tokens=20)

    return FakeOpenAIServer(reply)


def chat(server: FakeOpenAIServer) -> ChatOpenAI:
    return ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="test",
                      max_tokens=40, max_retries=0, http_async_client=httpx.AsyncClient())


def graph_of(model: ChatOpenAI, search: Any) -> StateGraph:
    bound = model.bind_tools([search])

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [bound.invoke(state["messages"])]}

    async def aagent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await bound.ainvoke(state["messages"])]}

    from langchain_core.runnables import RunnableLambda

    builder = StateGraph(MessagesState)
    builder.add_node("agent", RunnableLambda(agent, afunc=aagent))
    builder.add_node("tools", ToolNode([search]))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder


def run_agent(path: str, mode: str, guard: Guard, server: FakeOpenAIServer,
              search: Any) -> Any:
    """Run the looping agent on ``path`` until the guard stops it; what the run
    returned or raised."""
    inputs = {"messages": [("user", "research this forever")]}
    config: dict[str, Any] = {"recursion_limit": 200, "metadata": {"session_id": SESSION}}
    if path == "callback":
        runnable: Any = create_agent(chat(server), tools=[search])
        config["callbacks"] = [GuardCallbackHandler(guard, session_id=SESSION)]
    elif path == "middleware":
        runnable = create_agent(chat(server), tools=[search], middleware=[
            GuardMiddleware(guard, session_id=SESSION, on_exceed="end")])
    else:
        runnable = guarded_graph(graph_of(chat(server), search), guard=guard,
                                 session_id=SESSION, on_exceed="end")
    try:
        if mode == "sync":
            return runnable.invoke(inputs, config=config)
        return asyncio.run(runnable.ainvoke(inputs, config=config))
    except BudgetExceeded as exc:
        return exc


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("path", ["callback", "middleware", "guarded_graph"])
def test_a_looping_paid_search_stops_at_the_dollar_cap(ledger: Ledger, path: str,
                                                       mode: str) -> None:
    records: list[CallRecord] = []
    guard = Guard(Limits(max_cost_usd=CAP_USD), ledger=ledger, on_record=[records.append])
    search = Search()
    priced_tool(search.tool, ToolPrice(per_call_usd=SEARCH_USD, service="Tavily"))
    with looping_server() as server:
        outcome = run_agent(path, mode, guard, server, search.tool)
        billed = server.billed_nano(guard.prices)
    usage = guard.usage(SESSION)
    tool_records = [r for r in records if r.kind == "tool"]
    model_records = [r for r in records if r.kind == "model"]
    # the tool ran until the dollars ran out: never past them, and not stopped by anything
    # else (a count cap, an error)
    assert usage.cost_nano <= CAP_NANO
    assert usage.reserved_nano == 0
    assert search.runs == len(tool_records) == usage.tool_calls
    assert search.runs >= 8, (search.runs, outcome)
    assert CAP_NANO - usage.cost_nano < SEARCH_NANO + max(r.reserved_nano
                                                          for r in model_records)
    # the ledger holds the searches at their price and at least what the model billed
    tool_nano = sum(r.cost_nano for r in tool_records)
    assert tool_nano == search.runs * SEARCH_NANO
    assert all(r.reserved_nano == SEARCH_NANO and not r.usage_estimated
               and r.provider == "Tavily" for r in tool_records)
    model_nano = sum(r.cost_nano for r in model_records)
    assert usage.cost_nano == tool_nano + model_nano
    assert model_nano >= billed
    # the refusal named dollars
    if isinstance(outcome, BudgetExceeded):
        assert outcome.dimension == "usd_nano"
    else:
        text = " ".join(str(m.content) for m in outcome["messages"]
                        if isinstance(m, AIMessage | ToolMessage))
        assert "cap on cost" in text, text[-500:]


@pytest.mark.parametrize("declared", ["guard", "tool", "file", "tool_metadata_data"])
def test_a_price_declared_once_anywhere_is_charged(declared: str, tmp_path: Any) -> None:
    search = Search()
    prices = None
    tool_prices = None
    if declared == "guard":
        tool_prices = {"web_search": ToolPrice("0.01")}
    elif declared == "tool":
        priced_tool(search.tool, ToolPrice("0.01"))
    elif declared == "tool_metadata_data":
        search.tool.metadata = {"agent_guard_price": {"per_call_usd": "0.01"}}
    else:
        path = tmp_path / "prices.json"
        path.write_text(json.dumps({"tools": {"web_search": {"per_call_usd": "0.01"}}}))
        prices = PriceBook.bundled().with_overrides(path)
    guard = Guard(Limits(max_cost_usd=CAP_USD), prices=prices, tool_prices=tool_prices)
    with looping_server() as server:
        run_agent("callback", "sync", guard, server, search.tool)
    usage = guard.usage(SESSION)
    assert search.runs >= 8
    assert usage.cost_nano <= CAP_NANO


def test_a_refused_tool_never_runs_and_its_refusal_names_the_scope() -> None:
    guard = Guard(Budgets(Limits(max_cost_usd=1),
                          tool={"web_search": Limits(max_cost_usd="0.03", window="month")}),
                  tool_prices={"web_search": ToolPrice("0.01")})
    for _ in range(3):
        admission = guard.before_tool_call(SESSION, "web_search", {"query": "x"})
        guard.tool_call_done(SESSION, "web_search", admission=admission, result="[]")
    with pytest.raises(BudgetExceeded) as refused:
        guard.before_tool_call(SESSION, "web_search", {"query": "y"})
    assert refused.value.scope.startswith("tool:web_search@")
    assert "tool 'web_search' (month " in str(refused.value)
    assert guard.usage(SESSION).cost_nano == 3 * SEARCH_NANO
    assert guard.usage(SESSION).reserved_nano == 0


def test_reserved_at_the_worst_case_settled_at_the_actual_released_when_not_run() -> None:
    per_result = ToolPrice(per_unit_usd="0.001", units="results", max_units="arg:limit")
    guard = Guard(Limits(max_cost_usd=1), tool_prices={"search": per_result})
    admission = guard.before_tool_call(SESSION, "search", {"q": "a", "limit": 50})
    assert admission.reserved_nano == 50_000_000
    assert guard.usage(SESSION).reserved_nano == 50_000_000
    record = guard.tool_call_done(SESSION, "search", admission=admission,
                                  result=json.dumps(["r"] * 7))
    assert record.cost_nano == 7_000_000 and record.reserved_nano == 50_000_000
    assert guard.usage(SESSION).cost_nano == 7_000_000
    assert guard.usage(SESSION).reserved_nano == 0
    # a call that failed may have billed: its worst case, marked estimated
    admission = guard.before_tool_call(SESSION, "search", {"q": "b", "limit": 5})
    failed = guard.tool_call_done(SESSION, "search", admission=admission, outcome="error")
    assert failed.cost_nano == 5_000_000 and failed.usage_estimated
    # a call that certainly did not run is released, counts and all
    admission = guard.before_tool_call(SESSION, "search", {"q": "c", "limit": 5})
    guard.tool_call_not_run(admission)
    usage = guard.usage(SESSION)
    assert (usage.cost_nano, usage.reserved_nano, usage.tool_calls) == (12_000_000, 0, 2)
    # a cache hit answered without the paid call: $0, still one call
    admission = guard.before_tool_call(SESSION, "search", {"q": "d", "limit": 5})
    hit = guard.tool_call_done(SESSION, "search", admission=admission, outcome="cache_hit",
                               saved_nano=3)
    assert hit.cost_nano == 0 and guard.usage(SESSION).tool_calls == 3


def test_tool_prices_of_every_shape() -> None:
    seconds = ToolPrice(per_unit_usd="0.0001", units="seconds", max_units=300)
    assert seconds.worst_nano({}) == 30_000_000
    assert seconds.cost_nano(ToolUse({}, None, 12.5)) == 1_250_000
    images = ToolPrice(per_unit_usd="0.04", units="arg:n")
    assert images.worst_nano({"n": 3}) == images.cost_nano(ToolUse({"n": 3})) == 120_000_000
    pages = ToolPrice("0.001", per_unit_usd="0.002", units=lambda use: use.result["pages"],
                      max_units=lambda args: args["max_pages"])
    assert pages.worst_nano({"max_pages": 10}) == 21_000_000
    assert pages.cost_nano(ToolUse({"max_pages": 10}, {"pages": 4})) == 9_000_000
    per_1k = ToolPrice(per_unit_usd="0.005", units=lambda use: len(use.result) / 1000,
                       max_units=1)
    assert per_1k.cost_nano(ToolUse({}, ["x"] * 250)) == 1_250_000
    with pytest.raises(ValueError, match="max_units"):
        ToolPrice(per_unit_usd="0.01", units="results")
    with pytest.raises(ValueError, match="units"):
        ToolPrice(per_unit_usd="0.01")
    with pytest.raises(ValueError, match="must be >= 0"):
        ToolPrice("-1")
    with pytest.raises(ValueError, match="unknown fields"):
        PriceBook.bundled().with_overrides({"tools": {"t": {"per_call": 1}}})


def test_a_price_that_cannot_be_bounded_refuses_the_call_clearly() -> None:
    guard = Guard(Limits(max_cost_usd=1), tool_prices={
        "images": ToolPrice(per_unit_usd="0.04", units="arg:n")})
    with pytest.raises(ValueError, match="cannot be priced, so it is not run"):
        guard.before_tool_call(SESSION, "images", {"prompt": "a cat"})
    assert guard.usage(SESSION).tool_calls == 0


def test_the_report_and_focus_show_model_and_tool_spend_apart(tmp_path: Any) -> None:
    store = UsageStore.from_url(f"sqlite:///{tmp_path / 'usage.db'}")
    guard = Guard(Limits(max_cost_usd=CAP_USD), on_record=[store])
    search = Search()
    priced_tool(search.tool, ToolPrice(SEARCH_USD, service="Tavily"))
    with looping_server() as server:
        run_agent("callback", "sync", guard, server, search.tool)
    usage = guard.usage(SESSION)
    [row] = report(store, group_by=None)
    assert row["tool_cost_nano"] == search.runs * SEARCH_NANO
    assert row["model_cost_nano"] + row["tool_cost_nano"] == row["cost_nano"] == usage.cost_nano
    by_kind = {r["kind"]: r["cost_nano"] for r in report(store, group_by="kind")}
    assert by_kind == {"model": row["model_cost_nano"], "tool": row["tool_cost_nano"]}
    rows = focus_rows(store)
    tools = [r for r in rows if r["SkuId"] == "tool:web_search"]
    models = [r for r in rows if r["SkuId"] != "tool:web_search"]
    assert len(tools) == search.runs
    assert {r["ServiceName"] for r in tools} == {"Tavily"}
    assert {r["ServiceName"] for r in models} == {"OpenAI API"}
    total = sum(Decimal(r["BilledCost"]) for r in rows)
    assert total * 10**9 == usage.cost_nano
    assert sum(Decimal(r["BilledCost"]) for r in tools) == search.runs * SEARCH_USD
    path = tmp_path / "focus.csv"
    export_focus(store, path)
    assert validate_focus(path) == []


@pytest.mark.parametrize("store_url", ["memory://", "sqlite"])
def test_focus_rows_of_paid_tools_count_their_priced_units(tmp_path: Any, clock: Any,
                                                          store_url: str) -> None:
    """Each tool call's priced units are kept with its record, so its FOCUS row consumes
    them (3 results, 12.5 seconds, 2 images) instead of one call; a price per unit alone
    prices the row per unit (unit price x quantity = cost, exactly), a price with a
    part per call prices it as one request; a call charged its worst case consumes its
    bound. Model and tool rows still sum to the ledger, and the file validates."""
    from agent_guard.testing import ScriptedChatModel

    store = UsageStore.from_url(f"sqlite:///{tmp_path / 'usage.db'}"
                                if store_url == "sqlite" else store_url)
    guard = Guard(Limits(max_cost_usd=1), on_record=[store], clock=clock)

    @tool
    def search(query: str, max_results: int) -> list[str]:
        """Search."""
        return ["a", "b", "c"]

    @tool
    def pages(url: str) -> list[str]:
        """Fetch pages."""
        return ["p1", "p2", "p3"]

    @tool
    def sandbox(code: str) -> str:
        """Run code."""
        clock.advance(12.5)
        return "ok"

    @tool
    def draw(prompt: str, n: int) -> str:
        """Draw images."""
        return "drawn"

    @tool
    def crawl(url: str, max_pages: int) -> str:
        """Crawl a site."""
        raise RuntimeError("crawler died after billing")

    priced_tool(search, ToolPrice(per_unit_usd="0.000005", units="results",
                                  max_units="arg:max_results"))
    priced_tool(pages, ToolPrice("0.001", per_unit_usd="0.002", units="results",
                                 max_units=10))
    priced_tool(sandbox, ToolPrice(per_unit_usd="0.0001", units="seconds", max_units=300))
    priced_tool(draw, ToolPrice(per_unit_usd="0.04", units="arg:n"))
    priced_tool(crawl, ToolPrice(per_unit_usd="0.0001", units="results",
                                 max_units="arg:max_pages"))
    calls = [{"name": "search", "args": {"query": "q", "max_results": 10}, "id": "c1"},
             {"name": "pages", "args": {"url": "u"}, "id": "c2"},
             {"name": "sandbox", "args": {"code": "1"}, "id": "c3"},
             {"name": "draw", "args": {"prompt": "cat", "n": 2}, "id": "c4"},
             {"name": "crawl", "args": {"url": "u", "max_pages": 40}, "id": "c5"}]
    answers = iter([AIMessage("", tool_calls=[c]) for c in calls])
    agent = create_agent(ScriptedChatModel(model_name="gpt-4o", respond=lambda m: next(answers)),
                         [search, pages, sandbox, draw, crawl])
    with pytest.raises(RuntimeError, match="crawler died"):
        agent.invoke({"messages": [("user", "go")]}, config={
            "callbacks": [GuardCallbackHandler(guard, session_id=SESSION)]})
    store.flush()
    tools = {r.tool: r for r in store.records() if r.kind == "tool"}
    assert {t: (r.units, r.unit) for t, r in tools.items()} == {
        "search": (3, "results"), "pages": (3, "results"), "sandbox": (12.5, "seconds"),
        "draw": (2, "n"), "crawl": (40, "results")}
    rows = focus_rows(store)
    got = {r["SkuId"][5:]: (r["ConsumedQuantity"], r["ConsumedUnit"], r["PricingQuantity"],
                            r["PricingUnit"], r["ListUnitPrice"], r["BilledCost"])
           for r in rows if r["SkuId"].startswith("tool:")}
    assert got == {
        "search": ("3", "Results", "3", "Results", "0.000005", "0.000015000"),
        "pages": ("3", "Results", "1", "Requests", "0.007000000", "0.007000000"),
        "sandbox": ("12.5", "Seconds", "12.5", "Seconds", "0.0001", "0.001250000"),
        "draw": ("2", "N", "2", "N", "0.04", "0.080000000"),
        "crawl": ("40", "Results", "40", "Results", "0.0001", "0.004000000"),
    }
    usage = guard.usage(SESSION)
    assert sum(Decimal(r["BilledCost"]) for r in rows) * 10**9 == usage.cost_nano
    [total] = report(store, group_by=None)
    assert total["model_cost_nano"] + total["tool_cost_nano"] == usage.cost_nano
    path = tmp_path / "focus.csv"
    export_focus(store, path)
    assert validate_focus(path) == []
    store.close()


# -- a monthly per-model budget raced by two processes on Redis --------------------------------

NOV_30 = datetime(2026, 11, 30, 23, 0, tzinfo=UTC).timestamp()


@pytest.mark.timeout(RACE_TIMEOUT_S + 60)
def test_a_monthly_model_budget_raced_by_two_processes_holds_exactly(
        redis_url: str, redis_namespace: str) -> None:
    """Two processes of 8 threads call gpt-4o against a $0.01 monthly cap on that model
    (shared by every session), gpt-4o-mini (no model cap) and a $0.0005 tool. The model's
    month holds exactly what its admitted calls settled, at most the cap and within one
    worst case of it; the report and the FOCUS export split model and tool spend, and
    both sum to the ledger."""
    results = run_racing(model_race, [(redis_url, redis_namespace, f"p{p}", 8, 6, NOV_30, p)
                                      for p in range(2)])
    admitted = sum(a for a, _ in results)
    settled = sum(s for _, s in results)
    ledger = open_ledger(redis_url, redis_namespace)
    month = ledger.totals("model:gpt-4o@2026-11")
    cap = usd_to_nano(MODEL_CAP_USD)
    assert month.get_spent("usd_nano") == settled <= cap
    assert month.get_reserved("usd_nano") == 0
    assert month.get_spent("model_calls") == admitted < 2 * 8 * 6  # the cap stopped some
    worst = PriceBook.bundled().price("gpt-4o").worst_cost_nano(210, 100)
    assert cap - settled < worst  # reached, not undershot
    total = ledger.totals("global")
    tool_calls = 2 * 8 * 6
    assert total.get_spent("tool_calls") == tool_calls
    store = UsageStore.for_ledger(ledger)
    [row] = report(store, group_by=None)
    assert row["tool_cost_nano"] == tool_calls * usd_to_nano(TOOL_USD)
    assert row["model_cost_nano"] + row["tool_cost_nano"] == row["cost_nano"] \
        == total.get_spent("usd_nano")
    by_model = {r["model"]: r["cost_nano"] for r in report(store, group_by="model")}
    assert by_model["gpt-4o"] == settled
    rows = focus_rows(store)
    assert sum(Decimal(r["BilledCost"]) for r in rows) * 10**9 == total.get_spent("usd_nano")
    tool_rows = [r for r in rows if r["SkuId"] == "tool:web_search"]
    assert sum(Decimal(r["BilledCost"]) for r in tool_rows) * 10**9 == row["tool_cost_nano"]
    assert {r["ServiceName"] for r in tool_rows} == {"Tool web_search"}
    store.close()
    ledger.close()


def test_model_and_provider_budgets_come_from_the_call_not_its_metadata() -> None:
    """A provider budget caps every model of that provider; a model budget only its
    model; run metadata naming a model or provider selects nothing (its values are the
    call's own)."""
    guard = Guard(Budgets(Limits(max_cost_usd=1),
                          provider={"openai": Limits(max_model_calls=3, window="day")},
                          model={"gpt-4o": Limits(max_model_calls=1, window="day")}))
    with FakeOpenAIServer(["ok"]) as server:
        def ask(name: str, **metadata: str) -> None:
            ChatOpenAI(model=name, base_url=server.base_url, api_key="test", max_tokens=5,
                       max_retries=0).invoke("hi", config={
                           "callbacks": [GuardCallbackHandler(guard, session_id=SESSION)],
                           "metadata": metadata})

        ask("gpt-4o")
        with pytest.raises(StepLimitExceeded) as model_refused:
            ask("gpt-4o", model="gpt-4o-mini", provider="other")
        assert model_refused.value.scope.startswith("model:gpt-4o@")
        assert "model 'gpt-4o' (day " in str(model_refused.value)
        ask("gpt-4o-mini", model="gpt-4o")
        ask("gpt-4o-mini")
        with pytest.raises(StepLimitExceeded) as provider_refused:
            ask("gpt-4o-mini")
        assert provider_refused.value.scope.startswith("provider:openai@")
        assert len(server.requests) == 3
    assert guard.scope_usage("provider", "openai").model_calls == 3
    assert guard.scope_usage("model", "gpt-4o").model_calls == 1
    with pytest.raises(KeyError, match="no budget for scope kind 'model' value 'o1'"):
        guard.scope_usage("model", "o1")


def test_per_value_budgets_are_checked() -> None:
    with pytest.raises(TypeError, match="must be a Limits"):
        Budgets(model={"gpt-4o": 5})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="names no model"):
        Budgets(model={})
    guard = Guard(Budgets(team={"acme": Limits(max_tool_calls=1), "*": Limits(max_tool_calls=2)}))
    guard.before_tool_call("a", "t", attributes={"team": "acme"})
    with pytest.raises(StepLimitExceeded) as refused:
        guard.before_tool_call("b", "t", attributes={"team": "acme"})
    assert refused.value.scope == "team:acme"
    for _ in range(2):
        guard.before_tool_call("c", "t", attributes={"team": "globex"})
    with pytest.raises(StepLimitExceeded):
        guard.before_tool_call("c", "t", attributes={"team": "globex"})


def test_a_cached_paid_tool_keeps_its_price_and_a_hit_costs_nothing() -> None:
    from agent_guard.cache import ResultCache, cached_tool

    search = Search()
    priced_tool(search.tool, ToolPrice(SEARCH_USD))
    cached = cached_tool(search.tool, ResultCache(ttl={"web": 60}), "web")
    records: list[CallRecord] = []
    guard = Guard(Limits(max_cost_usd=1), on_record=[records.append])
    handler = GuardCallbackHandler(guard, session_id=SESSION)
    call = {"name": "web_search", "args": {"query": "same"}, "id": "c1", "type": "tool_call"}
    for _ in range(3):
        cached.invoke(call, config={"callbacks": [handler]})
    assert search.runs == 1
    assert [r.cost_nano for r in records] == [SEARCH_NANO, 0, 0]
    assert [r.outcome for r in records] == ["ok", "cache_hit", "cache_hit"]
    assert guard.usage(SESSION).cost_nano == SEARCH_NANO


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_long_running_paid_tool_keeps_its_hold_under_the_middleware(mode: str) -> None:
    """A sandbox may run longer than the lease: while the tool runs, the lease keeper
    renews its hold (checked from inside the tool, with every renewal made due)."""
    from agent_guard.engine.keeper import keeper

    renewed: list[int] = []

    @tool
    def sandbox(code: str) -> str:
        """Run code."""
        watches = [w for w in keeper._watches.values() if getattr(w.admission, "tool", None)
                   == "sandbox"]
        for w in watches:
            w.renew_at = 0.0
        keeper.check()
        renewed.extend(len(w.renewed) for w in watches)
        return "ok"

    priced_tool(sandbox, ToolPrice(per_unit_usd="0.0001", units="seconds", max_units=300))
    guard = Guard(Limits(max_cost_usd=1))
    answers = iter([AIMessage("", tool_calls=[{"name": "sandbox", "args": {"code": "1"},
                                               "id": "c1"}]), AIMessage("done")])
    from agent_guard.testing import ScriptedChatModel

    agent = create_agent(ScriptedChatModel(model_name="gpt-4o", respond=lambda m: next(answers)),
                         [sandbox], middleware=[GuardMiddleware(guard, session_id=SESSION)])
    inputs = {"messages": [("user", "run it")]}
    if mode == "sync":
        agent.invoke(inputs)
    else:
        asyncio.run(agent.ainvoke(inputs))
    assert renewed == [1]
    assert guard.usage(SESSION).reserved_nano == 0
    assert not [w for w in keeper._watches.values() if getattr(w.admission, "tool", None)]


def _clocked_ledger(kind: str, clock: Any, namespace: str) -> Ledger:
    if kind == "memory":
        return MemoryLedger(clock=clock)
    require_redis()
    from agent_guard.ledger.redis import RedisLedger

    return RedisLedger.from_url(REDIS_URL, namespace=namespace, clock=clock)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_long_running_paid_tool_keeps_its_hold_under_the_callback(
        kind: str, mode: str, clock: Any, redis_namespace: str) -> None:
    """A priced tool guarded by the callback handler runs twice as long as the lease (a
    fake clock moved 3 x 20 s against a 30 s lease, the lease keeper looking each time):
    its hold is still there, so a concurrent call that would pass the cap with it is
    refused, and the tool is settled at its price when it ends."""
    from agent_guard.engine.keeper import keeper
    from agent_guard.testing import ScriptedChatModel

    ledger = _clocked_ledger(kind, clock, redis_namespace)
    guard = Guard(Limits(max_cost_usd="0.20", lease_seconds=30), ledger=ledger, clock=clock)
    concurrent: list[Any] = []

    def another_call() -> None:
        try:
            concurrent.append(guard.before_tool_call(SESSION, "sandbox", {"code": "2"},
                                                     price=ToolPrice("0.12")))
        except BudgetExceeded as exc:
            concurrent.append(exc)

    @tool
    def sandbox(code: str) -> str:
        """Run code."""
        for _ in range(3):
            clock.advance(20)
            for w in list(keeper._watches.values()):
                if getattr(w.admission, "tool", None) == "sandbox":
                    w.renew_at = 0.0  # make its renewal due now
            keeper.check()
        worker = threading.Thread(target=another_call)
        worker.start()
        worker.join()
        return "ok"

    priced_tool(sandbox, ToolPrice("0.12"))
    answers = iter([AIMessage("", tool_calls=[{"name": "sandbox", "args": {"code": "1"},
                                               "id": "c1"}]), AIMessage("done")])
    agent = create_agent(ScriptedChatModel(model_name="gpt-4o", respond=lambda m: next(answers)),
                         [sandbox])
    records: list[CallRecord] = []
    guard.add_record_hook(records.append)
    config: Any = {"callbacks": [GuardCallbackHandler(guard, session_id=SESSION)]}
    inputs = {"messages": [("user", "run it")]}
    if mode == "sync":
        agent.invoke(inputs, config=config)
    else:
        asyncio.run(agent.ainvoke(inputs, config=config))
    assert len(concurrent) == 1 and isinstance(concurrent[0], BudgetExceeded), concurrent
    [record] = [r for r in records if r.kind == "tool"]
    assert (record.outcome, record.cost_nano) == ("ok", 120_000_000)
    usage = guard.usage(SESSION)
    assert usage.reserved_nano == 0 and usage.cost_nano <= 200_000_000
    assert not [w for w in keeper._watches.values() if getattr(w.admission, "tool", None)]
    ledger.close()


class Flaky:
    """A paid tool that fails inside (after it reached the API) on demand."""

    def __init__(self) -> None:
        self.runs = 0

        @tool
        def web_search(query: str) -> str:
            """Search the web."""
            self.runs += 1
            raise RuntimeError("search API: 502 after billing")

        self.tool = priced_tool(web_search, ToolPrice("0.01"))


def _agent_calling(path: str, guard: Guard, calls: list[dict[str, Any]], search: Any
                   ) -> tuple[Any, dict[str, Any]]:
    from agent_guard.testing import ScriptedChatModel

    answers = iter([*(AIMessage("", tool_calls=[c]) for c in calls), AIMessage("done")])
    model = ScriptedChatModel(model_name="gpt-4o", respond=lambda m: next(answers))
    if path == "callback":
        return create_agent(model, [search]), {
            "callbacks": [GuardCallbackHandler(guard, session_id=SESSION)]}
    return create_agent(model, [search], middleware=[
        GuardMiddleware(guard, session_id=SESSION)]), {}


def _run(agent: Any, config: dict[str, Any], mode: str) -> Any:
    inputs = {"messages": [("user", "search")]}
    if mode == "sync":
        return agent.invoke(inputs, config=config)
    return asyncio.run(agent.ainvoke(inputs, config=config))


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("path", ["callback", "middleware"])
def test_a_call_whose_arguments_fail_validation_is_not_charged(path: str, mode: str
                                                                ) -> None:
    """The model calls the paid search without its required argument: LangChain refuses
    the arguments before the tool runs (the agent answers the model with the validation
    error), so nothing is charged for it and its hold is released."""
    flaky = Flaky()
    records: list[CallRecord] = []
    guard = Guard(Limits(max_cost_usd=1), on_record=[records.append])
    agent, config = _agent_calling(path, guard, [
        {"name": "web_search", "args": {"q": "typo"}, "id": "c1"}], flaky.tool)
    out = _run(agent, config, mode)
    [answer] = [m for m in out["messages"] if isinstance(m, ToolMessage)]
    assert answer.status == "error" and "query" in str(answer.content)
    assert flaky.runs == 0
    assert [r for r in records if r.kind == "tool"] == []
    usage = guard.usage(SESSION)
    assert usage.reserved_nano == 0
    assert usage.cost_nano == sum(r.cost_nano for r in records if r.kind == "model")


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("path", ["callback", "middleware"])
def test_a_call_that_fails_inside_the_tool_is_charged_its_worst_case(path: str, mode: str
                                                                    ) -> None:
    flaky = Flaky()
    records: list[CallRecord] = []
    guard = Guard(Limits(max_cost_usd=1), on_record=[records.append])
    agent, config = _agent_calling(path, guard, [
        {"name": "web_search", "args": {"query": "x"}, "id": "c1"}], flaky.tool)
    with pytest.raises(RuntimeError, match="502"):
        _run(agent, config, mode)
    assert flaky.runs == 1
    [record] = [r for r in records if r.kind == "tool"]
    assert (record.outcome, record.cost_nano, record.usage_estimated) == \
        ("error", SEARCH_NANO, True)
    usage = guard.usage(SESSION)
    assert usage.reserved_nano == 0
    assert usage.cost_nano == sum(r.cost_nano for r in records)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_middleware_and_a_handler_on_one_ledger_charge_a_tool_call_once(mode: str
                                                                           ) -> None:
    from agent_guard.testing import ScriptedChatModel

    search = Search()
    priced_tool(search.tool, ToolPrice(SEARCH_USD))
    records: list[CallRecord] = []
    guard = Guard(Limits(max_cost_usd=1), on_record=[records.append])
    answers = iter([AIMessage("", tool_calls=[{"name": "web_search", "args": {"query": "x"},
                                               "id": "c1"}]), AIMessage("done")])
    agent = create_agent(ScriptedChatModel(model_name="gpt-4o", respond=lambda m: next(answers)),
                         [search.tool], middleware=[GuardMiddleware(guard, session_id=SESSION)])
    _run(agent, {"callbacks": [GuardCallbackHandler(guard, session_id=SESSION)]}, mode)
    assert search.runs == 1
    assert [r.cost_nano for r in records if r.kind == "tool"] == [SEARCH_NANO]
    usage = guard.usage(SESSION)
    assert usage.tool_calls == 1 and usage.reserved_nano == 0
    assert usage.cost_nano == sum(r.cost_nano for r in records)


def test_a_cancelled_paid_tool_under_the_callback_is_charged_its_worst_case() -> None:
    """An async priced tool whose task is cancelled while it runs may have reached the
    paid API: charged its worst case, marked estimated, and nothing stays reserved."""
    import contextlib

    from agent_guard.engine.keeper import keeper
    from agent_guard.testing import ScriptedChatModel

    records: list[CallRecord] = []
    guard = Guard(Limits(max_cost_usd=1), on_record=[records.append])

    async def main() -> None:
        started = asyncio.Event()

        @tool
        async def sandbox(code: str) -> str:
            """Run code."""
            started.set()
            await asyncio.Event().wait()  # runs until cancelled
            return "never"

        priced_tool(sandbox, ToolPrice("0.12"))
        answers = iter([AIMessage("", tool_calls=[{"name": "sandbox", "args": {"code": "1"},
                                                   "id": "c1"}])])
        agent = create_agent(ScriptedChatModel(model_name="gpt-4o",
                                               respond=lambda m: next(answers)), [sandbox])
        task = asyncio.create_task(agent.ainvoke(
            {"messages": [("user", "run it")]},
            config={"callbacks": [GuardCallbackHandler(guard, session_id=SESSION)]}))
        await started.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    keeper.check()  # a run that ended without its end callback is ended here
    [record] = [r for r in records if r.kind == "tool"]
    assert (record.cost_nano, record.usage_estimated) == (120_000_000, True)
    assert record.outcome in ("error", "aborted")
    usage = guard.usage(SESSION)
    assert usage.reserved_nano == 0
    assert usage.cost_nano == sum(r.cost_nano for r in records)
