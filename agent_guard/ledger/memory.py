"""In-process ledger (``memory://``): one lock, plain dicts.

Safe across threads and asyncio tasks of one process (no await happens while
the lock is held). Sessions do not outlive the process: use SQLite or Redis
for that.

Memory bound: by default every scope is kept for the life of the process. With
``max_idle_seconds`` (``memory://?max_idle_seconds=3600``) a scope with no open
reservation that nothing touched for that long is dropped, and with
``max_scopes`` the least recently used scopes without open reservations are
dropped beyond that many. Finished reservation ids (which make a repeated
settle a no-op) are then kept only as long as the idle horizon and at most
``16 * max_scopes`` of them. The trade-off: an evicted session starts again from
zero, so its budget resets; pick a horizon longer than any session lasts.
"""

from __future__ import annotations

import heapq
import math
import sys
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from operator import attrgetter
from typing import Any

from .base import (
    DONE_RETENTION_SECONDS,
    Denial,
    Ledger,
    Reservation,
    ScopeCaps,
    ScopeTotals,
    Settlement,
    _ReservationSlots,
    _SettlementSlots,
    check_amounts,
    new_reservation_id,
)

__all__ = ["MemoryLedger"]

_new_object = object.__new__


_DONE_FLOOR = 4096  # finished ids are pruned only beyond this many
_PAST_SUMS_MAX = 4096  # rolling windows whose earlier buckets' sums are kept
_NEVER = float("inf")
_AT_ONCE = float("-inf")  # as ``_due``: the next reserve or charge runs the upkeep
_NO_BOUND = sys.maxsize
_NO_USE: Mapping[str, int] = {}  # a scope without a history: nothing earlier counts

# a history's (spent, reserved, spent + reserved), each summed over its buckets
_Sums = tuple[dict[str, int], dict[str, int], dict[str, int]]


class _Counters:
    __slots__ = ("extra", "holds", "reserved", "spent", "touched")

    def __init__(self) -> None:
        self.spent: defaultdict[str, int] = defaultdict(int)
        self.reserved: defaultdict[str, int] = defaultdict(int)
        self.extra: defaultdict[str, int] = defaultdict(int)
        self.holds = 0  # open reservations on this scope: never evicted while > 0
        self.touched = 0.0

    def snapshot(self, scope: str) -> ScopeTotals:
        return ScopeTotals(scope, dict(self.spent), dict(self.reserved), dict(self.extra))


def _due_after(when: float, retention: float) -> float:
    """The first clock reading ``now`` at which the upkeep drops a finished id of
    ``when``: its test is ``when <= now - retention`` in floats, whose rounding
    ``when + retention`` may miss by an ulp either way; stepping to the exact
    boundary keeps "the upkeep is due" the same as "it would drop one"."""
    due = when + retention
    if not math.isfinite(due):
        return due
    while when <= math.nextafter(due, _AT_ONCE) - retention:
        due = math.nextafter(due, _AT_ONCE)
    while not when <= due - retention:
        due = math.nextafter(due, _NEVER)
    return due


def _policy(name: str) -> Any:
    """A policy attribute kept in ``name``: setting it makes the upkeep due at once (it
    then runs under the new policy on the next reserve or charge)."""
    def set_(self: MemoryLedger, value: object) -> None:
        setattr(self, name, value)
        self._due = _AT_ONCE

    return property(attrgetter(name), set_)


class MemoryLedger(Ledger):
    """In-process budgets; see the module docstring for the eviction policy.

    Per reserve the upkeep (give back expired leases, evict, forget old finished ids)
    runs only when it would change something: ``_due`` is the first clock reading at
    which it would (the first lease's expiry, the next idle sweep, the oldest finished
    id's retention; at once while scopes are over ``max_scopes``) and ``_done_bound``
    the count of finished ids beyond which it prunes them. Running it on every reserve
    (as a no-op nearly always) cost two calls per reserve."""

    def __init__(
        self,
        url: str = "memory://",
        *,
        clock: Callable[[], float] = time.time,
        max_idle_seconds: float | None = None,
        max_scopes: int | None = None,
    ) -> None:
        if max_idle_seconds is not None and max_idle_seconds <= 0:
            raise ValueError(f"max_idle_seconds must be > 0, got {max_idle_seconds}")
        if max_scopes is not None and max_scopes < 1:
            raise ValueError(f"max_scopes must be >= 1, got {max_scopes}")
        self.url = url
        self._clock = clock
        self._due = _AT_ONCE  # the first reserve or charge runs the upkeep
        self._done_bound = _DONE_FLOOR
        self.max_idle_seconds = max_idle_seconds
        self.max_scopes = max_scopes
        self._lock = threading.Lock()
        self._scopes: OrderedDict[str, _Counters] = OrderedDict()  # least recently used first
        self._open: dict[str, Reservation] = {}
        self._leases: list[tuple[float, str]] = []  # heap of (expires_at, id)
        self._done: OrderedDict[str, float] = OrderedDict()  # finished id -> when, oldest first
        self._retention = float(DONE_RETENTION_SECONDS)
        if max_idle_seconds is not None:
            self._retention = min(self._retention, float(max_idle_seconds))
        self._max_done = None if max_scopes is None else max(_DONE_FLOOR, 16 * max_scopes)
        self._next_sweep = 0.0
        self.evicted = 0  # scopes dropped by the policy so far
        # a rolling window's earlier buckets -> their (spent, reserved) summed; and each
        # bucket -> the histories it is in (see _past)
        self._past_sums: dict[tuple[str, ...], _Sums] = {}
        self._past_of: dict[str, set[tuple[str, ...]]] = {}

    @classmethod
    def from_url(cls, url: str, **options: object) -> MemoryLedger:
        """``memory://?max_idle_seconds=3600&max_scopes=100000``; keyword options win."""
        from ..stores import parse_url

        parsed = parse_url(url, "ledger")
        if parsed.backend != "memory":
            raise ValueError(f"not a memory:// URL: {parsed.redacted!r}")
        return cls(url, **{**parsed.kind_options, **options})  # type: ignore[arg-type]

    _max_idle: float | None
    _max_scopes: int | None
    #: the policy (see the module docstring); either may be changed later
    max_idle_seconds: float | None = _policy("_max_idle")
    max_scopes: int | None = _policy("_max_scopes")

    @property
    def scope_count(self) -> int:
        """How many scopes are kept now."""
        return len(self._scopes)

    # -- helpers (lock held) ---------------------------------------------------------

    def has_scope(self, scope: str) -> bool:
        """Whether ``scope`` is kept (not yet seen, or evicted, is False)."""
        with self._lock:
            return scope in self._scopes

    def _past(self, scopes: Sequence[ScopeCaps], now: float) -> dict[str, _Sums] | None:
        """Per scope with a history (a rolling window's earlier buckets): the history's
        spent and reserved, summed, and the two added (what admission reads). A sum is
        kept until one of its buckets changes (a late settle, a release, an expired hold,
        an eviction), so a call reads a window of 23 buckets in O(1); its buckets are
        marked used when it is summed (a bucket is touched at least once per window
        length, so an idle horizon no shorter than the window never drops one the window
        still reads)."""
        out: dict[str, _Sums] | None = None
        for sc in scopes:
            if not sc.history:
                continue
            sums = self._past_sums.get(sc.history)
            if sums is None:
                spent: defaultdict[str, int] = defaultdict(int)
                reserved: defaultdict[str, int] = defaultdict(int)
                for name in sc.history:
                    counters = self._scopes.get(name)
                    if counters is not None:
                        counters.touched = now
                        self._scopes.move_to_end(name)
                        for dim, v in counters.spent.items():
                            spent[dim] += v
                        for dim, v in counters.reserved.items():
                            reserved[dim] += v
                    self._past_of.setdefault(name, set()).add(sc.history)
                if len(self._past_sums) >= _PAST_SUMS_MAX:
                    self._past_sums.clear()
                    self._past_of.clear()
                    for name in sc.history:
                        self._past_of[name] = {sc.history}
                used = dict(spent)
                for dim, v in reserved.items():
                    used[dim] = used.get(dim, 0) + v
                sums = self._past_sums[sc.history] = (dict(spent), dict(reserved), used)
            if out is None:
                out = {}
            out[sc.scope] = sums
        return out

    def _changed(self, scope: str) -> None:
        """``scope``'s spent or reserved changed: forget the history sums it is in."""
        for history in self._past_of.pop(scope, ()):
            self._past_sums.pop(history, None)

    def _new_scope(self, scope: str) -> _Counters:
        """Keep counters for a scope not kept yet; beyond ``max_scopes``, the upkeep is
        due at once (it evicts at the next reserve or charge)."""
        counters = self._scopes[scope] = _Counters()
        if self._max_scopes is not None and len(self._scopes) > self._max_scopes:
            self._due = _AT_ONCE
        return counters

    def _scope(self, scope: str, now: float) -> _Counters:
        """The counters of ``scope``, created if needed, marked as just used."""
        counters = self._scopes.get(scope) or self._new_scope(scope)  # (always truthy)
        self._scopes.move_to_end(scope)  # least recently used first
        counters.touched = now
        return counters

    def _admit(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int], now: float
               ) -> Denial | None:
        """Keep and mark used the counters of every scope (each as :meth:`_scope`), then
        the first denial: the rule of :func:`~agent_guard.ledger.base.first_denial`, over
        the live counters and each history's summed (spent, reserved) (:meth:`_past`),
        without a ScopeTotals per scope and call. (Counters are found again by name, not
        paired by zip: a zip object costs more than a dict lookup per scope.)"""
        kept = self._scopes
        history = False
        for sc in scopes:  # every scope is marked used (and created) before any check
            name = sc.scope
            counters = kept.get(name) or self._new_scope(name)  # (always truthy)
            kept.move_to_end(name)  # least recently used first
            counters.touched = now
            if sc.history:
                history = True
        past = self._past(scopes, now) if history else None
        for sc in scopes:
            counters = kept[sc.scope]
            sums = past.get(sc.scope) if past is not None and sc.history else None
            spent_of, held_of, extra_of = counters.spent, counters.reserved, counters.extra
            if sums is None and not extra_of:
                # the common case (no history, no extension: both add 0), screened
                # without their lookups; a refusal is found again, and told, below
                for dim, cap in sc.caps.items():
                    want = amounts.get(dim, 0)
                    if want > 0 and spent_of.get(dim, 0) + held_of.get(dim, 0) + want > cap:
                        break
                else:
                    continue
            used = _NO_USE if sums is None else sums[2]
            for dim, cap in sc.caps.items():
                want = amounts.get(dim, 0)
                if want <= 0:
                    continue
                if (spent_of.get(dim, 0) + held_of.get(dim, 0) + used.get(dim, 0) + want
                        > cap + extra_of.get(dim, 0)):  # refused: say with what
                    spent, held = spent_of.get(dim, 0), held_of.get(dim, 0)
                    if sums is not None:
                        spent += sums[0].get(dim, 0)
                        held += sums[1].get(dim, 0)
                    extra = extra_of.get(dim, 0)
                    return Denial(sc.scope, dim, cap + extra, spent, held, want)
        return None

    def _reclaim_locked(self, now: float) -> int:
        """The upkeep: give back expired holds, apply the policy, note when it is due."""
        n = 0
        while self._leases and self._leases[0][0] <= now:
            _, rid = heapq.heappop(self._leases)
            res = self._open.get(rid)
            if res is not None and res.expires_at <= now:
                del self._open[rid]
                self._unhold(res)
                n += 1
        self._evict_locked(now)
        self._note_due()
        return n

    def _note_due(self) -> None:
        """Set ``_due`` and ``_done_bound`` (see the class docstring) after the upkeep.

        The leases of reservations no longer open (settled or released: nothing to give
        back) are dropped from the front of the heap first; else, with calls spaced
        closer than a lease, the lease of the call settled a lease ago would make the
        upkeep due again at nearly every reserve."""
        leases, open_ = self._leases, self._open
        while leases and leases[0][1] not in open_:
            heapq.heappop(leases)
        due = leases[0][0] if leases else _NEVER
        if self._max_idle is not None and self._next_sweep < due:
            due = self._next_sweep
        if self._max_scopes is not None and len(self._scopes) > self._max_scopes:
            due = _AT_ONCE  # over the bound with holds: evict as soon as they end
        done = self._done
        if len(done) > _DONE_FLOOR:
            due = min(due, _due_after(next(iter(done.values())), self._retention))
            self._done_bound = _NO_BOUND if self._max_done is None else self._max_done
        else:
            self._done_bound = _DONE_FLOOR
        self._due = due

    def _evict_locked(self, now: float) -> None:
        """Apply the policy: drop idle scopes without holds; bound the finished ids."""
        done = self._done
        if len(done) > _DONE_FLOOR:
            # Only the oldest entries (the front: insertion ~ time order) can be past the
            # horizon or over the count: drop them from there, O(1) when none is (a full
            # scan here made every call O(ids settled in the retention period)).
            horizon = now - self._retention
            while done and (next(iter(done.values())) <= horizon or (
                    self._max_done is not None and len(done) > self._max_done)):
                done.popitem(last=False)
        if self._max_idle is None and self._max_scopes is None:
            return
        over_count = self._max_scopes is not None and len(self._scopes) > self._max_scopes
        if not over_count and now < self._next_sweep:
            return
        if self._max_idle is not None:
            self._next_sweep = now + self._max_idle / 8
        horizon = now - self._max_idle if self._max_idle is not None else float("-inf")
        for scope, counters in list(self._scopes.items()):  # least recently used first
            over = self._max_scopes is not None and len(self._scopes) > self._max_scopes
            if counters.touched > horizon and not over:
                break
            if counters.holds == 0:
                del self._scopes[scope]
                if scope in self._past_of:
                    self._changed(scope)
                self.evicted += 1

    def _unhold(self, res: Reservation) -> None:
        past_of = self._past_of
        for scope in res.scopes:
            counters = self._scopes.get(scope)
            if counters is None:  # cannot happen: a scope with holds is never evicted
                continue
            if past_of and scope in past_of:
                self._changed(scope)
            counters.holds -= 1
            for dim, amount in res.amounts.items():
                counters.reserved[dim] -= amount

    def _add_spent(self, scopes: Sequence[str], actual: Mapping[str, int], now: float
                   ) -> None:
        past_of = self._past_of
        for scope in scopes:
            if past_of and scope in past_of:
                self._changed(scope)
            spent = self._scope(scope, now).spent
            for dim, amount in actual.items():
                spent[dim] += amount

    # -- contract ----------------------------------------------------------------------
    # One lock acquisition and as few calls as can be per operation: reserve and settle
    # run on every guarded call (the common case is inline here, and amounts are checked
    # by check_amounts only when one is not a plain int >= 0).

    def reserve(
        self,
        scopes: Sequence[ScopeCaps],
        amounts: Mapping[str, int],
        *,
        lease_seconds: float,
        reservation_id: str | None = None,
    ) -> Reservation | Denial:
        for value in amounts.values():
            if type(value) is not int or value < 0:
                check_amounts(amounts)  # raises, naming the dimension (an int subclass passes)
                break
        rid = reservation_id or new_reservation_id()
        lock = self._lock
        lock.acquire()  # (not ``with``: its __exit__ call costs more than release)
        try:
            now = self._clock()
            if now >= self._due or len(self._done) > self._done_bound:
                self._reclaim_locked(now)
            if rid in self._open or rid in self._done:
                raise ValueError(f"reservation id {rid!r} was already used")
            denial = self._admit(scopes, amounts, now)
            if denial is not None:
                return denial
            expires_at = now + lease_seconds  # before any hold: it may raise
            kept, past_of = self._scopes, self._past_of
            names = []
            for sc in scopes:
                name = sc.scope
                names.append(name)
                if past_of and name in past_of:
                    self._changed(name)
                counters = kept[name]
                counters.holds += 1
                reserved = counters.reserved
                for dim, amount in amounts.items():
                    reserved[dim] += amount
            # Reservation(rid, tuple(names), dict(amounts), expires_at) through its
            # slotted twin (see ledger.base._ReservationSlots)
            res: Any = _new_object(_ReservationSlots)
            res.id = rid
            res.scopes = tuple(names)
            res.amounts = dict(amounts)
            res.expires_at = expires_at
            res.__class__ = Reservation
            self._open[rid] = res
            heapq.heappush(self._leases, (expires_at, rid))
            if expires_at < self._due:
                self._due = expires_at
            return res
        finally:
            lock.release()

    def settle(self, reservation: Reservation, actual: Mapping[str, int]) -> Settlement:
        for value in actual.values():
            if type(value) is not int or value < 0:
                check_amounts(actual)  # raises, naming the dimension (an int subclass passes)
                break
        return self.settle_valid(reservation, actual)

    def settle_valid(self, reservation: Reservation, actual: Mapping[str, int]
                     ) -> Settlement:
        # (the guard's settle of a model call: checking its 8 amounts cost a tenth of
        # the call's engine part)
        rid = reservation.id
        lock = self._lock
        lock.acquire()
        try:
            done = self._done
            if rid in done:
                return Settlement(False)
            now = self._clock()
            held = self._open.pop(rid, None)
            if held is not None and held is not reservation and held.scopes != reservation.scopes:
                self._unhold(held)  # not the reservation handed out: its own scopes
                held = None
            # _unhold and _add_spent in one pass (each scope's hold and spend are its own),
            # reading each scope's new spent on the way (for a scope named twice the last
            # reading, after both, is the one kept)
            kept, past_of = self._scopes, self._past_of
            after: dict[str, Mapping[str, int]] = {}
            for name in reservation.scopes:
                if past_of and name in past_of:
                    self._changed(name)
                counters = kept.get(name)
                if counters is None:  # new (a scope with holds is never evicted)
                    counters = self._new_scope(name)
                elif held is not None:
                    counters.holds -= 1
                    reserved = counters.reserved
                    for dim, amount in held.amounts.items():
                        reserved[dim] -= amount
                kept.move_to_end(name)  # least recently used first
                counters.touched = now
                spent = counters.spent
                read = after[name] = dict(actual)  # (its keys in place, sized once: each
                # store below replaces a value, the dict never grows)
                for dim, amount in actual.items():
                    read[dim] = spent[dim] = spent[dim] + amount
            done[rid] = now
            # Settlement(True, after) through its slotted twin
            settled: Any = _new_object(_SettlementSlots)
            settled.counted = True
            settled.spent = after
            settled.__class__ = Settlement
            return settled  # type: ignore[no-any-return]
        finally:
            lock.release()

    def release(self, reservation: Reservation) -> bool:
        with self._lock:
            if reservation.id in self._done:
                return False
            held = self._open.pop(reservation.id, None)
            self._done[reservation.id] = self._clock()
            if held is None:
                return False
            self._unhold(held)
            return True

    def renew(self, reservation: Reservation, lease_seconds: float) -> Reservation | None:
        with self._lock:
            now = self._clock()
            held = self._open.get(reservation.id)
            if held is None or held.expires_at <= now:  # finished, or its lease is over
                return None
            renewed = replace(held, expires_at=max(held.expires_at, now + lease_seconds))
            self._open[reservation.id] = renewed
            heapq.heappush(self._leases, (renewed.expires_at, reservation.id))
            if renewed.expires_at < self._due:
                self._due = renewed.expires_at
            return renewed

    def charge(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]) -> Denial | None:
        result = self._charge(scopes, amounts, read=False)
        return result if isinstance(result, Denial) else None

    def charge_read(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
                    ) -> Denial | Settlement:
        return self._charge(scopes, amounts, read=True)

    def _charge(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int], *,
                read: bool) -> Denial | Settlement:
        """Check and spend on every scope or none; ``read``: report the new totals."""
        check_amounts(amounts)
        with self._lock:
            now = self._clock()
            if now >= self._due or len(self._done) > self._done_bound:
                self._reclaim_locked(now)
            denial = self._admit(scopes, amounts, now)
            if denial is not None:
                return denial
            self._add_spent([sc.scope for sc in scopes], amounts, now)
            if not read:
                return Settlement(True)
            return Settlement(True, {
                sc.scope: {dim: self._scopes[sc.scope].spent[dim] for dim in amounts}
                for sc in scopes})

    def extend(self, scope: str, dimension: str, amount: int) -> None:
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise TypeError(f"extend amount must be an int, got {amount!r}")
        with self._lock:
            self._scope(scope, self._clock()).extra[dimension] += amount

    def totals(self, scope: str) -> ScopeTotals:
        with self._lock:
            counters = self._scopes.get(scope)
            if counters is None:
                return ScopeTotals(scope, {}, {}, {})
            return counters.snapshot(scope)

    def reclaim_expired(self) -> int:
        with self._lock:
            return self._reclaim_locked(self._clock())

    # The memory ledger never blocks on I/O: run the async twins inline.
    async def areserve(
        self,
        scopes: Sequence[ScopeCaps],
        amounts: Mapping[str, int],
        *,
        lease_seconds: float,
        reservation_id: str | None = None,
    ) -> Reservation | Denial:
        return self.reserve(scopes, amounts, lease_seconds=lease_seconds,
                            reservation_id=reservation_id)

    async def asettle(self, reservation: Reservation, actual: Mapping[str, int]) -> Settlement:
        return self.settle(reservation, actual)

    async def arelease(self, reservation: Reservation) -> bool:
        return self.release(reservation)

    async def acharge(
        self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
    ) -> Denial | None:
        return self.charge(scopes, amounts)

    async def acharge_read(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
                           ) -> Denial | Settlement:
        return self.charge_read(scopes, amounts)

    async def aextend(self, scope: str, dimension: str, amount: int) -> None:
        self.extend(scope, dimension, amount)

    async def arenew(self, reservation: Reservation, lease_seconds: float
                     ) -> Reservation | None:
        return self.renew(reservation, lease_seconds)

    async def atotals(self, scope: str) -> ScopeTotals:
        return self.totals(scope)
