"""Budgets for several scopes at once: the session, and users, teams, features...

``Budgets(session=Limits(...), team=Limits(max_cost_usd=500, window="month"))``
caps a session and, in the same atomic reservation, the team it belongs to.
A call is charged to every scope whose *value* is known for it: the session
always; ``team`` when the guard or the call carries a ``team`` attribute
(``Guard(attributes={"team": "acme"})`` or ``config={"metadata": {"team":
"acme"}}``). ``global_`` has no value: every call counts toward it.

A scope with a ``window`` (``"hour"``, ``"day"``, ``"week"``, ``"month"``,
``"year"``) is kept per calendar period in ``Budgets.timezone`` (UTC by
default): its ledger scope is ``team:acme@2026-11``, so the next month starts
from zero and the old month stays readable for reports.

A rolling window (``"24h"``, ``"7d"``, ``"90m"``) is kept in buckets of its unit
(hours, days, minutes; aligned on UTC): ``team:acme@24h:2026-11-30T21``. A call
is admitted when the current bucket and the earlier buckets the window covers
(23 for ``"24h"``) together leave room; spend goes to the current bucket. So a
``"24h"`` cap holds over the current partial hour plus the 23 hours before it.
Its soft thresholds are judged on the whole window and fire at most once per
window length.

Three kinds take their value from the call itself, never from metadata: ``model``
(the model a call names), ``provider`` (its provider, e.g. ``openai``) and ``tool``
(the tool's name; tool calls only). Any kind may be given per value, with ``"*"`` for
every other value: ``Budgets(model={"gpt-4o": Limits(max_cost_usd=200,
window="month")})`` caps that one model at $200 a month, across every session that
uses it, in the same reservation as the session's caps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..ledger import ScopeCaps
from .limits import WINDOWS, Limits, Window, rolling_window
from .records import utf8_text

__all__ = ["STANDARD_ATTRIBUTES", "Budgets", "ScopeRef", "Window", "attributes_from_metadata",
           "period_of"]


# How many calls' scope refs a Budgets keeps per generation (two generations).
_REFS_MAX = 4096
# Attribute names a call's metadata may carry for a scope kind.
ALIASES = {"user_id": "user", "team_id": "team", "project_id": "project",
           "env": "environment"}
GLOBAL = "global"
# Scope kinds whose value is the call's own (its model, provider or tool), not metadata.
CALL_KINDS = frozenset({"model", "provider", "tool"})
# The key of a per-value budget mapping that applies to every value not listed.
ANY_VALUE = "*"
# Attributes read from run metadata and kept on records even without a budget.
STANDARD_ATTRIBUTES = frozenset({"user", "team", "project", "feature", "environment",
                                 "tenant"})


def period_of(window: str, when: float, tz: ZoneInfo | None = None
              ) -> tuple[str, datetime, datetime]:
    """The calendar period of ``window`` holding the instant ``when`` (epoch
    seconds): its label (``2026-11``, ``2026-W48``, ``2026-11-30``...) and its
    start and end (end exclusive), aware datetimes in ``tz`` (UTC when None)."""
    now = datetime.fromtimestamp(when, tz or UTC)
    if window == "hour":  # absolute hours: a repeated local hour (DST) gets its own label
        start = now.replace(minute=0, second=0, microsecond=0)
        end = (start.astimezone(UTC) + timedelta(hours=1)).astimezone(start.tzinfo)
        label = start.strftime("%Y-%m-%dT%H")
        if start.utcoffset() != end.utcoffset() or start.fold:
            label += start.strftime("%z")
        return label, start, end
    if window == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%d"), start, _plus(start, days=1)
    if window == "week":
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        start = _plus(day, days=-day.weekday())
        year, week, _ = start.isocalendar()
        return f"{year}-W{week:02d}", start, _plus(start, days=7)
    if window == "month":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        nxt = start.replace(year=start.year + 1, month=1) if start.month == 12 else \
            start.replace(month=start.month + 1)
        return start.strftime("%Y-%m"), start, nxt
    if window == "year":
        start = now.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y"), start, start.replace(year=start.year + 1)
    rolling = rolling_window(window)
    if rolling is not None:  # the current bucket, aligned on UTC
        unit, _ = rolling
        start = datetime.fromtimestamp(when // unit * unit, UTC)
        return _bucket_label(start, unit), start, start + timedelta(seconds=unit)
    raise ValueError(f"window must be one of {', '.join(WINDOWS)}, a rolling duration "
                     f"such as '24h', or None; got {window!r}")


def _bucket_label(start: datetime, unit: int) -> str:
    return start.strftime({60: "%Y-%m-%dT%H:%M", 3600: "%Y-%m-%dT%H"}.get(unit, "%Y-%m-%d"))


def _plus(start: datetime, **delta: float) -> datetime:
    """Wall-clock arithmetic that stays right across DST changes."""
    naive = start.replace(tzinfo=None) + timedelta(**delta)
    return naive.replace(tzinfo=start.tzinfo)


@dataclass(frozen=True, slots=True)
class ScopeRef:
    """One scope a call is charged to: its kind, value and window period."""

    kind: str
    value: str | None
    period: str | None
    limits: Limits
    caps: ScopeCaps

    @property
    def scope(self) -> str:
        return self.caps.scope

    def describe(self) -> str:
        """``team 'acme' (month 2026-11)``, ``session 't-1'``, ``global (day 2026-11-30)``."""
        who = self.kind if self.value is None else f"{self.kind} {self.value!r}"
        if self.period is not None:
            who += f" ({self.limits.window} {self.period})"
        return who


# A call's refs, the span of epoch seconds they hold for (start inclusive, end exclusive)
# and the session caps they were built with (Budgets.resolve_span).
RefsSpan = tuple[tuple[ScopeRef, ...], float, float, Mapping[str, int]]


# The longest a calendar period lasts (a DST change adds an hour).
_CALENDAR_SECONDS = {"hour": 7200, "day": 90000, "week": 608400, "month": 2682000,
                     "year": 31626000}


def window_seconds(window: str | None) -> float:
    """How long a scope with this window must be kept (inf: no window, kept forever)."""
    if window is None:
        return float("inf")
    rolling = rolling_window(window)
    if rolling is not None:
        return float(rolling[0] * rolling[1])
    return float(_CALENDAR_SECONDS[window])


class Budgets:
    """Caps per scope kind. ``session`` holds the policy knobs (output reservation,
    margins, lease, unknown prices) for every call; the other kinds contribute caps,
    thresholds and windows.

    Scope kinds are free-form keyword names (``tenant=Limits(...)`` works too);
    ``global_`` is the kind ``"global"``.
    """

    __slots__ = ("_caps", "_refs", "_refs_old", "_tz", "kinds", "per_value", "session",
                 "timezone")

    def __init__(
        self,
        session: Limits | None = None,
        *,
        timezone: str = "UTC",
        global_: Limits | None = None,
        **scopes: Limits | Mapping[str, Limits] | None,
    ) -> None:
        self.session = session if session is not None else Limits()
        kinds: dict[str, Limits] = {}
        per_value: dict[str, dict[str, Limits]] = {}
        for kind, limits in {**scopes, GLOBAL: global_}.items():
            if limits is None:
                continue
            if kind in ("session", *ALIASES) or not kind.isidentifier():
                raise ValueError(f"Budgets: {kind!r} cannot name a scope kind; use "
                                 f"{ALIASES.get(kind, 'another name')!r}")
            if isinstance(limits, Mapping) and kind != GLOBAL:
                per_value[kind] = _per_value(kind, limits)
                continue
            if not isinstance(limits, Limits):
                raise TypeError(f"Budgets({kind}=...) must be a Limits (or, per value, a "
                                f"mapping of values to Limits), got {type(limits).__name__}")
            kinds[kind] = limits
        if not isinstance(self.session, Limits):
            raise TypeError(f"Budgets(session=...) must be a Limits, got "
                            f"{type(self.session).__name__}")
        self.kinds: Mapping[str, Limits] = kinds
        #: kinds budgeted per value: kind -> {value or "*": Limits}
        self.per_value: Mapping[str, Mapping[str, Limits]] = per_value
        # each budget's caps (Limits is frozen), by the Limits' identity
        self._caps = {id(lim): lim.caps() for lim in (
            *kinds.values(), *(lim for by in per_value.values() for lim in by.values()))}
        # (session, session caps, attribute values) -> (refs, valid from, valid until,
        # session caps): the scopes of a call change only when its window periods do
        self._refs: dict[tuple[Any, ...], RefsSpan] = {}
        self._refs_old: dict[tuple[Any, ...], RefsSpan] = {}
        self.timezone = timezone
        try:
            self._tz = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"Budgets(timezone={timezone!r}) is not an IANA time zone "
                             "name such as 'UTC' or 'Europe/Paris'") from exc

    @classmethod
    def of(cls, limits: Limits | Budgets | None) -> Budgets:
        if isinstance(limits, Budgets):
            return limits
        if limits is None or isinstance(limits, Limits):
            return cls(limits)
        raise TypeError(f"limits must be Limits or Budgets, got {type(limits).__name__}")

    def check_retention(self, kept_seconds: float | None, what: str) -> None:
        """Refuse a ledger that forgets idle scopes (after ``kept_seconds``) sooner than a
        non-session budget's window: the forgotten budget would start again from zero."""
        if kept_seconds is None:
            return
        for kind, limits in self.all_limits():
            needed = window_seconds(limits.window)
            if needed > kept_seconds:
                keep = "forever (it has no window)" if needed == float("inf") else \
                    f"for {needed:,.0f} s"
                raise ValueError(
                    f"Budgets({kind if kind != GLOBAL else 'global_'}=Limits(window="
                    f"{limits.window!r})) needs its ledger scopes kept {keep}, but {what} "
                    f"forgets idle scopes after {kept_seconds:,.0f} s, and a forgotten "
                    f"{kind} budget would start again from zero. Raise that to at least "
                    f"{needed:,.0f} s, drop it, or give the budget a shorter window.")

    def all_limits(self) -> list[tuple[str, Limits]]:
        """Every budget but the session's: ``(kind, limits)``, per-value ones included."""
        return [*self.kinds.items(),
                *((k, lim) for k, by in self.per_value.items() for lim in by.values())]

    def kind_names(self) -> frozenset[str]:
        return frozenset(self.kinds) | frozenset(self.per_value)

    def attribute_names(self) -> frozenset[str]:
        """The kinds whose values a call's metadata may carry (not the call kinds)."""
        return self.kind_names() - {GLOBAL} - CALL_KINDS

    def call_kinds(self) -> frozenset[str]:
        """The budgeted kinds whose value is the call's own (model, provider, tool)."""
        return self.kind_names() & CALL_KINDS

    def limits_for(self, kind: str, value: str | None) -> Limits | None:
        """The budget of ``kind`` for ``value`` (a per-value one, else its ``"*"``)."""
        limits = self.kinds.get(kind)
        if limits is not None:
            return limits
        by = self.per_value.get(kind)
        if by is None or value is None:
            return None
        return by.get(value) or by.get(ANY_VALUE)

    def resolve(self, session: str, attributes: Mapping[str, str], now: float,
                session_caps: Mapping[str, int], extra: Mapping[str, int] | None = None
                ) -> list[ScopeRef]:
        """The scopes a call of ``session`` with ``attributes`` is charged to, at
        ``now``. ``extra`` caps (per-call counters such as loop detection) apply to
        the session only."""
        if extra:
            return self._resolve(session, attributes, now, {**session_caps, **extra})[0]
        return list(self.resolve_span(session, attributes, now, session_caps)[0])

    def resolve_span(self, session: str, attributes: Mapping[str, str], now: float,
                     session_caps: Mapping[str, int]) -> RefsSpan:
        """:meth:`resolve`'s refs (shared between calls: a tuple), the span of time they
        hold for (their window periods': ``start <= now < end``) and the session caps."""
        if self.kinds or self.per_value:
            key: tuple[Any, ...] = (session, id(session_caps), *[
                attributes.get(kind) or None for kind in (*self.kinds, *self.per_value)
                if kind != GLOBAL])
        else:  # session-only budgets: no generator per call
            key = (session, id(session_caps))
        hit = self._refs.get(key)
        if hit is None:
            hit = self._refs_old.get(key)
        if hit is not None and hit[1] <= now < hit[2] and hit[3] is session_caps:
            return hit
        refs, start, end = self._resolve(session, attributes, now, session_caps)
        if len(self._refs) >= _REFS_MAX:  # two generations: the older one is dropped
            self._refs_old, self._refs = self._refs, {}
        hit = self._refs[key] = (tuple(refs), start, end, session_caps)
        return hit

    def _resolve(self, session: str, attributes: Mapping[str, str], now: float,
                 caps: Mapping[str, int]) -> tuple[list[ScopeRef], float, float]:
        """The refs, and the span of time they hold for (their window periods')."""
        ref, start, end = self._ref_span("session", session, self.session, caps, now,
                                         raw=True)
        refs = [ref]
        for kind in (*self.kinds, *self.per_value):
            value = None if kind == GLOBAL else attributes.get(kind)
            if kind != GLOBAL and not value:
                continue
            limits = self.limits_for(kind, value)
            if limits is not None:
                ref, r_start, r_end = self._ref_span(kind, value, limits, self._caps_of(limits),
                                                     now)
                refs.append(ref)
                start, end = max(start, r_start), min(end, r_end)
        return refs, start, end

    def _caps_of(self, limits: Limits) -> Mapping[str, int]:
        caps = self._caps.get(id(limits))
        return caps if caps is not None else limits.caps()

    def ref(self, kind: str, value: str | None, now: float) -> ScopeRef:
        """The scope of ``kind``/``value`` in the window holding ``now``."""
        if kind == "session":
            if value is None:
                raise ValueError("a session scope needs a session id")
            return self._ref_span(kind, value, self.session, self.session.caps(), now,
                                  raw=True)[0]
        limits = self.limits_for(kind, value)
        if limits is None:
            raise KeyError(f"no budget for scope kind {kind!r}"
                           f"{'' if value is None else f' value {value!r}'}; configured: "
                           f"{', '.join(['session', *self.kinds, *self.per_value])}")
        return self._ref_span(kind, None if kind == GLOBAL else value, limits,
                              self._caps_of(limits), now)[0]

    def _ref_span(self, kind: str, value: str | None, limits: Limits,
                  caps: Mapping[str, int], now: float, raw: bool = False
                  ) -> tuple[ScopeRef, float, float]:
        """The ref, and the span of epoch seconds its window period covers."""
        if value is None:
            name = kind
        elif raw:  # session ids stay readable (text UTF-8 cannot hold escaped, for SQLite)
            name = f"{kind}:{utf8_text(value)}"
        else:  # other values are quoted (no ':' or '@' in them)
            name = f"{kind}:{quote(value, safe='', errors='surrogatepass')}"
        period = None
        history: tuple[str, ...] = ()
        window = limits.window
        start, end = float("-inf"), float("inf")
        if window is not None:
            rolling = rolling_window(window)
            if rolling is None:
                period, p_start, p_end = period_of(window, now, self._tz)
                start, end = p_start.timestamp(), p_end.timestamp()
                name = f"{name}@{period}"
            else:  # the current bucket, and the earlier ones the window still covers
                unit, buckets = rolling
                first = int(now // unit) * unit
                period = _bucket_label(datetime.fromtimestamp(first, UTC), unit)
                history = tuple(
                    f"{name}@{window}:"
                    f"{_bucket_label(datetime.fromtimestamp(first - i * unit, UTC), unit)}"
                    for i in range(1, buckets))
                name = f"{name}@{window}:{period}"
                start, end = float(first), float(first + unit)
        return ScopeRef(kind, value, period, limits, ScopeCaps(name, caps, history)), start, end

    def __repr__(self) -> str:
        parts = [f"session={self.session!r}"] + [
            f"{k}={v!r}" for k, v in (*self.kinds.items(), *self.per_value.items())]
        return f"Budgets({', '.join(parts)})"


def _per_value(kind: str, by: Mapping[str, Limits]) -> dict[str, Limits]:
    out: dict[str, Limits] = {}
    for value, limits in by.items():
        if not isinstance(value, str) or not value:
            raise TypeError(f"Budgets({kind}={{...}}) keys must be {kind} names or '*', "
                            f"got {value!r}")
        if not isinstance(limits, Limits):
            raise TypeError(f"Budgets({kind}={{{value!r}: ...}}) must be a Limits, got "
                            f"{type(limits).__name__}")
        out[value] = limits
    if not out:
        raise ValueError(f"Budgets({kind}={{}}) names no {kind}; give {{name: Limits(...)}} "
                         f"or {{'*': Limits(...)}}")
    return out


#: attribute names -> the metadata keys that can carry one of them
_METADATA_KEYS: dict[frozenset[str], frozenset[str]] = {}


def metadata_keys(names: frozenset[str]) -> frozenset[str]:
    """The metadata keys that can carry one of the attributes ``names`` (a metadata
    without any of them carries none: :func:`attributes_from_metadata` is ``{}``)."""
    keys = _METADATA_KEYS.get(names)
    if keys is None:
        keys = _METADATA_KEYS[names] = names.union(
            alias for alias, kind in ALIASES.items() if kind in names) | {"agent_guard"}
        if len(_METADATA_KEYS) > 256:
            _METADATA_KEYS.clear()
    return keys


def attributes_from_metadata(metadata: Mapping[str, object] | None,
                             names: frozenset[str]) -> dict[str, str]:
    """Scope values carried in a run's metadata: keys named after a scope kind
    (``team``; ``user_id`` for ``user``), or the dict ``metadata["agent_guard"]``."""
    if not metadata:
        return {}
    if metadata_keys(names).isdisjoint(metadata.keys()):  # most calls: none names one
        return {}
    out: dict[str, str] = {}
    for key, value in metadata.items():
        kind = ALIASES.get(key, key)
        if kind in names and isinstance(value, str | int) and not isinstance(value, bool):
            out[kind] = str(value)
    nested = metadata.get("agent_guard")
    if isinstance(nested, Mapping):
        for key, value in nested.items():
            if isinstance(key, str) and isinstance(value, str | int) \
                    and not isinstance(value, bool):
                out[ALIASES.get(key, key)] = str(value)
    return out
