"""The front door: `agent-guard demo`, the quickstart example, and the other commands."""

from __future__ import annotations

import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

from typer.testing import CliRunner

from agent_guard.cli import app
from agent_guard.demo import run_demo

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_demo_is_stopped_by_its_cap_and_prints_every_call() -> None:
    result = runner.invoke(app, ["demo"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "stopped by agent-guard" in result.output
    assert "BudgetExceeded" in result.output and "Nothing was spent on this call" in result.output
    rows = re.findall(r"│\s+(\d+) │ gpt-4o", result.output)
    assert len(rows) >= 5 and rows == [str(i) for i in range(1, len(rows) + 1)]
    spent = Decimal(re.search(r"spent \$(\d+\.\d+) of \$0.05", result.output).group(1))
    assert 0 < spent <= Decimal("0.05")


def test_demo_result_adds_up(tmp_path) -> None:
    from rich.console import Console

    result = run_demo("0.02", ledger=f"sqlite:///{tmp_path / 'demo.db'}",
                      console=Console(file=open("/dev/null", "w")))  # noqa: SIM115
    assert result.stopped_by is not None
    assert result.total_usd == sum(r.cost_usd for r in result.records) <= Decimal("0.02")
    assert all(r.outcome == "ok" and not r.usage_estimated for r in result.records)
    # the session lives on in the SQLite ledger
    usage = runner.invoke(app, ["usage", "ticket-42", "--ledger",
                                f"sqlite:///{tmp_path / 'demo.db'}"], terminal_width=200)
    assert usage.exit_code == 0
    assert f"${result.total_usd:.9f}" in usage.output


def test_quickstart_example_runs_offline() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "stopped: BudgetExceeded" in out.stdout
    assert "session ticket-42: $0.0" in out.stdout


def test_team_budget_example_runs_offline() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "team_budget.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused by team:acme@" in out.stdout
    webhooks = [line for line in out.stdout.splitlines() if line.startswith("webhook:")]
    assert len(webhooks) == 2 and "threshold 50%" in webhooks[0] \
        and "threshold 80%" in webhooks[1]
    assert "user ana:" in out.stdout and "user ben:" in out.stdout
    assert "/hooks/T000" not in out.stdout + out.stderr  # the webhook URL is a secret


def test_price_command_shows_resolution() -> None:
    result = runner.invoke(app, ["price", "gpt-4o-mini-2025-01-01"])
    assert result.exit_code == 0
    assert "'gpt-4o-mini'" in result.output and "$0.15" in result.output
    missing = runner.invoke(app, ["price", "acme-llm"])
    assert missing.exit_code == 1 and "no price" in missing.output
