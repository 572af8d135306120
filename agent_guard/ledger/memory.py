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
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

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

__all__ = ["MemoryLedger"]


_DONE_FLOOR = 4096  # finished ids are pruned only beyond this many
_PAST_SUMS_MAX = 4096  # rolling windows whose earlier buckets' sums are kept


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

    def view(self, scope: str) -> ScopeTotals:
        """The live counters, uncopied: only for reading under the ledger's lock."""
        return ScopeTotals(scope, self.spent, self.reserved, self.extra)


def _first_denial_live(
    scopes: Sequence[ScopeCaps], live: Sequence[_Counters], amounts: Mapping[str, int],
    past: Mapping[str, tuple[Mapping[str, int], Mapping[str, int]]] | None,
) -> Denial | None:
    """:func:`~agent_guard.ledger.base.first_denial` over the live counters of the
    scopes and the summed (spent, reserved) of each history (``MemoryLedger._past``):
    the same rule, without a ScopeTotals per scope and call."""
    for sc, counters in zip(scopes, live, strict=True):
        sums = past.get(sc.scope) if past is not None and sc.history else None
        for dim, cap in sc.caps.items():
            want = amounts.get(dim, 0)
            if want <= 0:
                continue
            spent, held = counters.spent.get(dim, 0), counters.reserved.get(dim, 0)
            if sums is not None:
                spent += sums[0].get(dim, 0)
                held += sums[1].get(dim, 0)
            extra = counters.extra.get(dim, 0)
            if spent + held + want > cap + extra:
                return Denial(sc.scope, dim, cap + extra, spent, held, want)
    return None


class MemoryLedger(Ledger):
    """In-process budgets; see the module docstring for the eviction policy."""

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
        self._past_sums: dict[tuple[str, ...], tuple[dict[str, int], dict[str, int]]] = {}
        self._past_of: dict[str, set[tuple[str, ...]]] = {}

    @classmethod
    def from_url(cls, url: str, **options: object) -> MemoryLedger:
        """``memory://?max_idle_seconds=3600&max_scopes=100000``; keyword options win."""
        from ..stores import parse_url

        parsed = parse_url(url, "ledger")
        if parsed.backend != "memory":
            raise ValueError(f"not a memory:// URL: {parsed.redacted!r}")
        return cls(url, **{**parsed.kind_options, **options})  # type: ignore[arg-type]

    @property
    def scope_count(self) -> int:
        """How many scopes are kept now."""
        return len(self._scopes)

    # -- helpers (lock held) ---------------------------------------------------------

    def has_scope(self, scope: str) -> bool:
        """Whether ``scope`` is kept (not yet seen, or evicted, is False)."""
        with self._lock:
            return scope in self._scopes

    def _past(self, scopes: Sequence[ScopeCaps], now: float
              ) -> dict[str, tuple[Mapping[str, int], Mapping[str, int]]] | None:
        """Per scope with a history (a rolling window's earlier buckets): the history's
        spent and reserved, summed. A sum is kept until one of its buckets changes (a
        late settle, a release, an expired hold, an eviction), so a call reads a window
        of 23 buckets in O(1); its buckets are marked used when it is summed (a bucket
        is touched at least once per window length, so an idle horizon no shorter than
        the window never drops one the window still reads)."""
        out: dict[str, tuple[Mapping[str, int], Mapping[str, int]]] | None = None
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
                sums = self._past_sums[sc.history] = (dict(spent), dict(reserved))
            if out is None:
                out = {}
            out[sc.scope] = sums
        return out

    def _changed(self, scope: str) -> None:
        """``scope``'s spent or reserved changed: forget the history sums it is in."""
        for history in self._past_of.pop(scope, ()):
            self._past_sums.pop(history, None)

    def _scope(self, scope: str, now: float) -> _Counters:
        """The counters of ``scope``, created if needed, marked as just used."""
        counters = self._scopes.get(scope)
        if counters is None:
            counters = self._scopes[scope] = _Counters()
        else:
            self._scopes.move_to_end(scope)
        counters.touched = now
        return counters

    def _reclaim_locked(self, now: float) -> int:
        n = 0
        while self._leases and self._leases[0][0] <= now:
            _, rid = heapq.heappop(self._leases)
            res = self._open.get(rid)
            if res is not None and res.expires_at <= now:
                del self._open[rid]
                self._unhold(res)
                n += 1
        self._evict_locked(now)
        return n

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
        if self.max_idle_seconds is None and self.max_scopes is None:
            return
        over_count = self.max_scopes is not None and len(self._scopes) > self.max_scopes
        if not over_count and now < self._next_sweep:
            return
        if self.max_idle_seconds is not None:
            self._next_sweep = now + self.max_idle_seconds / 8
        horizon = (now - self.max_idle_seconds if self.max_idle_seconds is not None
                   else float("-inf"))
        for scope, counters in list(self._scopes.items()):  # least recently used first
            over = self.max_scopes is not None and len(self._scopes) > self.max_scopes
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
        with self._lock:
            now = self._clock()
            self._reclaim_locked(now)
            if rid in self._open or rid in self._done:
                raise ValueError(f"reservation id {rid!r} was already used")
            live = [self._scope(sc.scope, now) for sc in scopes]
            denial = _first_denial_live(scopes, live, amounts, self._past(scopes, now))
            if denial is not None:
                return denial
            res = Reservation(rid, tuple([sc.scope for sc in scopes]), dict(amounts),
                              now + lease_seconds)
            past_of = self._past_of
            for scope, counters in zip(res.scopes, live, strict=True):
                if past_of and scope in past_of:
                    self._changed(scope)
                counters.holds += 1
                reserved = counters.reserved
                for dim, amount in amounts.items():
                    reserved[dim] += amount
            self._open[rid] = res
            heapq.heappush(self._leases, (res.expires_at, rid))
            return res

    def settle(self, reservation: Reservation, actual: Mapping[str, int]) -> Settlement:
        check_amounts(actual)
        with self._lock:
            if reservation.id in self._done:
                return Settlement(False)
            now = self._clock()
            held = self._open.pop(reservation.id, None)
            if held is not None:
                self._unhold(held)
            self._add_spent(reservation.scopes, actual, now)
            self._done[reservation.id] = now
            after: dict[str, Mapping[str, int]] = {}
            for scope in reservation.scopes:
                spent = self._scopes[scope].spent
                after[scope] = {dim: spent[dim] for dim in actual}
            return Settlement(True, after)

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
            self._reclaim_locked(now)
            totals = {sc.scope: self._scope(sc.scope, now).view(sc.scope) for sc in scopes}
            denial = first_denial(scopes, amounts, totals, self._past(scopes, now))
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
