"""Rough edges a new user meets first: every bad input to the command is a clear error with
a non-zero exit and no traceback, nothing is created by reading, and what is printed is true."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage
from typer.testing import CliRunner

from agent_guard import Guard, GuardCallbackHandler, GuardStop, Limits, __version__
from agent_guard.cli import app
from agent_guard.finops.focus import export_focus
from agent_guard.testing import ScriptedChatModel

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _text(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def _no_traceback(result) -> None:
    assert "Traceback" not in _text(result)
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"agent-guard {__version__}"


def test_usage_of_a_missing_sqlite_ledger_creates_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["usage", "ticket-42"], terminal_width=200)
    assert result.exit_code != 0
    assert "agent_guard.db" in _text(result) and "does not exist" in _text(result)
    _no_traceback(result)
    assert list(tmp_path.iterdir()) == []  # no empty agent_guard.db left behind

    other = tmp_path / "nope.db"
    result = runner.invoke(app, ["usage", "s", "--ledger", f"sqlite:///{other}"],
                           terminal_width=200)
    assert result.exit_code != 0 and "does not exist" in _text(result)
    assert not other.exists()


def test_usage_of_an_unknown_session_says_so(tmp_path) -> None:
    db = tmp_path / "guard.db"
    guard = Guard(Limits(max_model_calls=5), ledger=f"sqlite:///{db}")
    guard.before_tool_call("known", "search")
    guard.close()
    result = runner.invoke(app, ["usage", "unknown", "--ledger", f"sqlite:///{db}"],
                           terminal_width=200)
    assert result.exit_code == 1
    assert "no usage recorded for session 'unknown'" in _text(result)
    assert "$0.000000000" not in _text(result)
    known = runner.invoke(app, ["usage", "known", "--ledger", f"sqlite:///{db}"],
                          terminal_width=200)
    assert known.exit_code == 0, known.output
    assert "tool calls" in _text(known)


def test_usage_of_a_process_local_ledger_is_refused() -> None:
    result = runner.invoke(app, ["usage", "s", "--ledger", "memory://"], terminal_width=200)
    assert result.exit_code == 2 and "memory://" in _text(result)
    _no_traceback(result)


@pytest.mark.parametrize("url", ["bogus://x", "redis://127.0.0.1:1/0"])
def test_usage_of_a_bad_or_unreachable_ledger_is_a_clear_error(url) -> None:
    result = runner.invoke(app, ["usage", "s", "--ledger", url], terminal_width=200)
    assert result.exit_code == 2, result.output
    assert "error:" in _text(result)
    _no_traceback(result)


@pytest.mark.parametrize("cap", ["abc", "-1", "0", "nan", "inf"])
def test_demo_with_a_bad_cap_is_a_clear_error(cap) -> None:
    result = runner.invoke(app, ["demo", "--cap", cap], terminal_width=200)
    assert result.exit_code == 2, result.output
    assert "--cap" in _text(result) and "dollar amount" in _text(result)
    _no_traceback(result)


def test_demo_with_a_bad_ledger_is_a_clear_error() -> None:
    result = runner.invoke(app, ["demo", "--ledger", "bogus://x"], terminal_width=200)
    assert result.exit_code == 2, result.output
    _no_traceback(result)


def test_focus_export_refuses_an_extension_it_does_not_write(tmp_path) -> None:
    out = tmp_path / "out.xlsx"
    with pytest.raises(ValueError, match=r"\.xlsx.*\.csv or \.parquet"):
        export_focus([], out)
    assert not out.exists()
    db = tmp_path / "guard.db"
    Guard(Limits(), ledger=f"sqlite:///{db}").close()
    from agent_guard.finops import UsageStore
    UsageStore.from_url(f"sqlite:///{db}").close()
    result = runner.invoke(app, ["export", "--store", f"sqlite:///{db}", "--focus", str(out)],
                           terminal_width=200)
    assert result.exit_code == 2, result.output
    assert ".xlsx" in _text(result) and ".csv or .parquet" in _text(result)
    _no_traceback(result)
    assert not out.exists()


def test_quickstart_prints_tool_records_as_tool_calls() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "0 in / 0 out" not in out.stdout
    assert "call : " not in out.stdout
    assert "tool search_orders" in out.stdout
    assert "Error in" not in out.stderr


def _looping(messages):
    n = sum(isinstance(m, AIMessage) for m in messages)
    return AIMessage(content="again", tool_calls=[
        {"name": "t", "args": {}, "id": f"c{n}"}])


def test_a_refusal_is_not_also_logged_as_a_callback_error(caplog) -> None:
    """LangChain logs every exception a callback raises ('Error in GuardCallbackHandler.
    on_chat_model_start callback: BudgetExceeded(...)') before re-raising it; a refusal
    is the guard doing its job, so that warning is dropped (the caller gets the error)."""
    guard = Guard(Limits(max_model_calls=1), ledger="memory://")
    llm = ScriptedChatModel(model_name="gpt-4o", respond=_looping, max_tokens=16)
    config = {"callbacks": [GuardCallbackHandler(guard)],
              "metadata": {"session_id": "t"}}
    with caplog.at_level(logging.WARNING):
        llm.invoke("hi", config=config)
        with pytest.raises(GuardStop):
            llm.invoke("hi", config=config)
    assert not [r for r in caplog.records if "Error in" in r.getMessage()]


async def test_a_refusal_is_not_also_logged_as_a_callback_error_async(caplog) -> None:
    guard = Guard(Limits(max_model_calls=1), ledger="memory://")
    llm = ScriptedChatModel(model_name="gpt-4o", respond=_looping, max_tokens=16)
    config = {"callbacks": [GuardCallbackHandler(guard)],
              "metadata": {"session_id": "t"}}
    with caplog.at_level(logging.WARNING):
        await llm.ainvoke("hi", config=config)
        with pytest.raises(GuardStop):
            await llm.ainvoke("hi", config=config)
    assert not [r for r in caplog.records if "Error in" in r.getMessage()]


def test_an_error_that_is_not_a_refusal_is_still_logged(caplog) -> None:
    from agent_guard.actions import _QuietRefusals

    record = logging.LogRecord("langchain_core.callbacks.manager", logging.WARNING, __file__,
                               1, "Error in %s.%s callback: %s",
                               ("H", "on_llm_start", "ValueError('boom')"), None)
    assert _QuietRefusals().filter(record)
