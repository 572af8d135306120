"""Fail open: keep admitting calls against local caps while the ledger backend is down.

``Guard(..., fail="open")`` wraps its ledger in :class:`FailOpenLedger`. While the
inner ledger answers, every operation goes straight to it. When it raises
:class:`~agent_guard.errors.LedgerUnavailable` during ``reserve`` / ``charge`` /
``settle`` / ``release``, the decorator *goes open*:

- **admission** runs against a local :class:`~agent_guard.ledger.MemoryLedger` with
  the same caps. Each scope is seeded with the spend this process last saw the
  backend report for it (from settle replies), and the holds of this process's
  reservations still open on the backend are mirrored locally, so a process cannot
  overshoot *its own view* of a budget. It can overshoot what *other* processes spent
  meanwhile: that is the price of failing open (``fail="closed"`` refuses instead);
- **settlements** (of calls admitted locally, and of calls admitted by the backend
  before it went down) and admitted **charges** are appended to a bounded journal;
- the backend is **retried lazily**: on the first call after ``retry_interval``
  seconds, not more often. A retry replays the journal in order, each entry as one
  ``settle`` (or ``release``) with a deterministic reservation id: the call's own id,
  or a fixed ``failopen:<uuid>`` id made once per journaled charge. ``settle`` is
  idempotent per id in every backend, so a replay interrupted midway (or a reply lost
  to a timeout) and replayed again never counts an entry twice. When the journal is
  empty and the backend answers, the decorator is *closed* again ("reconciled").

Reconciled spend is added with ``settle``, which does not check caps: money already
spent is counted even if it takes a budget past its cap (later calls are refused).

Bounds: the backend's own timeouts bound each attempt (RedisLedger: 2 s connect,
5 s socket by default); there is no retry loop, only one attempt per
``retry_interval``. The journal holds at most ``max_journal`` entries: when it is
full, new calls are refused with ``LedgerUnavailable`` (the settlements of calls
already admitted are still journaled). The journal lives in this process's memory:
if the process exits before the backend returns, ``close()`` tries one last replay
and logs at ERROR what could not be reconciled.

Not journaled: ``extend`` (not idempotent; it raises ``LedgerUnavailable`` while the
backend is down, retry it later) and cap extensions made on the backend are not
known locally (the local view is stricter for extended sessions). A ``charge`` whose
reply was lost (the backend applied it, then the connection failed) is also
counted locally and replayed: it may count twice, never zero times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import LedgerUnavailable
from .base import (
    Denial,
    Ledger,
    Reservation,
    ScopeCaps,
    ScopeTotals,
    Settlement,
    new_reservation_id,
    spent_after,
)
from .memory import MemoryLedger

__all__ = ["FailOpenLedger", "JournalEntry"]

logger = logging.getLogger("agent_guard")

# How many scopes' last-known spend is remembered (to seed the local view).
_KNOWN_SCOPES = 10_000


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One operation to replay into the backend: ``settle(reservation, actual)``;
    when ``actual`` is None, ``release(reservation)``; for ``extend``, each
    ``extend(scope, dimension, amount)`` of ``actual`` on the reservation's one scope."""

    kind: Literal["settle", "release", "extend"]
    reservation: Reservation
    actual: Mapping[str, int] | None = None


class FailOpenLedger(Ledger):
    """A ledger decorator that fails open; see the module docstring.

    ``retry_interval``: seconds between two attempts to reach the backend while open.
    ``max_journal``: how many unreconciled entries may wait; beyond it new calls are
    refused. ``max_idle_seconds`` (default: none) lets the local ledger forget idle
    scopes during a long outage; a forgotten scope is seeded again from the spend last
    seen on the backend plus what was journaled for it.
    ``clock`` (monotonic seconds) paces the retries; tests pass a fake one.
    """

    def __init__(
        self,
        inner: Ledger,
        *,
        retry_interval: float = 5.0,
        max_journal: int = 100_000,
        max_idle_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        owns_inner: bool = True,
    ) -> None:
        if retry_interval < 0:
            raise ValueError(f"retry_interval must be >= 0, got {retry_interval}")
        if max_journal < 1:
            raise ValueError(f"max_journal must be >= 1, got {max_journal}")
        self.inner = inner
        # close() closes the backend too, unless it is someone else's to close (a guard
        # wrapping a ledger its caller passed in)
        self.owns_inner = owns_inner
        self.url = inner.url
        self.retry_interval = retry_interval
        self.max_journal = max_journal
        self._max_idle = max_idle_seconds
        self._clock = clock
        self._lock = threading.RLock()
        self._replay_lock = threading.Lock()
        self._journal: OrderedDict[str, JournalEntry] = OrderedDict()
        self._open_res: dict[str, Reservation] = {}  # issued by this decorator, not finished
        self._local_only: set[str] = set()  # of those, admitted here while open
        self._known: OrderedDict[str, dict[str, int]] = OrderedDict()  # scope -> last spent
        self._local = self._new_local()
        self._seeded: set[str] = set()
        self._down_since: float | None = None
        self._next_attempt = 0.0
        self._last_error: BaseException | None = None
        # counters
        self.reconciled = 0  # journal entries replayed into the backend
        self.admitted_open = 0  # calls (reserve + charge) admitted locally while open
        self.outages = 0  # times the decorator went open

    # -- state ---------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """True while the backend is considered down (calls admitted locally)."""
        return self._down_since is not None

    @property
    def pending(self) -> int:
        """Journal entries not yet replayed into the backend."""
        return len(self._journal)

    def journal(self) -> list[JournalEntry]:
        """A copy of the unreconciled entries, oldest first."""
        with self._lock:
            return list(self._journal.values())

    def _new_local(self) -> MemoryLedger:
        return MemoryLedger("memory://failopen", max_idle_seconds=self._max_idle)

    def _go_open(self, exc: LedgerUnavailable) -> None:
        with self._lock:
            self._last_error = exc
            self._next_attempt = self._clock() + self.retry_interval
            if self._down_since is not None:
                return
            self._down_since = self._clock()
            self.outages += 1
            self._local = self._new_local()
            self._seeded = set()
            now = time.time()
            for res in self._open_res.values():  # mirror holds still open on the backend
                self._seed(res.scopes)
                left = res.expires_at - now
                if left > 0:
                    self._local.reserve([ScopeCaps(s) for s in res.scopes], res.amounts,
                                        lease_seconds=left, reservation_id=res.id)
        logger.warning(
            "agent-guard: ledger %s is unavailable (%s); failing open: admitting calls "
            "against this process's local view of the caps and journaling settlements, "
            "retrying the backend at most every %.1f s", self.url, exc.__cause__ or exc,
            self.retry_interval)

    def _go_closed(self) -> None:
        """The backend answered: close again, unless journaled entries still wait (then
        the next call replays them first)."""
        with self._lock:
            if self._down_since is None:
                return
            if self._journal:
                self._next_attempt = self._clock()
                return
            down_for = self._clock() - self._down_since
            self._down_since = None
        logger.warning(
            "agent-guard: ledger %s answers again after %.1f s; reconciled: %d journaled "
            "entries replayed in all, none pending", self.url, down_for, self.reconciled)

    def _seed(self, scopes: Sequence[str]) -> None:
        """Give the local view of each scope the spend last seen on the backend (lock held)."""
        for scope in scopes:
            if scope in self._seeded and self._local.has_scope(scope):
                continue
            self._seeded.add(scope)
            seed = dict(self._known.get(scope) or {})
            for entry in self._journal.values():  # settled here during this outage
                if entry.kind == "settle" and scope in entry.reservation.scopes:
                    for dim, amount in (entry.actual or {}).items():
                        seed[dim] = seed.get(dim, 0) + amount
            if any(seed.values()):
                self._local.charge([ScopeCaps(scope)], seed)  # uncapped: always admitted

    def _remember(self, settled: Settlement) -> None:
        """Keep the spend the backend reported, to seed the local view in an outage."""
        if not settled.spent:
            return
        with self._lock:
            for scope, spent in settled.spent.items():
                known = self._known.setdefault(scope, {})
                for dim, value in spent.items():
                    if value > known.get(dim, 0):
                        known[dim] = value
                self._known.move_to_end(scope)
            while len(self._known) > _KNOWN_SCOPES:
                self._known.popitem(last=False)

    def _journal_add(self, key: str, entry: JournalEntry) -> None:
        with self._lock:
            if key not in self._journal:
                self._journal[key] = entry

    def _check_room(self) -> None:
        if len(self._journal) >= self.max_journal:
            raise LedgerUnavailable(self.url, self._last_error, hint=(
                f"It has been failing open, and its journal of {self.max_journal:,} "
                "unreconciled settlements is full, so new calls are refused until the "
                "backend answers again and the journal is replayed. Restore the backend, "
                "or raise FailOpenLedger(max_journal=...)."))

    # -- recovery ------------------------------------------------------------------------

    def _attempt_due(self) -> bool:
        """Claim this interval's attempt at the backend (one caller per interval)."""
        with self._lock:
            if self._clock() < self._next_attempt:
                return False
            self._next_attempt = self._clock() + self.retry_interval
            return True

    def _replay(self) -> bool:
        """Replay the journal into the backend, oldest first. True if it is now empty
        (the backend answered every entry). One replayer at a time; others go on
        locally."""
        if not self._replay_lock.acquire(blocking=False):
            return False
        try:
            while True:
                with self._lock:
                    if not self._journal:
                        break
                    key, entry = next(iter(self._journal.items()))
                self._apply(entry)
                with self._lock:
                    self._journal.pop(key, None)
                    self.reconciled += 1
            self._hold_on_backend()
            return True
        except LedgerUnavailable as exc:
            with self._lock:
                self._last_error = exc
                self._next_attempt = self._clock() + self.retry_interval
            return False
        finally:
            self._replay_lock.release()

    def _apply(self, entry: JournalEntry) -> None:
        """One journaled operation, on the backend."""
        if entry.kind == "extend":
            for dim, amount in (entry.actual or {}).items():
                self.inner.extend(entry.reservation.scopes[0], dim, amount)
        elif entry.actual is None:
            self.inner.release(entry.reservation)
        else:
            self._remember(self.inner.settle(entry.reservation, entry.actual))

    def _hold_on_backend(self) -> None:
        """Hold on the backend the reservations admitted locally during the outage and
        still running, before closing again: otherwise the backend, not knowing them,
        would admit other calls into the same room (uncapped, same ids: their settles
        then finish these holds)."""
        now = time.time()
        with self._lock:
            pending = [self._open_res[rid] for rid in self._local_only
                       if rid in self._open_res]
            self._local_only.intersection_update(self._open_res)
        for res in pending:
            left = res.expires_at - now
            if left > 0:
                with contextlib.suppress(ValueError):  # the backend took it before a reply
                    self.inner.reserve([ScopeCaps(s) for s in res.scopes],  # was lost
                                       res.amounts, lease_seconds=left, reservation_id=res.id)
            with self._lock:
                self._local_only.discard(res.id)

    def reconcile(self) -> bool:
        """Try the backend now (ignoring ``retry_interval``): replay the journal and, if
        it is empty afterwards, close again. True if nothing is pending."""
        if not self._replay():
            return False
        if self.is_open:
            try:
                self.inner.reclaim_expired()  # a cheap call that proves the backend answers
            except LedgerUnavailable as exc:
                self._go_open(exc)
                return False
            self._go_closed()
        return True

    def _use_backend(self) -> bool:
        """Whether this call should go to the backend: yes while closed (replaying first
        any entry journaled by a call that raced the closing); while open, only once per
        ``retry_interval``, and only if the whole journal replayed."""
        if not self._journal and not self.is_open:
            return True
        if not self._attempt_due():
            return not self.is_open
        return self._replay() or not self.is_open

    async def _ause_backend(self) -> bool:
        if not self._journal and not self.is_open:
            return True
        if not self._attempt_due():
            return not self.is_open
        return await asyncio.to_thread(self._replay) or not self.is_open

    # -- local (open) paths ------------------------------------------------------------------

    def _reserve_local(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int],
                       lease_seconds: float, rid: str, attempted: bool
                       ) -> Reservation | Denial:
        with self._lock:
            self._check_room()
            self._seed([s for sc in scopes for s in (*sc.history, sc.scope)])
            result = self._local.reserve(scopes, amounts, lease_seconds=lease_seconds,
                                         reservation_id=rid)
            if isinstance(result, Reservation):
                self._track(result)
                self._local_only.add(result.id)
                self.admitted_open += 1
            elif attempted:  # the backend may have taken the hold before the reply was lost
                self._journal_add(rid, JournalEntry("release", Reservation(
                    rid, tuple(sc.scope for sc in scopes), dict(amounts), 0.0)))
            return result

    def _charge_local(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
                      ) -> Denial | None:
        with self._lock:
            self._check_room()
            self._seed([s for sc in scopes for s in (*sc.history, sc.scope)])
            denial = self._local.charge(scopes, amounts)
            if denial is None:
                self.admitted_open += 1
                key = f"failopen:{uuid.uuid4().hex}"  # fixed once: replays use the same id
                self._journal_add(key, JournalEntry("settle", Reservation(
                    key, tuple(sc.scope for sc in scopes), {}, 0.0), dict(amounts)))
            return denial

    def _settle_local(self, reservation: Reservation, actual: Mapping[str, int]
                      ) -> Settlement:
        with self._lock:
            self._seed(reservation.scopes)
            self._open_res.pop(reservation.id, None)
            settled = self._local.settle(reservation, actual)
            if settled:
                self._journal_add(reservation.id, JournalEntry("settle", reservation,
                                                               dict(actual)))
            return settled

    def _release_local(self, reservation: Reservation) -> bool:
        with self._lock:
            self._open_res.pop(reservation.id, None)
            released = self._local.release(reservation)
            self._journal_add(reservation.id, JournalEntry("release", reservation))
            return released

    def _track(self, reservation: Reservation) -> None:
        with self._lock:
            if len(self._open_res) >= _KNOWN_SCOPES:  # callers that never finished: expired
                now = time.time()
                for rid in [r for r, res in self._open_res.items() if res.expires_at < now]:
                    del self._open_res[rid]
            self._open_res[reservation.id] = reservation

    def _finished(self, reservation: Reservation) -> None:
        with self._lock:
            self._open_res.pop(reservation.id, None)
            if self._seeded:  # drop the local mirror of a hold the backend just finished
                self._local.release(reservation)

    # -- contract ------------------------------------------------------------------------

    def reserve(
        self,
        scopes: Sequence[ScopeCaps],
        amounts: Mapping[str, int],
        *,
        lease_seconds: float,
        reservation_id: str | None = None,
    ) -> Reservation | Denial:
        rid = reservation_id or new_reservation_id()
        attempted = self._use_backend()
        if attempted:
            try:
                result = self.inner.reserve(scopes, amounts, lease_seconds=lease_seconds,
                                            reservation_id=rid)
            except LedgerUnavailable as exc:
                self._go_open(exc)
            else:
                self._go_closed()
                if isinstance(result, Reservation):
                    self._track(result)
                return result
        return self._reserve_local(scopes, amounts, lease_seconds, rid, attempted)

    def settle(self, reservation: Reservation, actual: Mapping[str, int]) -> Settlement:
        if self._use_backend():
            try:
                settled = self.inner.settle(reservation, actual)
            except LedgerUnavailable as exc:
                self._go_open(exc)
            else:
                self._go_closed()
                self._finished(reservation)
                self._remember(settled)
                return settled
        return self._settle_local(reservation, actual)

    def release(self, reservation: Reservation) -> bool:
        if self._use_backend():
            try:
                released = self.inner.release(reservation)
            except LedgerUnavailable as exc:
                self._go_open(exc)
            else:
                self._go_closed()
                self._finished(reservation)
                return released
        return self._release_local(reservation)

    def renew(self, reservation: Reservation, lease_seconds: float) -> Reservation | None:
        """On the backend when it answers; a hold taken locally in an outage is renewed
        in the local view (it is journaled with its own lease)."""
        if self._use_backend():
            try:
                renewed = self.inner.renew(reservation, lease_seconds)
            except LedgerUnavailable as exc:
                self._go_open(exc)
            else:
                self._go_closed()
                if renewed is not None:
                    self._track(renewed)
                return renewed
        with self._lock:
            return self._local.renew(reservation, lease_seconds)

    def charge(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]) -> Denial | None:
        # through charge_read: the counts the backend reports (steps, tool calls, repeat
        # counters) seed the local view in an outage, as settled spend does
        result = self.charge_read(scopes, amounts)
        return result if isinstance(result, Denial) else None

    def charge_read(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
                    ) -> Denial | Settlement:
        if self._use_backend():
            try:
                result = self.inner.charge_read(scopes, amounts)
            except LedgerUnavailable as exc:
                self._go_open(exc)
            else:
                self._go_closed()
                if isinstance(result, Settlement):
                    self._remember(result)
                return result
        return self._charged_locally(scopes, amounts)

    def _charged_locally(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
                         ) -> Denial | Settlement:
        denial = self._charge_local(scopes, amounts)
        if denial is not None:
            return denial
        names = [sc.scope for sc in scopes]
        with self._lock:
            return spent_after(names, amounts, [self._local.totals(n) for n in names])

    def extend(self, scope: str, dimension: str, amount: int) -> None:
        if self._use_backend():
            try:
                self.inner.extend(scope, dimension, amount)
            except LedgerUnavailable as exc:
                self._go_open(exc)
            else:
                self._go_closed()
                with self._lock:
                    if scope in self._seeded:
                        self._local.extend(scope, dimension, amount)
                return
        self._extend_local(scope, dimension, amount)

    def _extend_local(self, scope: str, dimension: str, amount: int) -> None:
        """While open: raise the cap here and journal it (a guard gives back an
        identical-call count this way when another cap refuses the call)."""
        with self._lock:
            self._check_room()
            self._seed([scope])
            self._local.extend(scope, dimension, amount)
            key = f"failopen-extend:{uuid.uuid4().hex}"
            self._journal_add(key, JournalEntry("extend", Reservation(key, (scope,), {}, 0.0),
                                                {dimension: amount}))

    def totals(self, scope: str) -> ScopeTotals:
        """The backend's totals; while open, this process's local view (seeded spend +
        what was admitted locally, not yet reconciled)."""
        if not self.is_open:
            try:
                return self.inner.totals(scope)
            except LedgerUnavailable as exc:
                self._go_open(exc)
        with self._lock:
            self._seed([scope])
            return self._local.totals(scope)

    def totals_many(self, scopes: Sequence[str]) -> list[ScopeTotals]:
        if not self.is_open:
            try:
                return self.inner.totals_many(scopes)
            except LedgerUnavailable as exc:
                self._go_open(exc)
        with self._lock:
            self._seed(list(scopes))
            return [self._local.totals(scope) for scope in scopes]

    def reclaim_expired(self) -> int:
        n = self._local.reclaim_expired()
        if self._use_backend():
            try:
                n += self.inner.reclaim_expired()
            except LedgerUnavailable as exc:
                self._go_open(exc)
            else:
                self._go_closed()
        return n

    def close(self) -> None:
        """Reconcile what the journal holds, report what the backend never took, and
        close the backend (when this wrapper owns it)."""
        if self.pending:
            self.reconcile()
        self._report_unreconciled()
        if self.owns_inner:
            self.inner.close()

    def _report_unreconciled(self) -> None:
        if self.pending:
            logger.error(
                "agent-guard: closing with %d journaled entries not reconciled into %s "
                "(the backend did not answer); their spend is lost to the shared ledger",
                self.pending, self.url)

    # -- async twins ---------------------------------------------------------------------
    # The backend is awaited natively; the local ledger is in memory and runs inline.

    async def areserve(
        self,
        scopes: Sequence[ScopeCaps],
        amounts: Mapping[str, int],
        *,
        lease_seconds: float,
        reservation_id: str | None = None,
    ) -> Reservation | Denial:
        rid = reservation_id or new_reservation_id()
        attempted = await self._ause_backend()
        if attempted:
            try:
                result = await self.inner.areserve(scopes, amounts,
                                                   lease_seconds=lease_seconds,
                                                   reservation_id=rid)
            except LedgerUnavailable as exc:
                self._go_open(exc)
            else:
                self._go_closed()
                if isinstance(result, Reservation):
                    self._track(result)
                return result
        return self._reserve_local(scopes, amounts, lease_seconds, rid, attempted)

    async def asettle(self, reservation: Reservation, actual: Mapping[str, int]) -> Settlement:
        if await self._ause_backend():
            try:
                settled = await self.inner.asettle(reservation, actual)
            except LedgerUnavailable as exc:
                self._go_open(exc)
            else:
                self._go_closed()
                self._finished(reservation)
                self._remember(settled)
                return settled
        return self._settle_local(reservation, actual)

    async def arelease(self, reservation: Reservation) -> bool:
        if await self._ause_backend():
            try:
                released = await self.inner.arelease(reservation)
            except LedgerUnavailable as exc:
                self._go_open(exc)
            else:
                self._go_closed()
                self._finished(reservation)
                return released
        return self._release_local(reservation)

    async def acharge(
        self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
    ) -> Denial | None:
        result = await self.acharge_read(scopes, amounts)
        return result if isinstance(result, Denial) else None

    async def acharge_read(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
                           ) -> Denial | Settlement:
        if await self._ause_backend():
            try:
                result = await self.inner.acharge_read(scopes, amounts)
            except LedgerUnavailable as exc:
                self._go_open(exc)
            else:
                self._go_closed()
                if isinstance(result, Settlement):
                    self._remember(result)
                return result
        return self._charged_locally(scopes, amounts)

    async def aextend(self, scope: str, dimension: str, amount: int) -> None:
        if await self._ause_backend():
            try:
                await self.inner.aextend(scope, dimension, amount)
            except LedgerUnavailable as exc:
                self._go_open(exc)
            else:
                self._go_closed()
                with self._lock:
                    if scope in self._seeded:
                        self._local.extend(scope, dimension, amount)
                return
        self._extend_local(scope, dimension, amount)

    async def atotals(self, scope: str) -> ScopeTotals:
        if not self.is_open:
            try:
                return await self.inner.atotals(scope)
            except LedgerUnavailable as exc:
                self._go_open(exc)
        with self._lock:
            self._seed([scope])
            return self._local.totals(scope)

    async def atotals_many(self, scopes: Sequence[str]) -> list[ScopeTotals]:
        if not self.is_open:
            try:
                return await self.inner.atotals_many(scopes)
            except LedgerUnavailable as exc:
                self._go_open(exc)
        with self._lock:
            self._seed(list(scopes))
            return [self._local.totals(scope) for scope in scopes]

    async def aclose(self) -> None:
        """:meth:`close` awaiting the backend."""
        if self.pending:
            await asyncio.to_thread(self.reconcile)
        self._report_unreconciled()
        if self.owns_inner:
            await self.inner.aclose()

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"FailOpenLedger({self.inner!r}, {state}, pending={self.pending})"
