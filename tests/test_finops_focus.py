"""FOCUS export: required columns, typed values, exact costs, and the validator itself."""

from __future__ import annotations

import csv
import json
import re
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest

from agent_guard import Guard
from agent_guard.engine.usage import Usage
from agent_guard.finops import FOCUS_COLUMNS, UsageStore, export_focus, focus_rows, validate_focus
from agent_guard.finops.focus import REQUIRED_COLUMNS

from .finops_agents import SESSIONS, big_limits, run_agents
from .test_finops_store import NOV_30, make_record

# FOCUS 1.0 mandatory columns, written out independently of the module's table
FOCUS_1_0_MANDATORY = {
    "BilledCost", "BillingAccountId", "BillingAccountName", "BillingCurrency",
    "BillingPeriodEnd", "BillingPeriodStart", "ChargeCategory", "ChargeClass",
    "ChargeDescription", "ChargePeriodEnd", "ChargePeriodStart", "ContractedCost",
    "EffectiveCost", "InvoiceIssuerName", "ListCost", "PricingQuantity", "PricingUnit",
    "ProviderName", "PublisherName", "ServiceCategory", "ServiceName",
}
DECIMALS = ("BilledCost", "ContractedCost", "EffectiveCost", "ListCost", "ListUnitPrice",
            "ContractedUnitPrice", "PricingQuantity", "ConsumedQuantity")
DATETIMES = ("BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd")


@pytest.fixture
def agent_store(tmp_path):
    guard = Guard(big_limits(), f"sqlite:///{tmp_path / 'guard.db'}")
    store = UsageStore.for_ledger(guard.ledger)
    runs = run_agents(guard, store)
    # one more call answered from a cache: zero cost, what it saved recorded
    from agent_guard.engine.admission import ModelCall

    admission = guard.before_model_call(ModelCall(session="t-1", model="gpt-4o",
                                                  provider="openai", input_tokens=500,
                                                  max_output_tokens=50,
                                                  attributes={"team": "acme"}))
    guard.after_model_call(admission, Usage(500, 40), cache_hit=True)
    yield guard, store, runs
    store.close()
    guard.close()


def read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def test_export_of_a_real_agent_run_is_valid_focus(agent_store, tmp_path) -> None:
    guard, store, _runs = agent_store
    out = tmp_path / "focus.csv"
    n = export_focus(store, out, billing_account_id="org-123")
    assert validate_focus(out) == []

    header, rows = read(out)
    model_records = [r for r in store.records() if r.kind == "model"]
    assert n == len(rows) == len(model_records)
    # independent checks: the FOCUS 1.0 mandatory set, value formats, exact money
    assert set(header) >= FOCUS_1_0_MANDATORY
    assert all(c.startswith("x_") for c in set(header) - {c.name for c in FOCUS_COLUMNS})
    for row in rows:
        for name in DECIMALS:
            assert re.fullmatch(r"-?\d+(\.\d+)?", row[name]), (name, row[name])
        for name in DATETIMES:
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", row[name])
        assert row["ChargePeriodStart"] < row["ChargePeriodEnd"] <= row["BillingPeriodEnd"]
        assert row["BillingPeriodStart"] <= row["ChargePeriodStart"]
        assert row["ChargeCategory"] == "Usage" and row["ChargeClass"] == ""
        assert row["ServiceCategory"] == "AI and Machine Learning"
        assert row["BillingCurrency"] == "USD" and row["BillingAccountId"] == "org-123"
        assert row["ConsumedUnit"] == "Tokens" and row["ProviderName"] == "OpenAI"
        assert row["BilledCost"] == row["EffectiveCost"] == row["ListCost"]
        assert Decimal(row["ListUnitPrice"]) * Decimal(row["PricingQuantity"]) == \
            Decimal(row["ListCost"])
        tags = json.loads(row["Tags"])
        assert {"session", "model", "team", "feature", "user"} <= set(tags) or \
            row["x_CallOutcome"] == "cache_hit"
    billed = sum((Decimal(r["BilledCost"]) for r in rows), Decimal(0))
    ledger = sum(guard.usage(s).cost_nano for s, *_ in SESSIONS)
    assert billed == Decimal(ledger) / 10**9  # exact: no float anywhere
    by_id = {r.record_id: r for r in model_records}
    for row in rows:
        record = by_id[row["x_AgentGuardRecordId"]]
        if record.outcome == "cache_hit":
            assert row["BilledCost"] == "0.000000000" and row["ConsumedQuantity"] == "0"
            assert Decimal(row["x_SavedCost"]) == Decimal(record.saved_nano) / 10**9 > 0
        else:
            assert int(row["ConsumedQuantity"]) == record.usage.total_tokens > 0
            tags = json.loads(row["Tags"])
            assert tags["node"] == "model" and tags["session"] == record.session
            assert tags["team"] == record.attributes["team"]


def test_failed_calls_and_tool_calls_are_not_charges() -> None:
    records = [make_record(0), make_record(1, outcome="error", usage=Usage(), cost_nano=0),
               make_record(2, kind="tool", tool="search", model="", usage=Usage(),
                           cost_nano=0)]
    rows = focus_rows(records)
    assert [r["x_AgentGuardRecordId"] for r in rows] == ["rec-s-1-0"]


def test_charge_period_stays_inside_the_billing_month() -> None:
    last_second = 1796083199.4  # 2026-11-30T23:59:59.4Z, the call runs into December
    (row,) = focus_rows([make_record(0, started=last_second, ended_at=last_second + 5)])
    assert row["ChargePeriodStart"] == "2026-11-30T23:59:59Z"
    assert row["ChargePeriodEnd"] == row["BillingPeriodEnd"] == "2026-12-01T00:00:00Z"
    (instant,) = focus_rows([make_record(0, started=NOV_30, ended_at=NOV_30)])
    assert instant["ChargePeriodEnd"] == "2026-11-30T12:00:01Z"  # end after start


def test_provider_comes_from_the_price_book_when_missing() -> None:
    (row,) = focus_rows([make_record(0, provider=None, model="claude-sonnet-4-5")])
    assert row["ProviderName"] == row["PublisherName"] == "Anthropic"


def test_module_spec_requires_what_focus_requires() -> None:
    assert set(REQUIRED_COLUMNS) >= FOCUS_1_0_MANDATORY
    by_name = {c.name: c for c in FOCUS_COLUMNS}
    assert by_name["BilledCost"].type == "Decimal" and not by_name["BilledCost"].nullable
    assert by_name["ChargePeriodStart"].type == "DateTime"
    assert "Usage" in by_name["ChargeCategory"].allowed
    assert by_name["Tags"].type == "KeyValue"


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize(("column", "value", "message"), [
    ("BilledCost", "1e-5", "not a decimal"),
    ("BilledCost", "$0.10", "not a decimal"),
    ("BilledCost", "", "must not be null"),
    ("ChargePeriodStart", "2026-11-30 12:00:00", "not a UTC date-time"),
    ("ChargePeriodStart", "2026-02-30T12:00:00Z", "not a real date"),
    ("ChargeCategory", "Usages", "not one of Usage"),
    ("ServiceCategory", "AI", "not one of"),
    ("Tags", "team=acme", "not JSON"),
    ("Tags", "[1]", "JSON object"),
    ("BillingCurrency", "usd", "ISO 4217"),
    ("ListUnitPrice", "0.5", "ListUnitPrice x PricingQuantity"),
    ("ConsumedUnit", "", "ConsumedUnit must not be null on a Usage row"),
    ("ChargePeriodEnd", "2026-11-30T11:00:00Z", "after ChargePeriodStart"),
    ("ServiceSubcategory", "Virtual Machines", "belongs to 'Compute', not 'AI and Machine"),
    ("ServiceSubcategory", "Whatever", "not a FOCUS service subcategory"),
])
def test_validator_catches_each_kind_of_problem(tmp_path, column: str, value: str,
                                                message: str) -> None:
    (good,) = focus_rows([make_record(0)])
    path = tmp_path / "bad.csv"
    _write(path, [{**good, column: value}])
    problems = validate_focus(path)
    assert problems and any(message in p for p in problems), problems


def test_validator_accepts_what_focus_allows_and_stops_at_short_rows(tmp_path) -> None:
    (good,) = focus_rows([make_record(0)])
    path = tmp_path / "ok.csv"
    _write(path, [{**good, "ConsumedQuantity": "1.05E3", "ServiceSubcategory": "AI Platforms"},
                  {**good, "ServiceCategory": "Compute", "ServiceSubcategory": "Containers"}])
    assert validate_focus(path) == []
    header = ",".join(good)
    short = ",".join(list(good.values())[:5])
    path.write_text(f"{header}\n{short}\n", encoding="utf-8")
    assert validate_focus(path) == ["line 2: fewer values than columns"]


def test_validator_reports_missing_and_unknown_columns(tmp_path) -> None:
    (good,) = focus_rows([make_record(0)])
    row = {k: v for k, v in good.items() if k != "BilledCost"}
    row["Colour"] = "red"
    path = tmp_path / "bad.csv"
    _write(path, [row])
    problems = validate_focus(path)
    assert "missing columns: BilledCost" in problems
    assert any("'Colour' is neither a FOCUS column nor custom" in p for p in problems)


def test_parquet_export_needs_pyarrow(tmp_path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        export_focus([make_record(0)], tmp_path / "out.parquet")


def test_parquet_export_with_pyarrow(tmp_path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out.parquet"
    assert export_focus([make_record(0), make_record(1)], out) == 2
    table = pq.read_table(out)
    assert set(REQUIRED_COLUMNS) <= set(table.column_names)
    assert sum(table.column("BilledCost").to_pylist()) == Decimal("0.002469135")
    # typed columns, and the same values as the CSV export of the same records
    import pyarrow as pa

    assert table.schema.field("BilledCost").type == pa.decimal128(38, 9)
    start_type = table.schema.field("ChargePeriodStart").type
    assert pa.types.is_timestamp(start_type) and start_type.tz == "UTC"  # Parquet: ms
    assert table.schema.field("x_InputTokens").type == pa.int64()
    export_focus([make_record(0), make_record(1)], tmp_path / "out.csv")
    assert validate_focus(tmp_path / "out.csv") == []
    with (tmp_path / "out.csv").open(newline="", encoding="utf-8") as fh:
        csv_rows = list(csv.DictReader(fh))
    for csv_row, pq_row in zip(csv_rows, table.to_pylist(), strict=True):
        for name, text in csv_row.items():
            value = pq_row[name]
            if value is None:
                assert text == "", name
            elif isinstance(value, datetime):
                assert value.strftime("%Y-%m-%dT%H:%M:%SZ") == text, name
            else:
                assert str(value) == text or Decimal(text) == value, name


def test_bad_export_options() -> None:
    with pytest.raises(ValueError, match="ISO 4217"):
        focus_rows([], currency="dollars")
    with pytest.raises(ValueError, match="billing_account_id must not be empty"):
        focus_rows([], billing_account_id="")
