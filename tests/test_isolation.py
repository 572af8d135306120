"""Isolation: names stay in their key space, secrets and prompts stay out of what we emit."""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_openai import ChatOpenAI
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent_guard import (
    Budgets,
    Guard,
    GuardCallbackHandler,
    LedgerUnavailable,
    Limits,
    StepLimitExceeded,
)
from agent_guard.ledger import ScopeCaps
from agent_guard.ledger.redis import RedisLedger
from agent_guard.ledger.sqlite import SQLiteLedger
from agent_guard.telemetry import GuardTelemetry
from agent_guard.testing import FakeOpenAIServer, FakeReply

API_KEY = "sk-proj-SECRETSECRETSECRET0123456789"
PROMPT = "my card number is 4111-1111-1111-1111, the vault code is swordfish"
HOSTILE = ["a}b", "{x}", "*", "a:b", "x@2026-11", "name\nwith\nlines",
           "'; DROP TABLE ag_counters;--", "%41", "s\x00null",
           "../../etc", "ünïcødé 🧨", " ", "session:other"]


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(replies=[FakeReply(content="Done.", prompt_tokens=900,
                                             completion_tokens=40)]) as srv:
        yield srv


def test_no_api_key_or_prompt_in_records_spans_metrics_or_errors(
        server: FakeOpenAIServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    telemetry = GuardTelemetry(provider, MeterProvider(metric_readers=[reader]))
    guard = Guard(Budgets(session=Limits(max_model_calls=1), team=Limits(max_cost_usd=1)),
                  attributes={"team": "acme"}, on_threshold=[telemetry.on_threshold])
    records = []
    guard.add_record_hook(records.append)
    handler = GuardCallbackHandler(guard, session_id="s", telemetry=telemetry)
    llm = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key=API_KEY,
                     max_tokens=50, max_retries=0)
    answer = llm.invoke(PROMPT, config={"callbacks": [handler]})
    with pytest.raises(StepLimitExceeded) as refused:
        llm.invoke(PROMPT, config={"callbacks": [handler]})
    provider.force_flush()

    emitted = [repr(r) for r in records]
    emitted += [str(refused.value), repr(refused.value)]
    emitted += [repr(dict(s.attributes or {})) + repr([(e.name, dict(e.attributes or {}))
                                                       for e in s.events])
                for s in exporter.get_finished_spans()]
    emitted.append(reader.get_metrics_data().to_json())
    emitted += [r.getMessage() for r in caplog.records]
    emitted.append(repr(answer.usage_metadata) + repr(answer.response_metadata))
    assert len(exporter.get_finished_spans()) >= 2 and records
    blob = "\n".join(emitted)
    for secret in ("SECRETSECRET", "swordfish", "4111-1111"):
        assert secret not in blob
    assert server.requests[0]["messages"][0]["content"] == PROMPT  # it did reach the model


def test_a_redis_password_never_appears_in_errors_or_reprs() -> None:
    ledger = RedisLedger("redis://:hunter2-pass@127.0.0.1:1/0", socket_connect_timeout=0.2)
    guard = Guard(Limits(max_cost_usd=1), ledger=ledger)
    with pytest.raises(LedgerUnavailable) as exc:
        guard.usage("s")
    assert "hunter2" not in str(exc.value) + repr(ledger) + repr(exc.value.args)
    assert "127.0.0.1" in str(exc.value)


@pytest.mark.usefixtures("redis_url")
def test_hostile_names_stay_in_their_redis_namespace(redis_url: str,
                                                     redis_namespace: str) -> None:
    ledger = RedisLedger(redis_url, namespace=redis_namespace + "}{*")
    others = RedisLedger(redis_url, namespace=redis_namespace + "-other")
    for i, name in enumerate(HOSTILE):
        assert ledger.charge([ScopeCaps(f"session:{name}", {"steps": 100})], {"steps": i + 1}) \
            is None
    others.charge([ScopeCaps("session:*", {})], {"steps": 1000})
    keys = [k.decode() for k in ledger.client.scan_iter(match="ag:*", count=1000)
            if redis_namespace in k.decode()]
    mine = [k for k in keys if "-other" not in k]
    assert len({k for k in mine if ":s:" in k}) == len(HOSTILE)  # no two names share a key
    tag = re.compile(r"^ag:\{([^}]*)\}:")
    for key in mine:
        m = tag.match(key)
        assert m is not None and m.group(1) == ledger.prefix[4:-2]  # one slot, no escape
        assert "\n" not in key and "*" not in key and "}" not in key[m.end():]
    for i, name in enumerate(HOSTILE):  # each name reads back its own counter
        assert ledger.totals(f"session:{name}").get_spent("steps") == i + 1
    assert ledger.totals("session:*").get_spent("steps") == HOSTILE.index("*") + 1
    ledger.close()
    others.close()


def test_hostile_names_cannot_touch_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "guard.db"
    ledger = SQLiteLedger(str(path))
    for i, name in enumerate(HOSTILE):
        ledger.charge([ScopeCaps(f"session:{name}", {"steps": 100})], {"steps": i + 1})
    for i, name in enumerate(HOSTILE):
        assert ledger.totals(f"session:{name}").get_spent("steps") == i + 1
    ledger.close()
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        rows = db.execute("SELECT count(DISTINCT scope) FROM ag_counters").fetchone()[0]
    assert "ag_counters" in tables and rows == len(HOSTILE)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(min_size=1, max_size=12), min_size=2, max_size=4, unique=True))
def test_team_values_never_share_a_budget(teams: list[str]) -> None:
    guard = Guard(Budgets(session=Limits(), team=Limits(max_steps=1, window="day")))
    for team in teams:  # each team gets its own single step, whatever its name
        guard.before_step(f"s-{team}", attributes={"team": team})
    for team in teams:
        assert guard.scope_usage("team", team).steps == 1
