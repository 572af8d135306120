"""In-process ledger (``memory://``): one lock, plain dicts.

Safe across threads and asyncio tasks of one process (no await happens while
the lock is held). Sessions do not outlive the process: use SQLite or Redis
for that.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence

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


class _Counters:
    __slots__ = ("extra", "reserved", "spent")

    def __init__(self) -> None:
        self.spent: defaultdict[str, int] = defaultdict(int)
        self.reserved: defaultdict[str, int] = defaultdict(int)
        self.extra: defaultdict[str, int] = defaultdict(int)

    def snapshot(self, scope: str) -> ScopeTotals:
        return ScopeTotals(scope, dict(self.spent), dict(self.reserved), dict(self.extra))

    def view(self, scope: str) -> ScopeTotals:
        """The live counters, uncopied: only for reading under the ledger's lock."""
        return ScopeTotals(scope, self.spent, self.reserved, self.extra)


class MemoryLedger(Ledger):
    def __init__(self, url: str = "memory://", *, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self._clock = clock
        self._lock = threading.Lock()
        self._scopes: defaultdict[str, _Counters] = defaultdict(_Counters)
        self._open: dict[str, Reservation] = {}
        self._leases: list[tuple[float, str]] = []  # heap of (expires_at, id)
        # settled/released id -> when; in insertion (so time) order, pruned from the front
        self._done: OrderedDict[str, float] = OrderedDict()

    # -- helpers (lock held) ---------------------------------------------------------

    def _reclaim_locked(self, now: float) -> int:
        n = 0
        while self._leases and self._leases[0][0] <= now:
            _, rid = heapq.heappop(self._leases)
            res = self._open.pop(rid, None)
            if res is not None and res.expires_at <= now:
                self._unhold(res)
                n += 1
        done = self._done
        if len(done) > 4096:
            # Only the oldest entries can be past the horizon: drop them from the front,
            # O(1) per call when none is (rebuilding the dict here made every reserve
            # O(ids settled in the last 7 days)). An entry written under a clock that went
            # back is kept a little longer, never dropped early.
            horizon = now - DONE_RETENTION_SECONDS
            while done and next(iter(done.values())) <= horizon:
                done.popitem(last=False)
        return n

    def _unhold(self, res: Reservation) -> None:
        for scope in res.scopes:
            reserved = self._scopes[scope].reserved
            for dim, amount in res.amounts.items():
                reserved[dim] -= amount

    def _add_spent(self, scopes: Sequence[str], actual: Mapping[str, int]) -> None:
        for scope in scopes:
            spent = self._scopes[scope].spent
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
            totals = {sc.scope: self._scopes[sc.scope].view(sc.scope) for sc in scopes}
            denial = first_denial(scopes, amounts, totals)
            if denial is not None:
                return denial
            res = Reservation(rid, tuple(sc.scope for sc in scopes), dict(amounts),
                              now + lease_seconds)
            for scope in res.scopes:
                reserved = self._scopes[scope].reserved
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
            held = self._open.pop(reservation.id, None)
            if held is not None:
                self._unhold(held)
            self._add_spent(reservation.scopes, actual)
            self._done[reservation.id] = self._clock()
            return Settlement(True, {
                scope: {dim: self._scopes[scope].spent[dim] for dim in actual}
                for scope in reservation.scopes
            })

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

    def charge(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]) -> Denial | None:
        check_amounts(amounts)
        with self._lock:
            self._reclaim_locked(self._clock())
            totals = {sc.scope: self._scopes[sc.scope].view(sc.scope) for sc in scopes}
            denial = first_denial(scopes, amounts, totals)
            if denial is None:
                self._add_spent([sc.scope for sc in scopes], amounts)
            return denial

    def extend(self, scope: str, dimension: str, amount: int) -> None:
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise TypeError(f"extend amount must be an int, got {amount!r}")
        with self._lock:
            self._scopes[scope].extra[dimension] += amount

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

    async def aextend(self, scope: str, dimension: str, amount: int) -> None:
        self.extend(scope, dimension, amount)

    async def atotals(self, scope: str) -> ScopeTotals:
        return self.totals(scope)
