"""Reports: grouping, filters, redundancy, and totals that equal the ledger's to the nano-dollar."""

from __future__ import annotations

import sys
import tempfile
import types
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_guard import Budgets, Guard, Limits
from agent_guard.engine.admission import ModelCall
from agent_guard.engine.usage import Usage
from agent_guard.finops import UsageStore, report, to_dataframe, totals
from agent_guard.finops.report import REPORT_COLUMNS
from agent_guard.finops.store import record_to_row

from .test_finops_store import NOV_30, make_record

DAY = 86400.0


def sample_rows() -> list[dict]:
    r = []
    r.append(record_to_row(make_record(0, session="a", cost_nano=3_000, tier="cheap")))
    r.append(record_to_row(make_record(1, session="a", cost_nano=7_000, tier="strong")))
    # same session/model/node and identical token counts: a paid duplicate
    r.append(record_to_row(make_record(1, session="a", cost_nano=7_000, tier="strong",
                                       record_id="dup", started=NOV_30 + 5)))
    r.append(record_to_row(make_record(2, session="b", cost_nano=0, saved_nano=9_000,
                                       outcome="cache_hit", started=NOV_30 + DAY,
                                       attributes={"team": "globex", "user": "ann"})))
    r.append(record_to_row(make_record(3, session="b", kind="tool", tool="search", model="",
                                       usage=Usage(), cost_nano=0, tier=None,
                                       started=NOV_30 + DAY,
                                       attributes={"team": "globex", "user": "ann"})))
    r.append(record_to_row(make_record(4, session="c", cost_nano=1, outcome="error",
                                       usage=Usage(), tier=None, started=NOV_30 + 2 * DAY,
                                       attributes={})))
    return r


def test_group_by_team_sums_exactly_and_orders_by_cost() -> None:
    rows = report(sample_rows(), "team")
    assert [r["team"] for r in rows] == ["acme", None, "globex"]
    acme = rows[0]
    assert acme["cost_nano"] == 17_000 and acme["cost_usd"] == "0.000017000"
    assert acme["calls"] == acme["model_calls"] == 3 and acme["sessions"] == 1
    assert acme["cost_per_call_usd"] == "0.000005667"  # 17000 / 3 nano, rounded half-even
    assert acme["tiers"] == {"strong": 2, "cheap": 1}
    assert acme["routing_mix"] == {"strong": 0.6667, "cheap": 0.3333}
    assert acme["duplicate_calls"] == 1 and acme["duplicate_cost_usd"] == "0.000007000"
    globex = rows[2]
    assert globex["calls"] == 2 and globex["tool_calls"] == 1
    assert globex["cache_hits"] == 1 and globex["cache_hit_rate"] == 0.5
    assert globex["saved_usd"] == "0.000009000"
    assert globex["redundant_calls"] == 1 and globex["redundant_share"] == 0.5
    assert set(REPORT_COLUMNS) <= set(acme)


def test_totals_day_trend_top_and_where() -> None:
    rows = sample_rows()
    t = totals(rows)
    assert t["cost_nano"] == sum(r["cost_nano"] for r in rows) == 17_001
    assert t["calls"] == 6 and t["errors"] == 1 and t["sessions"] == 3
    assert t["input_tokens"] == 1000 + 1001 * 2 + 1002  # tool and failed calls have none
    days = report(rows, "day")
    assert [d["day"] for d in days] == ["2026-11-30", "2026-12-01", "2026-12-02"]
    assert [d["cost_nano"] for d in days] == [17_000, 0, 1]
    assert [r["session"] for r in report(rows, "session", top=1)] == ["a"]
    only = report(rows, ("team", "model"), where={"team": ["acme", "globex"], "kind": "model"})
    assert [(r["team"], r["model"], r["calls"]) for r in only] == [
        ("acme", "gpt-4o", 3), ("globex", "gpt-4o", 1)]
    assert report(rows, (), where={"team": None})[0]["sessions"] == 1
    assert report(rows, "attr:region", where={"attr:region": "eu"})[0]["calls"] == 3
    assert report(rows, "user", since="2026-12-01", until="2026-12-01")[0]["user"] == "ann"


def test_empty_input_gives_zero_totals() -> None:
    t = totals([])
    assert t["calls"] == 0 and t["cost_usd"] == "0.000000000"
    assert t["cost_per_call_usd"] is None and t["first_at"] is None
    assert report([], "team") == []


def test_bad_keys_dates_and_top_say_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"unknown report key 'colour'; use one of: session"):
        report([], "colour")
    with pytest.raises(ValueError, match="unknown report key 'teem'"):
        report([], "team", where={"teem": "acme"})
    with pytest.raises(ValueError, match="since '2026-13-01' is not a date: use YYYY-MM-DD"):
        report([], "team", since="2026-13-01")
    with pytest.raises(ValueError, match="top must be a positive integer"):
        report([], "team", top=0)


def test_to_dataframe_needs_pandas_only_when_called(monkeypatch) -> None:
    rows = report(sample_rows(), "team")
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        to_dataframe(rows)
    captured = {}
    fake = types.ModuleType("pandas")
    fake.DataFrame = lambda data, columns: captured.update(data=data, columns=columns) or "df"
    monkeypatch.setitem(sys.modules, "pandas", fake)
    assert to_dataframe(rows) == "df"
    assert captured["data"] == rows and captured["columns"][:2] == ["team", "calls"]


def test_to_dataframe_with_real_pandas() -> None:
    pd = pytest.importorskip("pandas")
    df = to_dataframe(report(sample_rows(), "team"))
    assert isinstance(df, pd.DataFrame) and int(df["cost_nano"].sum()) == 17_001


# -- totals equal the ledger's, to the nano-dollar ---------------------------------------------

# what the guard reserves and settles a model without a price at (Limits.unknown_price)
STATED_PRICE = {"input_cost_per_token": 1e-05, "output_cost_per_token": 4e-05}
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet-20241022", "o3-mini", "no-such-model")
model_call = st.fixed_dictionaries({
    "kind": st.just("model"),
    "session": st.sampled_from(("s1", "s2", "s3")),
    "team": st.sampled_from(("acme", "globex", None)),
    "model": st.sampled_from(MODELS),
    "input": st.integers(0, 50_000),
    "cached": st.floats(0, 1),
    "output": st.integers(0, 4_000),
    "reasoning": st.floats(0, 1),
    "outcome": st.sampled_from(("ok", "ok", "ok", "estimated", "error", "aborted",
                                "cache_hit")),
    "tier": st.sampled_from(("cheap", "strong", None)),
    "advance": st.sampled_from((0.0, 1.0, 3600.0, DAY)),
})
tool_call = st.fixed_dictionaries({
    "kind": st.just("tool"),
    "session": st.sampled_from(("s1", "s2", "s3")),
    "team": st.sampled_from(("acme", "globex", None)),
    "outcome": st.sampled_from(("ok", "cache_hit")),
    "advance": st.just(0.0),
})


def _run(ops: list[dict], ledger: str, store: UsageStore) -> Guard:
    now = [NOV_30]
    guard = Guard(Budgets(session=Limits(max_cost_usd=10**6, unknown_price=STATED_PRICE),
                          team=Limits(max_cost_usd=10**6, window="day")),
                  ledger=ledger, clock=lambda: now[0])
    store.attach(guard)
    for op in ops:
        now[0] += op["advance"]
        attrs = {"team": op["team"]} if op["team"] else {}
        if op["kind"] == "tool":
            guard.before_tool_call(op["session"], "search", attributes=attrs)
            guard.tool_call_done(op["session"], "search", outcome=op["outcome"],
                                 saved_nano=1000 if op["outcome"] == "cache_hit" else 0,
                                 attributes=attrs)
            continue
        admission = guard.before_model_call(ModelCall(
            session=op["session"], model=op["model"], input_tokens=op["input"],
            max_output_tokens=op["output"] or 1, tier=op["tier"], attributes=attrs))
        cached = int(op["input"] * op["cached"])
        usage = Usage(op["input"], op["output"], cached, 0, int(op["output"] * op["reasoning"]))
        if op["outcome"] in ("ok", "cache_hit"):
            guard.after_model_call(admission, usage, cache_hit=op["outcome"] == "cache_hit")
        elif op["outcome"] == "estimated":
            guard.after_model_call(admission, None, output_tokens=op["output"])
        else:
            guard.model_call_failed(admission, output_tokens=op["output"]
                                    if op["outcome"] == "aborted" else 0)
    return guard


def _check_against_ledger(guard: Guard, store: UsageStore, ops: list[dict]) -> None:
    sessions = report(store, "session")
    ledger_total = 0
    for s in ("s1", "s2", "s3"):
        spent = guard.usage(s)
        ledger_total += spent.cost_nano
        mine = [r for r in sessions if r["session"] == s]
        assert (mine[0]["cost_nano"] if mine else 0) == spent.cost_nano
        settled = report(store, (), where={"session": s, "outcome": ["ok", "aborted"],
                                           "kind": "model"})[0]
        assert settled["input_tokens"] == spent.input_tokens
        assert settled["output_tokens"] == spent.output_tokens
        assert settled["cache_read_tokens"] == spent.cached_tokens
        assert settled["reasoning_tokens"] == spent.reasoning_tokens
        assert settled["model_calls"] == spent.model_calls
    t = totals(store)
    assert t["cost_nano"] == ledger_total
    assert t["calls"] == len(ops)
    # windowed team budgets: a (team, day) group is exactly that day's team scope
    for r in report(store, ("team", "day"), where={"kind": "model"}):
        if r["team"] is None:
            continue
        at = datetime.fromisoformat(f"{r['day']}T12:00:00+00:00").timestamp()
        assert r["cost_nano"] == guard.scope_usage("team", r["team"], at=at).cost_nano


CALLS = st.lists(st.one_of(model_call, model_call, tool_call), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(ops=CALLS)
def test_report_totals_equal_the_memory_ledger_exactly(ops: list[dict]) -> None:
    store = UsageStore.from_url("memory://")
    guard = _run(ops, "memory://", store)
    _check_against_ledger(guard, store, ops)


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(ops=CALLS)
def test_report_totals_equal_the_sqlite_ledger_exactly(ops: list[dict]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'guard.db'}"
        store = UsageStore.for_ledger(url)
        guard = _run(ops, url, store)
        _check_against_ledger(guard, store, ops)
        store.close()
        guard.close()


def test_reports_follow_the_budgets_time_zone() -> None:
    """A call at 23:30 UTC on Nov 30 is December in Paris: with tz= the report's months,
    days and bare-date filters agree with a Paris-time budget's period."""
    from datetime import UTC
    from zoneinfo import ZoneInfo

    late = datetime(2026, 11, 30, 23, 30, tzinfo=UTC).timestamp()
    records: list = []
    guard = Guard(Budgets(session=Limits(), team=Limits(max_cost_usd=5, window="month"),
                          timezone="Europe/Paris"),
                  attributes={"team": "acme"}, clock=lambda: late, on_record=[records.append])
    admission = guard.before_model_call(ModelCall(session="s", model="gpt-4o-mini",
                                                  input_tokens=100, max_output_tokens=10))
    guard.after_model_call(admission, Usage(100, 10))
    assert "team:acme@2026-12" in records[0].scopes
    assert [r["month"] for r in report(records, "month")] == ["2026-11"]  # UTC by default
    paris = report(records, ("team", "month"), tz="Europe/Paris")
    assert [(r["team"], r["month"]) for r in paris] == [("acme", "2026-12")]
    assert paris[0]["cost_nano"] == guard.scope_usage("team", "acme").cost_nano > 0
    assert totals(records, since="2026-12-01", tz="Europe/Paris")["calls"] == 1
    assert totals(records, since="2026-12-01")["calls"] == 0
    assert totals(records, until="2026-11-30", tz=ZoneInfo("Europe/Paris"))["calls"] == 0
    assert totals(records, since="20261201", tz="Europe/Paris")["calls"] == 1
    with pytest.raises(ValueError, match="unknown time zone"):
        report(records, "day", tz="Nowhere/Special")
