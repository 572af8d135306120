"""Opening a SQLite store while another process switches the same new file to WAL.

SQLite can answer the ``journal_mode=WAL`` switch "database is locked" at once, without
its busy handler (seen in CI: two processes opening one ledger file together, one failed
with LedgerUnavailable). The pool retries the switch within its busy timeout."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from agent_guard.errors import LedgerUnavailable
from agent_guard.ledger.sqlite import SQLiteLedger


class _LockedAtFirst:
    """A connection whose WAL switch is answered "database is locked" ``times`` times."""

    def __init__(self, db: sqlite3.Connection, times: int) -> None:
        self.db, self.times = db, times

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "PRAGMA journal_mode=WAL" and self.times:
            self.times -= 1
            raise sqlite3.OperationalError("database is locked")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def _lock_first_switches(monkeypatch: pytest.MonkeyPatch, times: int) -> None:
    real = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> Any:
        return _LockedAtFirst(real(*args, **kwargs), times)

    monkeypatch.setattr(sqlite3, "connect", connect)


def test_a_wal_switch_answered_locked_is_retried(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _lock_first_switches(monkeypatch, 3)
    ledger = SQLiteLedger(str(tmp_path / "l.db"), busy_timeout_s=5)
    with ledger._pool.connection() as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    ledger.close()


def test_a_file_still_locked_after_the_busy_timeout_is_unavailable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _lock_first_switches(monkeypatch, 10**6)
    with pytest.raises(LedgerUnavailable, match="database is locked"):
        SQLiteLedger(str(tmp_path / "l.db"), busy_timeout_s=0.2)
