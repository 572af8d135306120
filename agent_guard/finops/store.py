"""The usage records store: every :class:`~agent_guard.engine.records.CallRecord`, kept.

A store is a record hook. Attach it to a guard and every model and tool call
the guard accounts is appended as one flat row::

    store = UsageStore.from_url("sqlite:///guard.db", retention_days=90)
    guard.add_record_hook(store.append)          # or: store.attach(guard)

=============================  ===============================================
``memory://``                  this process only (tests, notebooks)
``sqlite:///path/usage.db``    table ``ag_usage`` (indexed on time and session)
``redis://host:6379/0``        stream ``ag:{namespace}:usage`` (``XADD``)
=============================  ===============================================

:meth:`UsageStore.for_ledger` puts the records next to a ledger's data: the
``ag_usage`` table in the SQLite ledger's file, the stream under the Redis
ledger's namespace (same hash tag).

Appending never raises into the agent: a failure is logged (logger
``agent_guard``) and counted in :attr:`UsageStore.failed`. With
``background=True`` the hook only queues the record (about a microsecond) and a
daemon thread writes batches; :meth:`UsageStore.flush` waits for the queue,
reads flush first, and ``close`` flushes. A full queue (``max_queue``) drops
records rather than block the agent, and counts them in ``dropped``.

Rows are plain JSON values, never pickles: :func:`record_to_row` gives the
row, :func:`row_to_record` the record back. Amounts are integer nano-USD
(``cost_nano``, exactly what the ledger settled) plus exact USD decimal
strings (``cost_usd``).

Retention (``retention_days``): SQLite and memory stores delete rows whose
call started before the cut-off, Redis trims the stream by entry id (the time
the record was appended) with ``XADD ... MINID ~``; ``max_records`` caps a
Redis stream's length with ``MAXLEN ~`` instead. Pruning runs at most once a
minute on append, or on demand with :meth:`UsageStore.prune`.

A user callback is just another record hook: ``guard.add_record_hook(fn)``
receives the same :class:`CallRecord` objects the store does.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import suppress
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ..engine.records import CallRecord, utf8_text
from ..engine.usage import NANO_PER_USD, Usage
from ..ledger import Ledger, MemoryLedger, redact_url
from ..stores import open_store, parse_url
from ..stores.redis import REDIS_ERRORS, USAGE, redis_client
from ..stores.sqlite import SQLitePool, is_memory_path
from ..stores.url import REDIS_BACKENDS

if TYPE_CHECKING:
    from ..engine.guard import Guard

__all__ = [
    "ATTRIBUTE_COLUMNS",
    "ROW_FIELDS",
    "MemoryUsageStore",
    "RedisUsageStore",
    "SQLiteUsageStore",
    "UsageStore",
    "format_usd",
    "parse_time",
    "record_to_row",
    "row_to_record",
]

logger = logging.getLogger("agent_guard")

ROW_VERSION = 1
# Scope attributes that get a column of their own (others stay in ``attributes``).
ATTRIBUTE_COLUMNS = ("user", "team", "feature", "project", "environment", "tenant")
ROW_FIELDS = (
    "v", "record_id", "kind", "tool", "session", "run_id", "model", "provider", "outcome",
    "usage_estimated", "unpriced",
    "input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens",
    "reasoning_tokens", "total_tokens",
    "cost_nano", "cost_usd", "saved_nano", "saved_usd", "reserved_nano", "reserved_usd",
    "started_at", "ended_at", "day", "max_output_tokens", "node", "tier", "route",
    *ATTRIBUTE_COLUMNS, "attributes", "tags", "scopes", "units", "unit", "unit_price_usd",
)
_JSON = {"separators": (",", ":"), "ensure_ascii": False}
_PRUNE_EVERY_S = 60.0
_DAY_S = 86400.0

TimeLike = datetime | date | str | float | int | None


# -- rows ------------------------------------------------------------------------------------


def format_usd(nanos: int) -> str:
    """Integer nano-USD as an exact decimal string with 9 places (``"0.001380000"``),
    never in exponent notation."""
    nanos = int(nanos)
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANO_PER_USD)
    return f"{sign}{whole}.{frac:09d}"


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def record_to_row(record: CallRecord) -> dict[str, Any]:
    """One record as a flat row: every value a str, int, float, bool or None.

    ``attributes`` (JSON object), ``tags`` and ``scopes`` (JSON arrays) are JSON
    text; the standard attributes (user, team, feature, project, environment,
    tenant) also get a column each. ``day`` is the UTC date the call started.
    """
    u = record.usage
    # SQLite, Redis and CSV take UTF-8 only: text it cannot hold is escaped (utf8_text)
    attributes = {utf8_text(str(k)): utf8_text(v) if isinstance(v, str) else v
                  for k, v in record.attributes.items()}
    row: dict[str, Any] = {
        "v": ROW_VERSION,
        "record_id": record.record_id,
        "kind": record.kind,
        "tool": record.tool,
        "session": record.session,
        "run_id": record.run_id,
        "model": record.model,
        "provider": record.provider,
        "outcome": record.outcome,
        "usage_estimated": record.usage_estimated,
        "unpriced": record.unpriced,
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cache_read_tokens": u.cache_read_tokens,
        "cache_creation_tokens": u.cache_creation_tokens,
        "reasoning_tokens": u.reasoning_tokens,
        "total_tokens": u.total_tokens,
        "cost_nano": record.cost_nano,
        "cost_usd": format_usd(record.cost_nano),
        "saved_nano": record.saved_nano,
        "saved_usd": format_usd(record.saved_nano),
        "reserved_nano": record.reserved_nano,
        "reserved_usd": format_usd(record.reserved_nano),
        "started_at": float(record.started_at),
        "ended_at": float(record.ended_at),
        "day": _day(record.started_at),
        "max_output_tokens": record.max_output_tokens,
        "node": record.node,
        "tier": record.tier,
        "route": record.route,
    }
    for name in ATTRIBUTE_COLUMNS:
        row[name] = attributes.get(name)
    row["attributes"] = json.dumps(attributes, sort_keys=True, **_JSON)  # type: ignore[arg-type]
    row["tags"] = json.dumps([utf8_text(t) for t in record.tags], **_JSON)  # type: ignore[arg-type]
    row["scopes"] = json.dumps([utf8_text(t) for t in record.scopes], **_JSON)  # type: ignore[arg-type]
    row["units"] = record.units
    row["unit"] = record.unit
    row["unit_price_usd"] = record.unit_price_usd
    for key, value in row.items():
        if type(value) is str:
            row[key] = utf8_text(value)
    return row


def row_to_record(row: Mapping[str, Any]) -> CallRecord:
    """The :class:`CallRecord` a row was made from (amounts from the integer columns)."""
    return CallRecord(
        session=row["session"],
        run_id=row.get("run_id"),
        model=row.get("model") or "",
        provider=row.get("provider"),
        usage=Usage(int(row["input_tokens"]), int(row["output_tokens"]),
                    int(row["cache_read_tokens"]), int(row["cache_creation_tokens"]),
                    int(row["reasoning_tokens"])),
        cost_nano=int(row["cost_nano"]),
        reserved_nano=int(row["reserved_nano"]),
        usage_estimated=bool(row["usage_estimated"]),
        outcome=row["outcome"],
        started_at=float(row["started_at"]),
        ended_at=float(row["ended_at"]),
        unpriced=bool(row.get("unpriced", False)),
        saved_nano=int(row.get("saved_nano", 0)),
        max_output_tokens=row.get("max_output_tokens"),
        node=row.get("node"),
        tags=tuple(json.loads(row.get("tags") or "[]")),
        tier=row.get("tier"),
        route=row.get("route"),
        kind=row.get("kind", "model"),
        tool=row.get("tool"),
        attributes=json.loads(row.get("attributes") or "{}"),
        scopes=tuple(json.loads(row.get("scopes") or "[]")),
        record_id=row["record_id"],
        units=row.get("units"),
        unit=row.get("unit"),
        unit_price_usd=row.get("unit_price_usd"),
    )


def parse_time(value: TimeLike, *, end: bool = False, what: str = "time",
               tz: tzinfo | None = None) -> float | None:
    """Epoch seconds from a datetime, a date, an ISO string or a number.

    A date alone (``2026-11-01``, or ``20261101``) is midnight in ``tz`` (UTC by
    default); with ``end=True`` it is the *next* midnight, so
    ``until="2026-11-30"`` includes the whole of that day. Naive datetimes are in
    ``tz`` too.
    """
    zone = tz or UTC
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a date, a datetime or epoch seconds, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):
        dt = value if value.tzinfo is not None else value.replace(tzinfo=zone)
        return dt.timestamp()
    if isinstance(value, date):
        day = value + timedelta(days=1) if end else value
        return datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()
    if isinstance(value, str):
        text = value.strip()
        try:
            if len(text) in (8, 10) and text.replace("-", "").isdigit():
                return parse_time(date.fromisoformat(text), end=end, what=what, tz=zone)
            return parse_time(datetime.fromisoformat(text.replace("Z", "+00:00")), what=what,
                              tz=zone)
        except ValueError:
            pass
        raise ValueError(
            f"{what} {value!r} is not a date: use YYYY-MM-DD (a whole day) or an ISO "
            f"8601 date and time such as 2026-11-01T09:30:00Z")
    raise ValueError(f"{what} must be a date, a datetime or epoch seconds, got {value!r}")


def _in_window(started: float, since: float | None, until: float | None) -> bool:
    return (since is None or started >= since) and (until is None or started < until)


# -- the store ---------------------------------------------------------------------------------


class UsageStore(ABC):
    """Where call records are kept; build one with :meth:`from_url` or :meth:`for_ledger`.

    ``append`` is the record hook (also the store itself is callable).
    ``rows(since, until)`` reads rows whose call started in ``[since, until)``,
    oldest first; ``records`` the same as :class:`CallRecord` objects.
    """

    url: str

    def __init__(
        self,
        *,
        retention_days: float | None = None,
        background: bool = False,
        max_queue: int = 100_000,
        batch_size: int = 500,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if retention_days is not None and not retention_days > 0:
            raise ValueError(f"retention_days must be positive or None, got {retention_days!r}")
        self.retention_days = retention_days
        self.background = background
        self.clock = clock
        self.failed = 0
        self.dropped = 0
        self._batch_size = max(1, int(batch_size))
        self._last_prune = 0.0
        self._lock = threading.Lock()
        self._queue: queue.Queue[CallRecord | None] = queue.Queue(maxsize=max(1, max_queue))
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None
        self._closed = False

    # -- construction ------------------------------------------------------------------

    @staticmethod
    def from_url(url: str, *, retention_days: float | None = None,
                 namespace: str | None = None, **options: Any) -> UsageStore:
        """``memory://``, ``sqlite:///usage.db`` (``sqlite:////abs/path.db``) or
        ``redis://host:6379/0`` (``rediss://``, ``unix://``; the key namespace from
        ``namespace=`` or the URL's ``?namespace=``, default ``default``, as the
        ledger's). ``retention_days`` may come in the URL's query too; keywords win;
        an unknown option raises (see :mod:`agent_guard.stores`). ``options`` go to
        the backend (``background=True``...)."""
        if isinstance(url, UsageStore):
            return url
        if retention_days is not None:
            options["retention_days"] = retention_days
        if namespace is not None and parse_url(url, "usage").backend in REDIS_BACKENDS:
            options["namespace"] = namespace  # only Redis keeps usage under a namespace
        store: UsageStore = open_store(url, "usage", **options)
        return store

    @staticmethod
    def for_ledger(ledger: Ledger | str, *, retention_days: float | None = None,
                   **options: Any) -> UsageStore:
        """A store next to ``ledger``'s data: the ``ag_usage`` table in a SQLite
        ledger's file, the ``usage`` stream in a Redis ledger's namespace, memory
        for a memory ledger (or a SQLite ledger in ``:memory:``)."""
        if isinstance(ledger, str):
            parsed = parse_url(ledger, "ledger")
            if parsed.backend in REDIS_BACKENDS:  # the ledger's server and namespace
                return RedisUsageStore(
                    parsed.client_url, namespace=parsed.kind_options.get("namespace") or
                    "default", retention_days=retention_days, **options)
            from ..ledger import from_url

            ledger = from_url(ledger)
        from ..ledger.sqlite import SQLiteLedger

        if isinstance(ledger, MemoryLedger):
            return MemoryUsageStore(retention_days=retention_days, **options)
        if isinstance(ledger, SQLiteLedger):
            if ledger.path in ("", ":memory:"):
                return MemoryUsageStore(retention_days=retention_days, **options)
            return SQLiteUsageStore(ledger.path, retention_days=retention_days, **options)
        client, prefix = getattr(ledger, "client", None), getattr(ledger, "prefix", None)
        if client is not None and isinstance(prefix, str):  # a RedisLedger
            return RedisUsageStore(getattr(ledger, "url", "redis://"), client=client,
                                   key=prefix + "usage", retention_days=retention_days,
                                   **options)
        raise ValueError(
            f"no usage store goes with a {type(ledger).__name__}; build one with "
            f"UsageStore.from_url('sqlite:///usage.db') (or memory://, redis://...)")

    def attach(self, guard: Guard) -> UsageStore:
        """Add this store to ``guard``'s record hooks; returns the store."""
        guard.add_record_hook(self.append)
        return self

    # -- writing -------------------------------------------------------------------------

    def append(self, record: CallRecord) -> None:
        """The record hook: keep ``record``. Never raises (failures are logged)."""
        if self.background and not self._closed:
            self._enqueue(record)
            return
        try:
            self._write([record_to_row(record)])
            self._maybe_prune()
        except Exception:
            self.failed += 1
            logger.exception("agent-guard: could not append a usage record to %s", self.url)

    def __call__(self, record: CallRecord) -> None:
        """The store is a record hook itself: ``Guard(on_record=[store])``."""
        self.append(record)

    def extend(self, records: Iterable[CallRecord]) -> None:
        """Keep many records in one write (raises on failure, unlike ``append``)."""
        rows = [record_to_row(r) for r in records]
        for i in range(0, len(rows), self._batch_size):
            self._write(rows[i:i + self._batch_size])

    def _enqueue(self, record: CallRecord) -> None:
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._start_worker()
            self._pending += 1
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            with self._lock:
                self._pending -= 1
                self.dropped += 1
                if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                    logger.warning("agent-guard: usage store %s is behind; %d records dropped",
                                   self.url, self.dropped)
                self._idle.notify_all()

    def _start_worker(self) -> None:
        self._worker = threading.Thread(target=self._drain, name="agent-guard-usage",
                                        daemon=True)
        self._worker.start()
        atexit.register(self.flush, 5.0)

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            while len(batch) < self._batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            records = [r for r in batch if r is not None]
            if records:
                try:
                    self._write([record_to_row(r) for r in records])
                    self._maybe_prune()
                except Exception:
                    self.failed += len(records)
                    logger.exception("agent-guard: could not append %d usage records to %s",
                                     len(records), self.url)
            with self._lock:
                self._pending -= len(records)
                self._idle.notify_all()
            if len(records) < len(batch):  # None: stop
                return

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued records are written; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending > 0:
                if self._worker is None or not self._worker.is_alive():
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left if left is not None else 1.0)
        return True

    def _maybe_prune(self) -> None:
        if self.retention_days is None:
            return
        now = self.clock()
        if now - self._last_prune < _PRUNE_EVERY_S:
            return
        self._last_prune = now
        self.prune(now)

    def prune(self, now: float | None = None) -> int:
        """Delete what ``retention_days`` no longer keeps; returns how many rows went
        (Redis: entries trimmed)."""
        if self.retention_days is None:
            return 0
        now = self.clock() if now is None else now
        return self._prune(now - self.retention_days * _DAY_S)

    # -- reading -------------------------------------------------------------------------

    def rows(self, since: TimeLike = None, until: TimeLike = None) -> list[dict[str, Any]]:
        """Rows of calls that started in ``[since, until)``, oldest first."""
        if self.background:
            self.flush()
        lo = parse_time(since, what="since")
        hi = parse_time(until, end=True, what="until")
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for r in self._read(lo, hi):  # a record written twice (a retried batch) counts once
            if _in_window(float(r["started_at"]), lo, hi) and r["record_id"] not in seen:
                seen.add(r["record_id"])
                out.append(r)
        out.sort(key=lambda r: (float(r["started_at"]), r["record_id"]))
        return out

    def records(self, since: TimeLike = None, until: TimeLike = None) -> list[CallRecord]:
        return [row_to_record(r) for r in self.rows(since, until)]

    def close(self) -> None:
        """Flush queued records and release connections."""
        if self._worker is not None and self._worker.is_alive():
            self.flush(30.0)
            self._closed = True
            with suppress(queue.Full):
                self._queue.put_nowait(None)
            self._worker.join(5.0)
        self._closed = True
        with suppress(Exception):
            atexit.unregister(self.flush)
        self._close()

    def __enter__(self) -> UsageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- backends ------------------------------------------------------------------------

    @abstractmethod
    def _write(self, rows: Sequence[dict[str, Any]]) -> None: ...

    @abstractmethod
    def _read(self, since: float | None, until: float | None) -> Iterable[dict[str, Any]]: ...

    @abstractmethod
    def _prune(self, before: float) -> int: ...

    def _close(self) -> None:  # noqa: B027 - optional
        pass


class MemoryUsageStore(UsageStore):
    """Records in a list, for one process (tests, notebooks, short scripts).

    Records are immutable, so this store keeps the objects themselves and makes
    rows only when read: an append is a lock and a list append."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.url = "memory://"
        self._kept: list[CallRecord] = []
        self._ids: set[str] = set()
        self._rows_lock = threading.Lock()

    def append(self, record: CallRecord) -> None:
        if self.background:
            super().append(record)
            return
        try:
            self._keep([record])
            self._maybe_prune()
        except Exception:
            self.failed += 1
            logger.exception("agent-guard: could not append a usage record to %s", self.url)

    def _keep(self, records: Iterable[CallRecord]) -> None:
        with self._rows_lock:
            for record in records:
                if record.record_id not in self._ids:
                    self._ids.add(record.record_id)
                    self._kept.append(record)

    def _write(self, rows: Sequence[dict[str, Any]]) -> None:
        self._keep(row_to_record(r) for r in rows)

    def _read(self, since: float | None, until: float | None) -> Iterable[dict[str, Any]]:
        with self._rows_lock:
            kept = list(self._kept)
        return [record_to_row(r) for r in kept if _in_window(r.started_at, since, until)]

    def _prune(self, before: float) -> int:
        with self._rows_lock:
            keep = [r for r in self._kept if r.started_at >= before]
            gone = len(self._kept) - len(keep)
            self._kept = keep
            self._ids = {r.record_id for r in keep}
        return gone


_SQLITE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS ag_usage (
        record_id  TEXT PRIMARY KEY,
        started_at REAL NOT NULL,
        session    TEXT NOT NULL,
        kind       TEXT NOT NULL,
        model      TEXT NOT NULL,
        cost_nano  INTEGER NOT NULL,
        row        TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS ag_usage_started ON ag_usage (started_at)",
    "CREATE INDEX IF NOT EXISTS ag_usage_session ON ag_usage (session, started_at)",
)
_SQLITE_INSERT = ("INSERT OR IGNORE INTO ag_usage (record_id, started_at, session, kind, model, "
                  "cost_nano, row) VALUES (?, ?, ?, ?, ?, ?, ?)")


class SQLiteUsageStore(UsageStore):
    """Rows in the ``ag_usage`` table of a SQLite file (the ledger's, or its own).

    Each row is one parameterised ``INSERT OR IGNORE`` keyed by ``record_id`` (so a
    record appended twice is kept once); the full row is JSON in column ``row``
    beside indexed ``started_at`` and ``session``. Connections come from a small pool any
    thread takes from (WAL, ``synchronous=NORMAL``, as the ledger).
    """

    def __init__(self, path: str, *, busy_timeout_s: float = 30.0, **options: Any) -> None:
        super().__init__(**options)
        self.path = path
        self.url = f"sqlite:///{path}"
        self._timeout = busy_timeout_s
        self._memory = is_memory_path(path)
        self._pool = SQLitePool(path, timeout=busy_timeout_s)
        if not self._memory:
            directory = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(directory):
                raise ValueError(f"cannot open the usage store {self.url!r}: directory "
                                 f"{directory} does not exist")
        with self._pool.connection() as db:
            for statement in _SQLITE_SCHEMA:
                db.execute(statement)

    def _write(self, rows: Sequence[dict[str, Any]]) -> None:
        params = [(r["record_id"], r["started_at"], r["session"], r["kind"], r["model"] or "",
                   r["cost_nano"], json.dumps(r, **_JSON)) for r in rows]  # type: ignore[arg-type]
        with self._pool.connection() as db:
            if len(params) == 1:
                db.execute(_SQLITE_INSERT, params[0])  # autocommit: one implicit transaction
                return
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(_SQLITE_INSERT, params)
                db.execute("COMMIT")
            except BaseException:
                with suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise

    def _read(self, since: float | None, until: float | None) -> Iterator[dict[str, Any]]:
        sql, args = "SELECT row FROM ag_usage", []
        where = []
        if since is not None:
            where.append("started_at >= ?")
            args.append(since)
        if until is not None:
            where.append("started_at < ?")
            args.append(until)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY started_at, record_id"
        with self._pool.connection() as db:
            rows = db.execute(sql, args).fetchall()
        for (text,) in rows:
            yield json.loads(text)

    def _prune(self, before: float) -> int:
        with self._pool.connection() as db:
            cur = db.execute("DELETE FROM ag_usage WHERE started_at < ?", (before,))
            return int(cur.rowcount)

    def _close(self) -> None:
        self._pool.close()


class RedisUsageStore(UsageStore):
    """Rows in the Redis stream ``ag:{namespace}:usage``: one ``XADD`` per record
    (field ``row``, the row as JSON), a pipeline per batch. Reads page through the
    whole stream with ``XRANGE`` (1,000 entries a page) and filter on the call's
    start time, because entry ids are append times, not call times (an injected
    clock, a long call); retention keeps the stream bounded."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "default",
        key: str | None = None,
        client: Any = None,
        max_records: int | None = None,
        **options: Any,
    ) -> None:
        store_options = {k: options.pop(k) for k in
                         ("retention_days", "background", "max_queue", "batch_size", "clock")
                         if k in options}
        super().__init__(**store_options)
        self.url = redact_url(url)
        self._raw_url, self._options = url, options
        self._owned = client is None
        if client is None:
            # a cluster client reaches a node when built: with none answering, the store
            # is built anyway and its writes count as failures until one answers
            with suppress(*REDIS_ERRORS):
                client = redis_client(url, profile=USAGE, **options)
        self._client = client
        self.key = key or f"ag:{{{quote(namespace, safe='')}}}:usage"
        if max_records is not None and max_records <= 0:
            raise ValueError(f"max_records must be positive or None, got {max_records!r}")
        self.max_records = max_records

    @property
    def client(self) -> Any:
        if self._client is None:  # raises REDIS_ERRORS while no node answers
            self._client = redis_client(self._raw_url, profile=USAGE, **self._options)
        return self._client

    def _trim_args(self) -> dict[str, Any]:
        if self.retention_days is not None:
            cut = int((self.clock() - self.retention_days * _DAY_S) * 1000)
            return {"minid": str(max(0, cut)), "approximate": True}
        if self.max_records is not None:
            return {"maxlen": self.max_records, "approximate": True}
        return {}

    def _write(self, rows: Sequence[dict[str, Any]]) -> None:
        trim = self._trim_args()
        if len(rows) == 1:
            self.client.xadd(self.key, {"row": json.dumps(rows[0], **_JSON)}, **trim)  # type: ignore[arg-type]
            return
        pipe = self.client.pipeline(transaction=False)
        for row in rows:
            pipe.xadd(self.key, {"row": json.dumps(row, **_JSON)}, **trim)  # type: ignore[arg-type]
        pipe.execute()

    def _maybe_prune(self) -> None:  # XADD trims as it goes
        pass

    def _read(self, since: float | None, until: float | None) -> Iterator[dict[str, Any]]:
        start = "-"
        while True:
            page = self.client.xrange(self.key, min=start, max="+", count=1000)
            if not page:
                return
            for _entry_id, fields in page:
                raw = fields.get(b"row", fields.get("row"))
                if raw is not None:
                    yield json.loads(raw)
            last = page[-1][0]
            start = "(" + (last.decode() if isinstance(last, bytes) else last)

    def _prune(self, before: float) -> int:
        return int(self.client.xtrim(self.key, minid=str(max(0, int(before * 1000))),
                                     approximate=False))

    def _close(self) -> None:
        if self._owned and self._client is not None:
            with suppress(Exception):
                self._client.close()
