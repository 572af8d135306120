"""Usage reports: cost, calls, tokens, caching, routing and redundancy, grouped.

    from agent_guard.finops import report

    report(store, group_by=("team", "model"), since="2026-11-01", where={"team": "acme"})
    report(store, group_by="session", top=10)        # the ten dearest sessions
    report(store, group_by="day")                    # the trend, oldest day first
    report(store, group_by=())                       # one row: the totals

``report`` returns a list of plain dicts (JSON-ready), one per group, dearest
first (by time for ``hour``/``day``/``week``/``month`` alone). Amounts are
integer nano-USD (``cost_nano``, ``saved_nano``) and exact USD strings
(``cost_usd``...): ``cost_nano`` summed over the rows is exactly what the ledger
settled for those calls. :func:`to_dataframe` turns rows into a pandas
DataFrame when pandas is installed.

Columns of a row (besides the group keys):

- ``calls`` (model and tool calls), ``model_calls``, ``tool_calls``, ``sessions``;
- ``cost_usd``, ``cost_per_call_usd`` (per model call), ``cost_per_session_usd``;
  ``model_cost_usd`` and ``tool_cost_usd``: the model calls' and the paid tool
  calls' shares of ``cost_usd`` (``*_nano`` beside each, exact);
- ``input_tokens``, ``cache_read_tokens``, ``cache_creation_tokens``,
  ``output_tokens``, ``reasoning_tokens``, ``total_tokens``;
- ``cache_hits`` (model and tool calls answered from a cache), ``cache_hit_rate``
  (of all calls), ``saved_usd`` (what those hits would have cost);
- ``tiers``: model calls per router tier (``"none"`` for unrouted calls) and
  ``routing_mix``, the same as shares;
- ``errors``, ``aborted``, ``estimated_calls`` (usage counted by the guard),
  ``unpriced_calls``;
- redundancy, see below; ``first_at`` / ``last_at`` (ISO 8601 UTC).

**Redundant calls.** Records carry no prompts or tool arguments, so redundancy
is defined from what they do carry. A call is redundant when it is

1. a *cache hit*: the agent asked for work already done (and a cache answered), or
2. a *duplicate*: a paid model call of the same session, model and node whose
   input, cached-input and output token counts all equal those of an earlier
   call in the report's window. Agents re-send a growing history, so two calls
   with identical counts on both sides are, in practice, the same request sent
   again (a retry, or a loop that a cache would have answered).

``duplicate_calls`` and ``duplicate_cost_usd`` (money a cache would have saved)
count (2); ``redundant_calls = cache_hits + duplicate_calls`` and
``redundant_share = redundant_calls / calls``. Loops the guard refused
(``LoopDetected``) raise before the call and produce no record, so they are not
counted.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, tzinfo
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..engine.records import CallRecord
from ..engine.usage import NANO_PER_USD
from .store import ATTRIBUTE_COLUMNS, TimeLike, UsageStore, format_usd, parse_time, record_to_row

__all__ = ["GROUP_KEYS", "REPORT_COLUMNS", "report", "to_dataframe", "totals"]

Row = Mapping[str, Any]
Source = UsageStore | Iterable[Row] | Iterable[CallRecord]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _time_key(fmt: str, tz: tzinfo = UTC) -> Callable[[Row], str]:
    return lambda r: datetime.fromtimestamp(float(r["started_at"]), tz).strftime(fmt)


def _week_key(tz: tzinfo = UTC) -> Callable[[Row], str]:
    def week(r: Row) -> str:
        year, number, _ = datetime.fromtimestamp(float(r["started_at"]), tz).isocalendar()
        return f"{year}-W{number:02d}"
    return week


def _time_keys(tz: tzinfo) -> dict[str, Callable[[Row], str]]:
    """hour/day/week/month of a call's start, on the clock of ``tz``."""
    return {"hour": _time_key("%Y-%m-%dT%H", tz), "day": _time_key("%Y-%m-%d", tz),
            "week": _week_key(tz), "month": _time_key("%Y-%m", tz)}


def _column(name: str) -> Callable[[Row], Any]:
    return lambda r: r.get(name)


GROUP_KEYS: dict[str, Callable[[Row], Any]] = {
    **{name: _column(name) for name in (
        "session", *ATTRIBUTE_COLUMNS, "provider", "node", "tier", "route", "kind",
        "tool", "outcome")},
    "model": lambda r: r.get("model") or None,  # tool calls have no model
    **_time_keys(UTC),
}
_TIME_KEYS = frozenset({"hour", "day", "week", "month"})

REPORT_COLUMNS = (
    "calls", "model_calls", "tool_calls", "sessions",
    "cost_nano", "cost_usd", "model_cost_nano", "model_cost_usd", "tool_cost_nano",
    "tool_cost_usd", "cost_per_call_usd", "cost_per_session_usd",
    "input_tokens", "cache_read_tokens", "cache_creation_tokens", "output_tokens",
    "reasoning_tokens", "total_tokens",
    "cache_hits", "cache_hit_rate", "saved_nano", "saved_usd",
    "tiers", "routing_mix",
    "duplicate_calls", "duplicate_cost_usd", "redundant_calls", "redundant_share",
    "errors", "aborted", "estimated_calls", "unpriced_calls", "first_at", "last_at",
)
_TOKENS = ("input_tokens", "cache_read_tokens", "cache_creation_tokens", "output_tokens",
           "reasoning_tokens", "total_tokens")


def _key_fn(name: str, tz: tzinfo = UTC) -> Callable[[Row], Any]:
    if name in _TIME_KEYS and tz is not UTC:
        return _time_keys(tz)[name]
    if name in GROUP_KEYS:
        return GROUP_KEYS[name]
    if name.startswith("attr:") and len(name) > 5:
        attr = name[5:]
        return lambda r: json.loads(r.get("attributes") or "{}").get(attr)
    known = ", ".join([*GROUP_KEYS, "attr:<name>"])
    raise ValueError(f"unknown report key {name!r}; use one of: {known}")


def _group_names(group_by: str | Sequence[str] | None) -> list[str]:
    if group_by is None:
        return []
    names = group_by.split(",") if isinstance(group_by, str) else list(group_by)
    out = [n.strip() for n in names if n and n.strip()]
    for n in out:
        _key_fn(n)
    if len(set(out)) != len(out):
        raise ValueError(f"group_by names a key twice: {out}")
    return out


def zone(tz: str | tzinfo | None) -> tzinfo:
    """A tzinfo from an IANA name (None: UTC), or a clear error."""
    if tz is None or tz in ("UTC", "utc", "Z"):
        return UTC
    if isinstance(tz, tzinfo):
        return tz
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {tz!r}: use an IANA name such as "
                         "'Europe/Paris' or 'UTC'") from exc


def _as_rows(source: Source, since: TimeLike, until: TimeLike, tz: tzinfo = UTC
             ) -> Sequence[Row]:
    lo = parse_time(since, what="since", tz=tz)
    hi = parse_time(until, end=True, what="until", tz=tz)
    if isinstance(source, UsageStore):
        return source.rows(lo, hi)
    rows: list[Row] = []
    for item in source:
        row = record_to_row(item) if isinstance(item, CallRecord) else item
        started = float(row["started_at"])
        if (lo is None or started >= lo) and (hi is None or started < hi):
            rows.append(row)
    rows.sort(key=lambda r: float(r["started_at"]))
    return rows


def _matches(where: Mapping[str, Any], tz: tzinfo = UTC) -> Callable[[Row], bool]:
    tests: list[tuple[Callable[[Row], Any], frozenset[str] | None]] = []
    for name, wanted in where.items():
        fn = _key_fn(name, tz)
        if wanted is None:
            tests.append((fn, None))
        elif isinstance(wanted, str | int | float):
            tests.append((fn, frozenset({str(wanted)})))
        else:
            tests.append((fn, frozenset(str(w) for w in wanted)))

    def ok(row: Row) -> bool:
        for fn, values in tests:
            value = fn(row)
            if values is None:
                if value is not None:
                    return False
            elif value is None or str(value) not in values:
                return False
        return True

    return ok


def _duplicates(rows: Sequence[Row]) -> set[str]:
    """Record ids of paid model calls repeating an earlier call's exact token counts
    in the same session, model and node (rows oldest first)."""
    seen: set[tuple[Any, ...]] = set()
    dupes: set[str] = set()
    for r in rows:
        if r["kind"] != "model" or r["outcome"] not in ("ok", "aborted") or \
                not int(r["total_tokens"]):
            continue
        key = (r["session"], r["model"], r.get("node"), int(r["input_tokens"]),
               int(r["cache_read_tokens"]), int(r["output_tokens"]))
        if key in seen:
            dupes.add(r["record_id"])
        seen.add(key)
    return dupes


class _Acc:
    __slots__ = ("aborted", "cache_hits", "calls", "cost", "dup_cost", "dups", "errors",
                 "estimated", "first", "last", "model_calls", "saved", "sessions", "tiers",
                 "tokens", "tool_calls", "tool_cost", "unpriced")

    def __init__(self) -> None:
        self.calls = self.model_calls = self.tool_calls = 0
        self.cost = self.saved = self.dup_cost = self.tool_cost = 0
        self.cache_hits = self.dups = self.errors = self.aborted = 0
        self.estimated = self.unpriced = 0
        self.tokens = dict.fromkeys(_TOKENS, 0)
        self.tiers: Counter[str] = Counter()
        self.sessions: set[str] = set()
        self.first = float("inf")
        self.last = float("-inf")

    def add(self, r: Row, duplicate: bool) -> None:
        self.calls += 1
        cost = int(r["cost_nano"])
        self.cost += cost
        self.saved += int(r["saved_nano"])
        self.sessions.add(r["session"])
        started = float(r["started_at"])
        self.first = min(self.first, started)
        self.last = max(self.last, started)
        outcome = r["outcome"]
        if outcome == "cache_hit":
            self.cache_hits += 1
        elif outcome == "error":
            self.errors += 1
        elif outcome == "aborted":
            self.aborted += 1
        if r["kind"] == "tool":
            self.tool_calls += 1
            self.tool_cost += cost
            return
        self.model_calls += 1
        for name in _TOKENS:
            self.tokens[name] += int(r[name])
        self.tiers[r.get("tier") or "none"] += 1
        self.estimated += bool(r["usage_estimated"])
        self.unpriced += bool(r.get("unpriced"))
        if duplicate:
            self.dups += 1
            self.dup_cost += cost

    def row(self) -> dict[str, Any]:
        redundant = self.cache_hits + self.dups
        return {
            "calls": self.calls,
            "model_calls": self.model_calls,
            "tool_calls": self.tool_calls,
            "sessions": len(self.sessions),
            "cost_nano": self.cost,
            "cost_usd": format_usd(self.cost),
            "model_cost_nano": self.cost - self.tool_cost,
            "model_cost_usd": format_usd(self.cost - self.tool_cost),
            "tool_cost_nano": self.tool_cost,
            "tool_cost_usd": format_usd(self.tool_cost),
            "cost_per_call_usd": _per(self.cost, self.model_calls),
            "cost_per_session_usd": _per(self.cost, len(self.sessions)),
            **self.tokens,
            "cache_hits": self.cache_hits,
            "cache_hit_rate": _share(self.cache_hits, self.calls),
            "saved_nano": self.saved,
            "saved_usd": format_usd(self.saved),
            "tiers": dict(sorted(self.tiers.items(), key=lambda kv: (-kv[1], kv[0]))),
            "routing_mix": {t: _share(n, self.model_calls) for t, n in
                            sorted(self.tiers.items(), key=lambda kv: (-kv[1], kv[0]))},
            "duplicate_calls": self.dups,
            "duplicate_cost_usd": format_usd(self.dup_cost),
            "redundant_calls": redundant,
            "redundant_share": _share(redundant, self.calls),
            "errors": self.errors,
            "aborted": self.aborted,
            "estimated_calls": self.estimated,
            "unpriced_calls": self.unpriced,
            "first_at": _iso(self.first) if self.calls else None,
            "last_at": _iso(self.last) if self.calls else None,
        }


def _per(nanos: int, n: int) -> str | None:
    if not n:
        return None
    value = (Decimal(nanos) / n / NANO_PER_USD).quantize(Decimal("1e-9"), ROUND_HALF_EVEN)
    return f"{value:f}"


def _share(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def report(
    source: Source,
    group_by: str | Sequence[str] | None = ("team",),
    *,
    since: TimeLike = None,
    until: TimeLike = None,
    where: Mapping[str, Any] | None = None,
    top: int | None = None,
    tz: str | tzinfo | None = None,
) -> list[dict[str, Any]]:
    """Group the calls of ``source`` (a :class:`UsageStore`, rows or records).

    ``group_by``: keys from :data:`GROUP_KEYS` (``session``, ``user``, ``team``,
    ``feature``, ``project``, ``environment``, ``tenant``, ``model``, ``provider``,
    ``node``, ``tier``, ``route``, ``kind``, ``tool``, ``outcome``, ``hour``,
    ``day``, ``week``, ``month``) or ``attr:<name>`` for any other attribute; a
    tuple groups by all of them, ``()`` gives one row of totals. ``since`` /
    ``until``: the calls' start time, ``until`` exclusive (a bare date includes
    that whole day). ``where``: key -> value (or several values, or None
    for "not set"). ``top``: keep the first N rows. ``tz`` (an IANA name or a
    tzinfo; UTC by default) is the clock of bare dates and of the hour, day,
    week and month keys: give a budget's ``Budgets(timezone=...)`` to report
    the same months it caps.
    """
    clock = zone(tz)
    names = _group_names(group_by)
    keys = [_key_fn(n, clock) for n in names]
    if where:
        _group_names(list(where))
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ValueError(f"top must be a positive integer, got {top!r}")
    rows = _as_rows(source, since, until, clock)
    if where:
        ok = _matches(where, clock)
        rows = [r for r in rows if ok(r)]
    dupes = _duplicates(rows)
    groups: dict[tuple[Any, ...], _Acc] = {}
    for r in rows:
        k = tuple(fn(r) for fn in keys)
        acc = groups.get(k)
        if acc is None:
            acc = groups[k] = _Acc()
        acc.add(r, r["record_id"] in dupes)
    if not groups and not names:
        groups[()] = _Acc()
    out = [{**dict(zip(names, k, strict=True)), **acc.row()} for k, acc in groups.items()]
    if names and set(names) <= _TIME_KEYS:
        out.sort(key=lambda row: tuple(str(row[n]) for n in names))
    else:
        out.sort(key=lambda row: (-row["cost_nano"], -row["calls"],
                                  tuple("" if row[n] is None else str(row[n]) for n in names)))
    return out[:top] if top is not None else out


def totals(source: Source, *, since: TimeLike = None, until: TimeLike = None,
           where: Mapping[str, Any] | None = None, tz: str | tzinfo | None = None
           ) -> dict[str, Any]:
    """One row: every call of ``source`` in the window, together."""
    return report(source, (), since=since, until=until, where=where, tz=tz)[0]


def to_dataframe(rows: Iterable[Mapping[str, Any]]) -> Any:
    """Report rows (or store rows) as a pandas DataFrame; pandas is optional."""
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError("to_dataframe needs pandas, which is optional: pip install pandas "
                          "(or use the rows, which are plain dicts)") from exc
    rows = list(rows)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return pd.DataFrame(rows, columns=columns)
