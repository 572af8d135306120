"""Connections to one SQLite database, shared by the ledger, the caches and the usage store
(``agent_guard.sqlite_pool`` is the old import path of this module).

A connection per thread, kept for the life of the object, leaks: LangChain's
``Runnable.batch`` makes a new thread pool per call, and each of its threads left two
file descriptors behind until the process could open no more files. Here a
connection is taken for one transaction or read by whichever thread needs one, and
given back; a few idle ones are kept, the rest closed. An in-memory database has a
single connection behind a lock (each ``:memory:`` connection is its own database).
After a fork the child opens its own connections (a SQLite connection must not cross
a fork).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

__all__ = ["IDLE_CONNECTIONS", "SQLitePool", "is_memory_path"]

IDLE_CONNECTIONS = 8


def is_memory_path(path: str) -> bool:
    return path in ("", ":memory:")


class SQLitePool:
    """``with pool.connection() as db: ...``; ``pool.close()``.

    ``timeout`` is SQLite's busy timeout in seconds. ``open_error`` turns a failure to
    open a connection into the caller's own error (the ledger's ``LedgerUnavailable``).
    """

    def __init__(self, path: str, *, timeout: float = 30.0, idle: int = IDLE_CONNECTIONS,
                 open_error: Callable[[BaseException], BaseException] | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self.idle_max = idle
        self._open_error = open_error
        self._memory = is_memory_path(path)
        self._lock = threading.Lock()
        self._memory_lock = threading.RLock()
        self._idle: list[sqlite3.Connection] = []
        self._all: list[sqlite3.Connection] = []
        self._shared: sqlite3.Connection | None = None
        self._pid = os.getpid()

    def _open(self) -> sqlite3.Connection:
        try:
            if not self._memory:
                directory = os.path.dirname(os.path.abspath(self.path))
                if not os.path.isdir(directory):
                    raise FileNotFoundError(f"directory {directory} does not exist")
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                 check_same_thread=False)
            if not self._memory:
                db.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
                _switch_to_wal(db, self.timeout)
                db.execute("PRAGMA synchronous=NORMAL")
        except (sqlite3.Error, OSError) as exc:
            if self._open_error is not None:
                raise self._open_error(exc) from exc
            raise
        with self._lock:
            self._all.append(db)
        return db

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        if self._memory:
            with self._memory_lock:
                if self._shared is None:
                    self._shared = self._open()
                yield self._shared
            return
        with self._lock:
            if os.getpid() != self._pid:  # forked: never use the parent's connections
                self._pid, self._idle, self._all = os.getpid(), [], []
            db = self._idle.pop() if self._idle else None
        if db is None:
            db = self._open()
        try:
            yield db
        finally:
            with self._lock:
                owned = db in self._all
                keep = owned and len(self._idle) < self.idle_max and not db.in_transaction
                if keep:
                    self._idle.append(db)
                elif owned:
                    self._all.remove(db)
            if not keep:
                with suppress(sqlite3.Error):
                    db.close()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._all)

    def close(self) -> None:
        with self._lock:
            dbs, self._all, self._idle = self._all, [], []
            self._shared = None
        for db in dbs:
            with suppress(sqlite3.Error):
                db.close()


def _switch_to_wal(db: sqlite3.Connection, timeout: float) -> None:
    """``PRAGMA journal_mode=WAL``, retried within the busy timeout: while another
    process opens the same new file and switches it, SQLite can answer "database is
    locked" at once, without waiting on the busy handler (seen with two processes
    opening one ledger file together)."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)
