"""SQLite ledger (``sqlite:///path/guard.db``): several processes on one host.

Every operation is one ``BEGIN IMMEDIATE`` transaction, which takes SQLite's
write lock up front, so a reservation's check and hold are atomic across all
processes using the file. WAL mode lets readers go on meanwhile. Expired
leases are reclaimed inside the reserving transaction.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from urllib.parse import unquote

from ..errors import LedgerUnavailable
from .base import (
    DONE_RETENTION_SECONDS,
    Denial,
    Ledger,
    Reservation,
    ScopeCaps,
    ScopeTotals,
    Settlement,
    check_amounts,
    first_denial,
    new_reservation_id,
)

__all__ = ["SQLiteLedger"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ag_counters (
    scope     TEXT NOT NULL,
    dimension TEXT NOT NULL,
    spent     INTEGER NOT NULL DEFAULT 0,
    reserved  INTEGER NOT NULL DEFAULT 0,
    extra     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, dimension)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ag_reservations (
    id         TEXT PRIMARY KEY,
    scopes     TEXT NOT NULL,
    amounts    TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ag_reservations_expiry ON ag_reservations (expires_at);
CREATE TABLE IF NOT EXISTS ag_done (
    id      TEXT PRIMARY KEY,
    done_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ag_done_at ON ag_done (done_at);
"""

_ADD = """
INSERT INTO ag_counters (scope, dimension, spent, reserved, extra) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (scope, dimension) DO UPDATE SET
    spent = spent + excluded.spent,
    reserved = reserved + excluded.reserved,
    extra = extra + excluded.extra
"""


class SQLiteLedger(Ledger):
    def __init__(
        self,
        path: str,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 30.0,
    ) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self._clock = clock
        self._timeout = busy_timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        try:
            self._connection().executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise LedgerUnavailable(self.url, exc) from exc

    @classmethod
    def from_url(cls, url: str, **options: object) -> SQLiteLedger:
        rest = url.split("://", 1)[1]
        if not rest.startswith("/"):
            raise ValueError(
                f"a SQLite ledger URL is sqlite:///relative/path.db or sqlite:////abs/path.db, "
                f"got {url!r}"
            )
        path = unquote(rest[1:].split("?", 1)[0])
        if not path:
            raise ValueError(f"the SQLite ledger URL {url!r} names no file")
        return cls(path, **options)  # type: ignore[arg-type]

    # -- connections -------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            try:
                directory = os.path.dirname(os.path.abspath(self.path))
                if self.path != ":memory:" and not os.path.isdir(directory):
                    raise FileNotFoundError(f"directory {directory} does not exist")
                db = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None,
                                     check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
            except (sqlite3.Error, OSError) as exc:
                raise LedgerUnavailable(self.url, exc) from exc
            self._local.db = db
            with self._all_lock:
                self._all.append(db)
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise LedgerUnavailable(self.url, exc) from exc
        try:
            yield db
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise LedgerUnavailable(self.url, exc) from exc
            raise

    def close(self) -> None:
        with self._all_lock:
            for db in self._all:
                db.close()
            self._all.clear()
        self._local = threading.local()

    # -- helpers (inside a transaction) ---------------------------------------------------

    def _totals(self, db: sqlite3.Connection, scope: str) -> ScopeTotals:
        rows = db.execute(
            "SELECT dimension, spent, reserved, extra FROM ag_counters WHERE scope = ?", (scope,)
        ).fetchall()
        return ScopeTotals(scope, {d: s for d, s, _, _ in rows}, {d: r for d, _, r, _ in rows},
                           {d: x for d, _, _, x in rows})

    def _add(self, db: sqlite3.Connection, scopes: Sequence[str], amounts: Mapping[str, int],
             *, spent: int = 0, reserved: int = 0) -> None:
        db.executemany(_ADD, [
            (scope, dim, amount * spent, amount * reserved, 0)
            for scope in scopes for dim, amount in amounts.items() if amount
        ])

    def _reclaim(self, db: sqlite3.Connection, now: float) -> int:
        expired = db.execute(
            "SELECT id, scopes, amounts FROM ag_reservations WHERE expires_at <= ?", (now,)
        ).fetchall()
        for _, scopes, amounts in expired:
            self._add(db, json.loads(scopes), json.loads(amounts), reserved=-1)
        if expired:
            db.executemany("DELETE FROM ag_reservations WHERE id = ?",
                           [(rid,) for rid, _, _ in expired])
        db.execute("DELETE FROM ag_done WHERE done_at < ?", (now - DONE_RETENTION_SECONDS,))
        return len(expired)

    def _finish(self, db: sqlite3.Connection, rid: str) -> tuple[bool, Reservation | None]:
        """Mark ``rid`` done. (already done before?, the open reservation if any)."""
        if db.execute("SELECT 1 FROM ag_done WHERE id = ?", (rid,)).fetchone():
            return True, None
        row = db.execute("SELECT scopes, amounts, expires_at FROM ag_reservations WHERE id = ?",
                         (rid,)).fetchone()
        db.execute("INSERT INTO ag_done (id, done_at) VALUES (?, ?)", (rid, self._clock()))
        if row is None:
            return False, None
        db.execute("DELETE FROM ag_reservations WHERE id = ?", (rid,))
        held = Reservation(rid, tuple(json.loads(row[0])), json.loads(row[1]), row[2])
        self._add(db, held.scopes, held.amounts, reserved=-1)
        return False, held

    # -- contract ---------------------------------------------------------------------------

    def reserve(
        self,
        scopes: Sequence[ScopeCaps],
        amounts: Mapping[str, int],
        *,
        lease_seconds: float,
        reservation_id: str | None = None,
    ) -> Reservation | Denial:
        check_amounts(amounts)
        rid = reservation_id or new_reservation_id()
        with self._transaction() as db:
            now = self._clock()
            self._reclaim(db, now)
            used = db.execute(
                "SELECT 1 FROM ag_reservations WHERE id = ? UNION ALL "
                "SELECT 1 FROM ag_done WHERE id = ?", (rid, rid)).fetchone()
            if used:
                raise ValueError(f"reservation id {rid!r} was already used")
            totals = {sc.scope: self._totals(db, sc.scope) for sc in scopes}
            denial = first_denial(scopes, amounts, totals)
            if denial is not None:
                return denial
            res = Reservation(rid, tuple(sc.scope for sc in scopes), dict(amounts),
                              now + lease_seconds)
            self._add(db, res.scopes, amounts, reserved=1)
            db.execute(
                "INSERT INTO ag_reservations (id, scopes, amounts, expires_at) VALUES (?, ?, ?, ?)",
                (rid, json.dumps(res.scopes), json.dumps(res.amounts), res.expires_at),
            )
            return res

    def settle(self, reservation: Reservation, actual: Mapping[str, int]) -> Settlement:
        check_amounts(actual)
        with self._transaction() as db:
            already, _ = self._finish(db, reservation.id)
            if already:
                return Settlement(False)
            self._add(db, reservation.scopes, actual, spent=1)
            return Settlement(True, {
                scope: {d: v for d, v in self._totals(db, scope).spent.items() if d in actual}
                for scope in reservation.scopes
            })

    def release(self, reservation: Reservation) -> bool:
        with self._transaction() as db:
            already, held = self._finish(db, reservation.id)
            return not already and held is not None

    def charge(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]) -> Denial | None:
        check_amounts(amounts)
        with self._transaction() as db:
            self._reclaim(db, self._clock())
            totals = {sc.scope: self._totals(db, sc.scope) for sc in scopes}
            denial = first_denial(scopes, amounts, totals)
            if denial is None:
                self._add(db, [sc.scope for sc in scopes], amounts, spent=1)
            return denial

    def extend(self, scope: str, dimension: str, amount: int) -> None:
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise TypeError(f"extend amount must be an int, got {amount!r}")
        with self._transaction() as db:
            db.execute(_ADD, (scope, dimension, 0, 0, amount))

    def totals(self, scope: str) -> ScopeTotals:
        db = self._connection()
        try:
            return self._totals(db, scope)
        except sqlite3.Error as exc:
            raise LedgerUnavailable(self.url, exc) from exc

    def reclaim_expired(self) -> int:
        with self._transaction() as db:
            return self._reclaim(db, self._clock())
