"""SQLite ledger (``sqlite:///path/guard.db``): several processes on one host.

Every write is one ``BEGIN IMMEDIATE`` transaction, which takes SQLite's write
lock up front, so a reservation's reclaim, check and hold are atomic across all
threads and processes using the file; waiting for the lock is bounded by
``busy_timeout_s`` (30 s), after which the call fails closed with
:class:`~agent_guard.errors.LedgerUnavailable`. WAL mode lets ``totals`` read
meanwhile. ``synchronous=NORMAL``: a commit survives a crash of the process,
not necessarily a power cut.

Tables: ``ag_counters`` (scope, dimension) -> spent, reserved, extra as 64-bit
INTEGERs; ``ag_reservations`` (id -> scopes and amounts as JSON, expires_at);
``ag_done`` (id, done_at), pruned after ``DONE_RETENTION_SECONDS``. Every
statement is parameterised, so scope and dimension names can hold anything.

Connections come from a small pool any thread borrows from for one transaction
(:mod:`agent_guard.stores.sqlite`); ``sqlite:///:memory:`` (one process only) uses
one connection behind a lock instead, since each connection to ``:memory:``
would be a separate database.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import replace

from ..errors import LedgerUnavailable
from ..stores.sqlite import SQLitePool
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
    spent_after,
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
    """Budgets in one SQLite file; see the module docstring."""

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
        self._pool = SQLitePool(path, timeout=busy_timeout_s,
                                open_error=lambda exc: LedgerUnavailable(self.url, exc))
        with self._transaction() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    @classmethod
    def from_url(cls, url: str, **options: object) -> SQLiteLedger:
        """``sqlite:///relative.db``, ``sqlite:////abs/path.db`` or ``sqlite:///:memory:``
        (``?timeout=`` is the busy timeout in seconds; keyword options win)."""
        from ..stores import parse_url

        parsed = parse_url(url, "ledger")
        if parsed.backend != "sqlite" or parsed.path is None:
            raise ValueError(f"not a sqlite:/// URL: {parsed.redacted!r}")
        if "timeout" in parsed.options:
            options.setdefault("busy_timeout_s", parsed.options["timeout"])
        return cls(parsed.path, **options)  # type: ignore[arg-type]

    # -- connections -------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` ... ``COMMIT``; sqlite errors -> LedgerUnavailable."""
        with self._pool.connection() as db:
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise LedgerUnavailable(self.url, exc) from exc
            try:
                yield db
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise LedgerUnavailable(self.url, exc) from exc
                raise

    def close(self) -> None:
        self._pool.close()

    # -- helpers (inside a transaction) ---------------------------------------------------

    @staticmethod
    def _totals(db: sqlite3.Connection, scope: str) -> ScopeTotals:
        rows = db.execute(
            "SELECT dimension, spent, reserved, extra FROM ag_counters WHERE scope = ?", (scope,)
        ).fetchall()
        return ScopeTotals(scope, {d: s for d, s, _, _ in rows}, {d: r for d, _, r, _ in rows},
                           {d: x for d, _, _, x in rows})

    @classmethod
    def _all_totals(cls, db: sqlite3.Connection, scopes: Sequence[ScopeCaps]
                    ) -> dict[str, ScopeTotals]:
        """The totals of every scope and of every scope in their history."""
        names = dict.fromkeys([*(sc.scope for sc in scopes),
                               *(past for sc in scopes for past in sc.history)])
        return {name: cls._totals(db, name) for name in names}

    @staticmethod
    def _add(db: sqlite3.Connection, scopes: Sequence[str], amounts: Mapping[str, int],
             *, spent: int = 0, reserved: int = 0) -> None:
        db.executemany(_ADD, [
            (scope, dim, amount * spent, amount * reserved, 0)
            for scope in scopes for dim, amount in amounts.items() if amount
        ])

    def _reclaim(self, db: sqlite3.Connection, now: float) -> int:
        """Give back every expired hold and forget done ids past their retention."""
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

    def _finish(self, db: sqlite3.Connection, rid: str) -> tuple[bool, bool]:
        """Mark ``rid`` done and drop its hold. (finished before?, a hold was dropped?)"""
        if db.execute("SELECT 1 FROM ag_done WHERE id = ?", (rid,)).fetchone():
            return True, False
        db.execute("INSERT INTO ag_done (id, done_at) VALUES (?, ?)", (rid, self._clock()))
        row = db.execute("SELECT scopes, amounts FROM ag_reservations WHERE id = ?",
                         (rid,)).fetchone()
        if row is None:
            return False, False
        db.execute("DELETE FROM ag_reservations WHERE id = ?", (rid,))
        self._add(db, json.loads(row[0]), json.loads(row[1]), reserved=-1)
        return False, True

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
            self._reclaim(db, now)  # kept even when the id turns out to be used
            used = db.execute(
                "SELECT 1 FROM ag_reservations WHERE id = ? UNION ALL "
                "SELECT 1 FROM ag_done WHERE id = ?", (rid, rid)).fetchone()
            if not used:
                totals = self._all_totals(db, scopes)
                denial = first_denial(scopes, amounts, totals)
                if denial is not None:
                    return denial
                res = Reservation(rid, tuple(sc.scope for sc in scopes), dict(amounts),
                                  now + lease_seconds)
                self._add(db, res.scopes, amounts, reserved=1)
                db.execute(
                    "INSERT INTO ag_reservations (id, scopes, amounts, expires_at) "
                    "VALUES (?, ?, ?, ?)",
                    (rid, json.dumps(res.scopes), json.dumps(res.amounts), res.expires_at),
                )
                return res
        raise ValueError(f"reservation id {rid!r} was already used")

    def settle(self, reservation: Reservation, actual: Mapping[str, int]) -> Settlement:
        check_amounts(actual)
        with self._transaction() as db:
            already, _ = self._finish(db, reservation.id)
            if already:
                return Settlement(False)
            self._add(db, reservation.scopes, actual, spent=1)
            spent = {scope: self._totals(db, scope).spent for scope in reservation.scopes}
            return Settlement(True, {
                scope: {dim: int(spent[scope].get(dim, 0)) for dim in actual}
                for scope in reservation.scopes
            })

    def release(self, reservation: Reservation) -> bool:
        with self._transaction() as db:
            already, dropped = self._finish(db, reservation.id)
            return not already and dropped

    def renew(self, reservation: Reservation, lease_seconds: float) -> Reservation | None:
        with self._transaction() as db:
            now = self._clock()
            row = db.execute("SELECT expires_at FROM ag_reservations WHERE id = ?",
                             (reservation.id,)).fetchone()
            if row is None or row[0] <= now:  # finished, or its lease is over
                return None
            expires = max(float(row[0]), now + lease_seconds)
            db.execute("UPDATE ag_reservations SET expires_at = ? WHERE id = ?",
                       (expires, reservation.id))
            return replace(reservation, expires_at=expires)

    def charge(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]) -> Denial | None:
        result = self._charge(scopes, amounts, read=False)
        return result if isinstance(result, Denial) else None

    def charge_read(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
                    ) -> Denial | Settlement:
        return self._charge(scopes, amounts, read=True)

    def _charge(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int], *,
                read: bool) -> Denial | Settlement:
        """Check and spend on every scope or none, in one transaction; ``read``: report
        the new totals from the same transaction."""
        check_amounts(amounts)
        with self._transaction() as db:
            self._reclaim(db, self._clock())
            totals = self._all_totals(db, scopes)
            denial = first_denial(scopes, amounts, totals)
            if denial is not None:
                return denial
            names = [sc.scope for sc in scopes]
            self._add(db, names, amounts, spent=1)
            if not read:
                return Settlement(True)
            return spent_after(names, amounts, [self._totals(db, n) for n in names])

    def extend(self, scope: str, dimension: str, amount: int) -> None:
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise TypeError(f"extend amount must be an int, got {amount!r}")
        with self._transaction() as db:
            db.execute(_ADD, (scope, dimension, 0, 0, amount))

    def totals(self, scope: str) -> ScopeTotals:
        with self._pool.connection() as db:
            try:
                return self._totals(db, scope)
            except sqlite3.Error as exc:
                raise LedgerUnavailable(self.url, exc) from exc

    def reclaim_expired(self) -> int:
        with self._transaction() as db:
            return self._reclaim(db, self._clock())
