"""The usage records store: rows, backends, the record hook, retention."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator

import pytest

from agent_guard import Guard, Limits
from agent_guard.engine.admission import ModelCall
from agent_guard.engine.records import CallRecord
from agent_guard.engine.usage import Usage
from agent_guard.finops import (
    MemoryUsageStore,
    RedisUsageStore,
    SQLiteUsageStore,
    UsageStore,
    record_to_row,
    row_to_record,
)
from agent_guard.finops.store import ROW_FIELDS, format_usd, parse_time
from agent_guard.ledger import MemoryLedger

from .conftest import REDIS_URL, require_redis

NOV_30 = 1796040000.0  # 2026-11-30T12:00:00Z


def make_record(i: int = 0, *, session: str = "s-1", started: float = NOV_30,
                **overrides: object) -> CallRecord:
    fields: dict[str, object] = dict(
        session=session, run_id=f"run-{i}", model="gpt-4o", provider="openai",
        usage=Usage(1000 + i, 50, 400, 10, 5), cost_nano=1_234_567 + i, reserved_nano=9_000_000,
        usage_estimated=False, outcome="ok", started_at=started, ended_at=started + 1.5,
        node="agent", tags=("a", "b,c"), tier="strong", route="role:execute",
        attributes={"team": "acme", "feature": "search", "region": "eu"},
        scopes=("session:s-1", "team:acme@2026-11"), record_id=f"rec-{session}-{i}",
    )
    fields.update(overrides)
    return CallRecord(**fields)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path, redis_namespace: str
          ) -> Iterator[UsageStore]:
    if request.param == "memory":
        s: UsageStore = UsageStore.from_url("memory://")
    elif request.param == "sqlite":
        s = UsageStore.from_url(f"sqlite:///{tmp_path / 'usage.db'}")
    else:
        require_redis()
        s = UsageStore.from_url(REDIS_URL, namespace=redis_namespace)
    yield s
    s.close()


def test_row_is_flat_json_with_exact_amounts_and_round_trips() -> None:
    record = make_record()
    row = record_to_row(record)
    assert tuple(row) == ROW_FIELDS
    assert all(v is None or isinstance(v, str | int | float | bool) for v in row.values())
    assert json.loads(json.dumps(row)) == row
    assert row["cost_nano"] == 1_234_567 and row["cost_usd"] == "0.001234567"
    assert row["reserved_usd"] == "0.009000000" and row["saved_usd"] == "0.000000000"
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"],
            row["cache_creation_tokens"], row["reasoning_tokens"]) == (1000, 50, 400, 10, 5)
    assert row["team"] == "acme" and row["user"] is None and row["day"] == "2026-11-30"
    assert json.loads(row["attributes"])["region"] == "eu"
    assert json.loads(row["tags"]) == ["a", "b,c"]
    assert row_to_record(row) == record


def test_format_usd_is_exact_and_never_uses_exponents() -> None:
    assert format_usd(0) == "0.000000000"
    assert format_usd(1) == "0.000000001"
    assert format_usd(12_345_000_000_001) == "12345.000000001"
    assert format_usd(-5) == "-0.000000005"


def test_store_keeps_rows_and_filters_by_call_start(store: UsageStore) -> None:
    day = 86400.0
    records = [make_record(i, started=NOV_30 - (3 - i) * day) for i in range(4)]
    for r in records:
        store.append(r)
    assert [r["record_id"] for r in store.rows()] == [r.record_id for r in records]
    assert store.records() == records
    # since inclusive, a bare-date until includes that whole day (UTC)
    picked = store.rows(since="2026-11-28", until="2026-11-29")
    assert [r["day"] for r in picked] == ["2026-11-28", "2026-11-29"]
    assert store.rows(since=NOV_30, until=NOV_30 + 1) == [record_to_row(records[3])]
    assert store.rows(until="2026-11-27T12:00:00Z") == []


def test_a_record_appended_twice_is_kept_once(store: UsageStore) -> None:
    record = make_record()
    store.append(record)
    store.extend([record, make_record(1)])
    assert [r["record_id"] for r in store.rows()] == [record.record_id, make_record(1).record_id]


def test_guard_records_reach_the_store_through_the_hook(store: UsageStore) -> None:
    guard = Guard(Limits(max_cost_usd=1), attributes={"team": "acme"})
    store.attach(guard)
    admission = guard.before_model_call(ModelCall(session="s", model="gpt-4o",
                                                  input_tokens=100, max_output_tokens=10))
    record = guard.after_model_call(admission, Usage(100, 10))
    guard.before_tool_call("s", "search", {"q": "x"})
    guard.tool_call_done("s", "search", outcome="cache_hit", saved_nano=5_000_000)
    rows = store.rows()
    assert [r["kind"] for r in rows] == ["model", "tool"]
    assert rows[0]["record_id"] == record.record_id
    assert rows[0]["cost_nano"] == guard.usage("s").cost_nano == record.cost_nano > 0
    assert rows[1]["outcome"] == "cache_hit" and rows[1]["saved_usd"] == "0.005000000"
    assert {r["team"] for r in rows} == {"acme"}


def test_a_failing_store_never_breaks_the_agent(tmp_path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    store = UsageStore.from_url(f"sqlite:///{tmp_path / 'usage.db'}")
    db = sqlite3.connect(tmp_path / "usage.db")
    db.execute("DROP TABLE ag_usage")  # someone broke the database under the store
    db.close()
    guard = Guard(Limits(max_cost_usd=1))
    guard.add_record_hook(store.append)
    with caplog.at_level(logging.ERROR, logger="agent_guard"):
        admission = guard.before_model_call(ModelCall(session="s", model="gpt-4o",
                                                      input_tokens=10, max_output_tokens=10))
        record = guard.after_model_call(admission, Usage(10, 10))
    assert record.cost_nano > 0 and guard.usage("s").cost_nano == record.cost_nano
    assert store.failed == 1
    assert "could not append a usage record" in caplog.text and "no such table" in caplog.text
    store.close()


def test_unreachable_redis_store_logs_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    store = UsageStore.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    with caplog.at_level(logging.ERROR, logger="agent_guard"):
        store.append(make_record())
    assert store.failed == 1 and "redis://127.0.0.1:1/0" in caplog.text
    store.close()


def test_background_appends_are_written_by_flush_and_close(tmp_path) -> None:
    path = tmp_path / "bg.db"
    store = UsageStore.from_url(f"sqlite:///{path}", background=True, batch_size=7)
    records = [make_record(i) for i in range(50)]
    for r in records:
        store.append(r)
    assert store.flush(10.0)
    assert len(store.rows()) == 50
    store.append(make_record(50))
    store.close()  # flushes
    reopened = UsageStore.from_url(f"sqlite:///{path}")
    assert len(reopened.rows()) == 51
    reopened.close()


def test_background_queue_full_drops_instead_of_blocking() -> None:
    class Slow(MemoryUsageStore):
        def _write(self, rows):  # type: ignore[no-untyped-def]
            time.sleep(0.05)
            super()._write(rows)

    store = Slow(background=True, max_queue=2, batch_size=1)
    for i in range(20):
        store.append(make_record(i))
    assert store.dropped > 0
    store.close()
    assert len(store.rows()) + store.dropped == 20


def test_sqlite_store_lives_in_the_ledgers_file(tmp_path) -> None:
    guard = Guard(Limits(max_cost_usd=1), f"sqlite:///{tmp_path / 'guard.db'}")
    store = UsageStore.for_ledger(guard.ledger).attach(guard)
    assert isinstance(store, SQLiteUsageStore)
    admission = guard.before_model_call(ModelCall(session="s", model="gpt-4o",
                                                  input_tokens=10, max_output_tokens=10))
    guard.after_model_call(admission, Usage(10, 10))
    db = sqlite3.connect(tmp_path / "guard.db")
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"ag_counters", "ag_usage"} <= tables
    indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"ag_usage_started", "ag_usage_session"} <= indexes
    (row,) = db.execute("SELECT row FROM ag_usage").fetchall()
    assert json.loads(row[0])["cost_nano"] == guard.usage("s").cost_nano
    db.close()
    store.close()
    guard.close()


def test_store_for_memory_and_redis_ledgers(redis_url: str, redis_namespace: str) -> None:
    assert isinstance(UsageStore.for_ledger(MemoryLedger()), MemoryUsageStore)
    from agent_guard.ledger.redis import RedisLedger

    ledger = RedisLedger.from_url(redis_url, namespace=redis_namespace)
    store = UsageStore.for_ledger(ledger)
    assert isinstance(store, RedisUsageStore)
    assert store.key == ledger.prefix + "usage" == f"ag:{{{redis_namespace}}}:usage"
    store.append(make_record())
    assert ledger.client.type(store.key) == b"stream"
    (entry,) = ledger.client.xrange(store.key)
    assert json.loads(entry[1][b"row"])["record_id"] == "rec-s-1-0"  # JSON, not a pickle
    # the same stream through a URL with ?namespace=
    again = UsageStore.from_url(f"{redis_url}?namespace={redis_namespace}")
    assert [r["record_id"] for r in again.rows()] == ["rec-s-1-0"]
    again.close()
    ledger.close()


def test_retention_prunes_old_rows(tmp_path) -> None:
    now = [NOV_30]
    for store in (MemoryUsageStore(retention_days=7, clock=lambda: now[0]),
                  SQLiteUsageStore(str(tmp_path / "r.db"), retention_days=7,
                                   clock=lambda: now[0])):
        store.append(make_record(0, started=NOV_30 - 10 * 86400))  # prunes on this append
        store.append(make_record(1, started=NOV_30 - 1 * 86400))
        assert [r["record_id"] for r in store.rows()] == ["rec-s-1-1"]
        now[0] += 30 * 86400
        assert store.prune() == 1 and store.rows() == []
        now[0] = NOV_30
        store.close()


def test_redis_retention_trims_the_stream_by_entry_time(redis_url: str,
                                                        redis_namespace: str) -> None:
    now = [time.time()]
    store = UsageStore.from_url(redis_url, namespace=redis_namespace, retention_days=1,
                                clock=lambda: now[0])
    assert isinstance(store, RedisUsageStore)
    store.extend([make_record(i) for i in range(3)])
    assert len(store.rows()) == 3
    now[0] += 2 * 86400  # two days later, every entry is older than a day
    assert store.prune() == 3
    assert store.rows() == []
    now[0] = time.time()
    store.append(make_record(9))  # XADD ... MINID ~ keeps the new entry
    assert [r["record_id"] for r in store.rows()] == ["rec-s-1-9"]
    store.close()


@pytest.mark.parametrize(("url", "message"), [
    ("guard.db", "a usage store is a URL"),
    ("ftp://host/x", "unknown usage store scheme 'ftp://'"),
    ("sqlite://relative.db", "sqlite:///relative/path.db"),
    ("sqlite:///", "names no file"),
    ("sqlite:////no/such/dir/u.db", "does not exist"),
])
def test_bad_store_urls_say_what_to_do(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UsageStore.from_url(url)


def test_bad_retention_and_dates_are_refused() -> None:
    with pytest.raises(ValueError, match="retention_days must be positive"):
        UsageStore.from_url("memory://", retention_days=0)
    with pytest.raises(ValueError, match="use YYYY-MM-DD"):
        parse_time("30/11/2026")
    assert parse_time("2026-11-30", end=True) == parse_time("2026-12-01")
    assert parse_time("2026-11-30T12:00:00Z") == NOV_30


def test_the_store_itself_is_a_record_hook() -> None:
    store = UsageStore.from_url("memory://")
    guard = Guard(Limits(max_cost_usd=1), on_record=[store])
    guard.before_tool_call("s", "search")
    record = guard.tool_call_done("s", "search")
    assert store.records() == [record]
    assert store  # an empty or full store is always truthy


def test_text_utf8_cannot_hold_is_escaped_not_dropped(store: UsageStore, tmp_path) -> None:
    """A lone surrogate (what surrogateescape makes of a byte that was not UTF-8) in a
    session or scope value: the guard admits the call on a SQLite ledger, every store
    keeps the record, and the FOCUS export writes it."""
    from agent_guard import Budgets, Guard, Limits
    from agent_guard.engine.admission import ModelCall
    from agent_guard.finops import export_focus

    odd = b"caf\xe9".decode("utf-8", "surrogateescape")
    records: list[CallRecord] = []
    guard = Guard(Budgets(session=Limits(max_cost_usd=1),
                          team=Limits(max_cost_usd=5, window="month")),
                  f"sqlite:///{tmp_path / 'ledger.db'}", attributes={"team": odd},
                  on_record=[records.append, store.append])
    admission = guard.before_model_call(ModelCall(session=odd, model="gpt-4o",
                                                  input_tokens=10, max_output_tokens=10))
    guard.after_model_call(admission, Usage(10, 5))
    assert guard.scope_usage("team", odd).cost_nano == records[0].cost_nano > 0
    [row] = store.rows()
    assert row["session"] == row["team"] == "caf\\udce9"
    assert store.failed == 0
    assert export_focus(store, tmp_path / "focus.csv") == 1
    guard.close()


def test_a_call_priced_by_its_response_model_is_not_unpriced() -> None:
    """Admitted under an alias the price book does not know, settled at the price of
    the model the provider says answered: the record is priced."""
    from agent_guard import Guard, Limits
    from agent_guard.engine.admission import ModelCall

    records: list[CallRecord] = []
    stated = {"input_cost_per_token": 1e-05, "output_cost_per_token": 4e-05}
    guard = Guard(Limits(max_cost_usd=1, unknown_price=stated), on_record=[records.append])
    admission = guard.before_model_call(ModelCall(session="s", model="my-alias",
                                                  input_tokens=100, max_output_tokens=10))
    guard.after_model_call(admission, Usage(100, 10), response_model="gpt-4o")
    assert records[0].cost_nano > 0 and records[0].unpriced is False
