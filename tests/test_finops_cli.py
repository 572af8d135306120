"""`agent-guard report` and `agent-guard export` on stores filled by real guarded agent runs."""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal

import pytest
from typer.testing import CliRunner

from agent_guard import Guard
from agent_guard.cli import app
from agent_guard.finops import UsageStore, validate_focus
from agent_guard.finops.store import format_usd

from .finops_agents import SESSIONS, big_limits, run_agents

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), terminal_width=220)


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory) -> tuple[str, dict[str, int]]:
    path = tmp_path_factory.mktemp("cli") / "guard.db"
    guard = Guard(big_limits(), f"sqlite:///{path}")
    store = UsageStore.for_ledger(guard.ledger)
    run_agents(guard, store)
    spent = {s: guard.usage(s).cost_nano for s, *_ in SESSIONS}
    store.close()
    guard.close()
    return f"sqlite:///{path}", spent


def test_report_table_shows_every_section(sqlite_store) -> None:
    url, spent = sqlite_store
    result = invoke("report", "--store", url)
    assert result.exit_code == 0, result.output
    out = result.output
    for title in ("usage (all time)", "cost by model", "cost by team", "cost by user",
                  "cost by feature", "cost by node", "top 3 sessions by cost",
                  "trend by day (UTC)", "cost per model call", "cached input tokens",
                  "reasoning tokens", "saved by caches", "redundant share", "routing mix"):
        assert title in out, title
    total = Decimal(sum(spent.values())) / 10**9
    assert f"${total:,.6f}" in out
    assert "gpt-4o-mini" in out and "globex" in out and "jane" in out


def test_report_json_totals_equal_the_ledger(sqlite_store) -> None:
    url, spent = sqlite_store
    result = invoke("report", "--store", url, "--format", "json", "--by", "team,model")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["totals"]["cost_nano"] == sum(spent.values())
    assert {r["session"]: r["cost_nano"] for r in data["top_sessions"]} == spent
    groups = data["groups"]["team,model"]
    assert {(g["team"], g["model"]) for g in groups if g["model"]} == {
        ("acme", "gpt-4o"), ("acme", "gpt-4o-mini"), ("globex", "gpt-4o")}
    assert [d["day"] for d in data["by_day"]] == [data["by_day"][0]["day"]]


def test_report_csv_with_where_and_since(sqlite_store) -> None:
    url, spent = sqlite_store
    result = invoke("report", "--store", url, "--by", "session", "--where", "team=acme",
                    "--where", "kind=model", "--since", "2000-01-01", "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert {r["session"]: int(r["cost_nano"]) for r in rows} == {
        "t-1": spent["t-1"], "t-2": spent["t-2"]}
    assert json.loads(rows[0]["tiers"]) == {"none": int(rows[0]["model_calls"])}
    empty = invoke("report", "--store", url, "--until", "2000-01-01")
    assert empty.exit_code == 0 and "no calls recorded" in empty.output


def test_export_writes_valid_focus(sqlite_store, tmp_path) -> None:
    url, spent = sqlite_store
    out = tmp_path / "focus.csv"
    result = invoke("export", "--store", url, "--focus", str(out),
                    "--billing-account", "org-42")
    assert result.exit_code == 0, result.output
    assert "validated" in result.output
    assert validate_focus(out) == []
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert sum(Decimal(r["BilledCost"]) for r in rows) == Decimal(sum(spent.values())) / 10**9
    assert {r["BillingAccountId"] for r in rows} == {"org-42"}
    assert f"BilledCost total ${format_usd(sum(spent.values()))}" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["report", "--store", "guard.db"], "a usage store is a URL"),
    (["report", "--store", "ftp://x"], "unknown usage store scheme"),
    (["report", "--store", "sqlite:///no-such-file.db"], "does not exist"),
    (["report", "--store", "memory://", "--by", "colour"], "unknown report key 'colour'"),
    (["report", "--store", "memory://", "--since", "yesterday"], "use YYYY-MM-DD"),
    (["report", "--store", "memory://", "--where", "team"], "must be KEY=VALUE"),
    (["report", "--store", "memory://", "--format", "xml"], "table, json or csv"),
    (["report", "--store", "redis://127.0.0.1:1/0"], "cannot read the usage store"),
    (["export", "--store", "memory://", "--focus", "/no/such/dir/f.csv"], "does not exist"),
    (["export", "--store", "memory://", "--focus", "/tmp"], "cannot write /tmp"),
    (["report", "--store", "memory://", "--tz", "Mars/Olympus"], "unknown time zone"),
    (["report", "--store", "redis://127.0.0.1:1/0?password=hunter2"],
     "cannot read the usage store"),
])
def test_bad_input_gets_a_clear_error(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "hunter2" not in result.output and "Traceback" not in result.output


def test_an_empty_csv_report_is_headed_by_its_keys() -> None:
    result = invoke("report", "--store", "memory://", "--by", "team,model", "--format", "csv")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("team,model,calls,")


def test_report_and_export_on_redis(redis_url: str, redis_namespace: str, tmp_path) -> None:
    from agent_guard.ledger.redis import RedisLedger

    guard = Guard(big_limits(), RedisLedger.from_url(redis_url, namespace=redis_namespace))
    store = UsageStore.for_ledger(guard.ledger)
    run_agents(guard, store)
    spent = sum(guard.usage(s).cost_nano for s, *_ in SESSIONS)
    url = f"{redis_url}?namespace={redis_namespace}"
    result = invoke("report", "--store", url, "--format", "json", "--by", "feature")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["totals"]["cost_nano"] == spent
    assert {g["feature"] for g in data["groups"]["feature"]} == {"support", "search"}
    table = invoke("report", "--store", redis_url, "--namespace", redis_namespace)
    assert table.exit_code == 0 and "cost by feature" in table.output
    out = tmp_path / "focus.csv"
    exported = invoke("export", "--store", url, "--focus", str(out))
    assert exported.exit_code == 0, exported.output
    assert validate_focus(out) == []
    store.close()
    guard.close()
