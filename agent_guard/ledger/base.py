"""The ledger contract: reserve before a call, settle after.

A ledger keeps, per *scope* (``"session:ticket-42"``, later ``"team:acme:2026-11"``),
three integer counters per *dimension* (``usd_nano``, ``tokens``,
``model_calls``...):

- ``spent``: settled amounts;
- ``reserved``: amounts held by open reservations;
- ``extra``: cap extensions granted at run time (``extend``).

``reserve`` is atomic across every scope it names: either every scope admits
the amounts (for every capped dimension with a positive amount,
``spent + reserved + amount <= cap + extra``) and all are held, or nothing
changes and a :class:`Denial` says which scope and dimension refused.

A reservation carries a lease. When it expires the ledger gives the held
amounts back (lazily, on the next ``reserve`` or an explicit
``reclaim_expired``); ``renew`` pushes the lease of a reservation that is still
open (a long call keeps its hold while it runs). ``settle`` and ``release`` are idempotent per
reservation id: the first one counts, later ones are no-ops. A settle that
arrives after the lease expired still adds its spend, once.

Backends implement the abstract methods; async twins default to running the
sync method in a worker thread and are overridden natively where the backend
has an async client.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._frozen import fast_init

__all__ = [
    "Denial",
    "Ledger",
    "Reservation",
    "ScopeCaps",
    "ScopeTotals",
    "Settlement",
    "new_reservation_id",
]

# How long a settled/released id is remembered so a repeated settle is a no-op.
DONE_RETENTION_SECONDS = 7 * 24 * 3600


def new_reservation_id() -> str:
    """32 hex digits, unique across processes and hosts: 64 random bits drawn once per
    process (again in a forked child) and a 64-bit counter from a random start. One
    ``os.urandom`` per id made every call a system call that releases the GIL, so a
    call waited for whichever thread took it meanwhile.

    Formatting an int as hex costs more than the rest of a reservation, so the counter's
    upper 56 bits are formatted once per block of 256 ids and the block's ids are
    handed out by one ``map`` iterator (the digits + each of the 256 two-digit tails):
    its ``next`` runs in C, without a bytecode boundary, so two threads never get the
    same id. A block used up is replaced by the next one (two threads that find it
    used up at once each take a block of their own: a few ids are skipped, none
    repeated)."""
    rid = next(_ID_NEXT, None)
    return rid if rid is not None else _next_id_block()


def _next_id_block() -> str:
    """The first id of a new block of 256, whose others :func:`new_reservation_id`
    hands out."""
    global _ID_NEXT
    high = next(_ID_COUNTER) & _ID_MASK
    ids = map(f"{_ID_PREFIX}{high:014x}".__add__, _HEX2)
    first: str = next(ids)
    _ID_NEXT = ids
    return first


_ID_MASK = (1 << 56) - 1  # the counter of blocks: the ids' upper 56 bits
_ID_PREFIX = ""
_ID_COUNTER: Iterator[int] = itertools.count()
_ID_NEXT: Iterator[str] = iter(())  # the ids left in the current block
_HEX2 = tuple(f"{i:02x}" for i in range(256))


def _new_id_source() -> None:
    global _ID_PREFIX, _ID_COUNTER, _ID_NEXT
    _ID_PREFIX = os.urandom(8).hex()
    _ID_COUNTER = itertools.count(int.from_bytes(os.urandom(7), "big"))
    _ID_NEXT = iter(())


_new_id_source()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_id_source)


@dataclass(frozen=True, slots=True)
class ScopeCaps:
    """A scope and its caps (``{dimension: cap}``; absent = uncapped).

    ``history`` names earlier scopes whose spent and reserved amounts also count
    against these caps (the past buckets of a rolling window); holds and spend
    go to ``scope`` alone.
    """

    scope: str
    caps: Mapping[str, int] = field(default_factory=dict)
    history: tuple[str, ...] = ()


@fast_init
@dataclass(frozen=True, slots=True)
class Reservation:
    """An open hold on every scope in ``scopes``."""

    id: str
    scopes: tuple[str, ...]
    amounts: Mapping[str, int]
    expires_at: float


@fast_init
@dataclass(frozen=True, slots=True)
class Denial:
    """Why a reservation was refused: the first scope and dimension that did not fit."""

    scope: str
    dimension: str
    cap: int
    spent: int
    reserved: int
    requested: int

    def __bool__(self) -> bool:  # a Denial is a "no"
        return False


@fast_init
@dataclass(frozen=True, slots=True)
class Settlement:
    """What a settle did: truthy if it counted now (False if the reservation was
    already finished). ``spent`` is each scope's spent total, after this settle, of
    the dimensions it settled (empty when it counted nothing)."""

    counted: bool
    spent: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.counted


@fast_init
@dataclass(frozen=True, slots=True)
class ScopeTotals:
    """The counters of one scope at one moment."""

    scope: str
    spent: Mapping[str, int]
    reserved: Mapping[str, int]
    extra: Mapping[str, int]

    def get_spent(self, dimension: str) -> int:
        return int(self.spent.get(dimension, 0))

    def get_reserved(self, dimension: str) -> int:
        return int(self.reserved.get(dimension, 0))

    def get_extra(self, dimension: str) -> int:
        return int(self.extra.get(dimension, 0))


# The ledgers' hot path builds a Reservation and a Settlement per guarded call. A frozen
# dataclass is filled through its slots' descriptors (fast_init makes that as cheap as a
# class call allows: ~4k instructions here); the memory ledger builds the same object in
# about half: an instance of a plain class with the same slots gets plain stores, then
# becomes the dataclass (the layouts are the same, as Python checks on that assignment).
# What it returns is tested equal, field by field, to the class call
# (tests/test_ledger_contract.py).


class _ReservationSlots:
    __slots__ = Reservation.__slots__


class _SettlementSlots:
    __slots__ = Settlement.__slots__


def check_amounts(amounts: Mapping[str, int]) -> None:
    for dim, value in amounts.items():
        if type(value) is int and value >= 0:  # the common case, without isinstance
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"ledger amount for {dim!r} must be an int, got {value!r}")
        if value < 0:
            raise ValueError(f"ledger amount for {dim!r} must be >= 0, got {value}")


def spent_after(names: Sequence[str], amounts: Mapping[str, int],
                totals: Sequence[ScopeTotals]) -> Settlement:
    """A charge's :class:`Settlement`: each scope's spent of the charged dimensions."""
    return Settlement(True, {name: {dim: t.get_spent(dim) for dim in amounts}
                             for name, t in zip(names, totals, strict=True)})


def first_denial(
    scopes: Sequence[ScopeCaps],
    amounts: Mapping[str, int],
    totals: Mapping[str, ScopeTotals],
    past: Mapping[str, tuple[Mapping[str, int], Mapping[str, int]]] | None = None,
) -> Denial | None:
    """The pure admission rule, shared by the in-process backends. ``totals`` holds
    every scope of ``scopes`` and of their ``history`` (a missing one counts as zero);
    or ``past`` holds, per scope with a history, its history's (spent, reserved)
    summed already.

    Redis evaluates the same rule in Lua (``lua/reserve.lua``).
    """
    for sc in scopes:
        t = totals[sc.scope]
        sums = past.get(sc.scope) if past is not None and sc.history else None
        for dim, cap in sc.caps.items():
            want = amounts.get(dim, 0)
            if want <= 0:
                continue
            spent, held = int(t.spent.get(dim, 0)), int(t.reserved.get(dim, 0))
            if sums is not None:
                spent += sums[0].get(dim, 0)
                held += sums[1].get(dim, 0)
            else:
                for name in sc.history:
                    if name in totals:
                        spent += totals[name].get_spent(dim)
                        held += totals[name].get_reserved(dim)
            extra = int(t.extra.get(dim, 0))
            if spent + held + want > cap + extra:
                return Denial(sc.scope, dim, cap + extra, spent, held, want)
    return None


class Ledger(ABC):
    """Where budgets are kept. Pick one by URL with :func:`agent_guard.ledger.from_url`."""

    url: str = ""
    #: True when :meth:`settle_later` defers (Redis: the settle rides with the next script)
    defers_settles: bool = False

    # -- the contract ------------------------------------------------------------

    @abstractmethod
    def reserve(
        self,
        scopes: Sequence[ScopeCaps],
        amounts: Mapping[str, int],
        *,
        lease_seconds: float,
        reservation_id: str | None = None,
    ) -> Reservation | Denial:
        """Hold ``amounts`` on every scope, or on none and say why."""

    @abstractmethod
    def settle(self, reservation: Reservation, actual: Mapping[str, int]) -> Settlement:
        """Replace the hold by what was actually spent. Truthy if counted now, falsy if
        this reservation was already settled or released."""

    def settle_valid(self, reservation: Reservation, actual: Mapping[str, int]
                     ) -> Settlement:
        """:meth:`settle` of amounts known to be ints >= 0 (a model call's: its cost and
        the counts of a validated ``Usage``): a ledger may skip checking them."""
        return self.settle(reservation, actual)

    @abstractmethod
    def release(self, reservation: Reservation) -> bool:
        """Drop the hold without spending. True if released now."""

    @abstractmethod
    def charge(
        self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
    ) -> Denial | None:
        """Check and spend in one atomic step (a tool call, a graph step)."""

    @abstractmethod
    def extend(self, scope: str, dimension: str, amount: int) -> None:
        """Raise ``scope``'s cap on ``dimension`` by ``amount`` (may be negative)."""

    @abstractmethod
    def totals(self, scope: str) -> ScopeTotals:
        """The counters of ``scope`` (zeros for an unknown scope)."""

    def charge_read(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
                    ) -> Denial | Settlement:
        """``charge``, and when it spent, each scope's spent total after it of the charged
        dimensions (what soft thresholds read). Backends that can read it in the same
        atomic step do; this default reads it right after."""
        denial = self.charge(scopes, amounts)
        if denial is not None:
            return denial
        names = [sc.scope for sc in scopes]
        return spent_after(names, amounts, self.totals_many(names))

    def totals_many(self, scopes: Sequence[str]) -> list[ScopeTotals]:
        """``totals`` of each scope, in order (one round trip where the backend can)."""
        return [self.totals(scope) for scope in scopes]

    def settle_later(self, reservation: Reservation, actual: Mapping[str, int], *,
                     reads: Mapping[str, Sequence[str]] | None = None,
                     then: Callable[[Settlement], Any] | None = None) -> None:
        """``settle``, possibly later: a ledger with ``defers_settles`` sends it with its
        next operation (one round trip per call instead of two), and the hold keeps
        counting until then. ``then`` gets the :class:`Settlement` when it lands;
        ``reads`` names the dimensions of each scope it needs read back (default: every
        settled one). Here: at once."""
        settled = self.settle(reservation, actual)
        if then is not None:
            then(settled)

    @property
    def pending_settles(self) -> int:
        """Deferred settles that have not landed yet."""
        return 0

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Land every deferred settle now."""

    async def aflush(self) -> None:  # noqa: B027 - optional hook
        """Land every deferred settle now."""

    def renew(self, reservation: Reservation, lease_seconds: float) -> Reservation | None:
        """Push an open reservation's lease to ``now + lease_seconds`` (a call that is still
        running keeps its hold). The renewed reservation, or None when it is no longer
        open (settled, released or reclaimed: nothing is held again). A backend that
        cannot renew returns None; its holds then last one lease, as before."""
        return None

    async def arenew(self, reservation: Reservation, lease_seconds: float
                     ) -> Reservation | None:
        return await asyncio.to_thread(self.renew, reservation, lease_seconds)

    @abstractmethod
    def reclaim_expired(self) -> int:
        """Give back the holds of every expired reservation; return how many."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    # -- async twins ---------------------------------------------------------------

    async def areserve(
        self,
        scopes: Sequence[ScopeCaps],
        amounts: Mapping[str, int],
        *,
        lease_seconds: float,
        reservation_id: str | None = None,
    ) -> Reservation | Denial:
        return await asyncio.to_thread(
            self.reserve, scopes, amounts, lease_seconds=lease_seconds,
            reservation_id=reservation_id,
        )

    async def asettle(self, reservation: Reservation, actual: Mapping[str, int]) -> Settlement:
        return await asyncio.to_thread(self.settle, reservation, actual)

    async def arelease(self, reservation: Reservation) -> bool:
        return await asyncio.to_thread(self.release, reservation)

    async def acharge(
        self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
    ) -> Denial | None:
        return await asyncio.to_thread(self.charge, scopes, amounts)

    async def aextend(self, scope: str, dimension: str, amount: int) -> None:
        await asyncio.to_thread(self.extend, scope, dimension, amount)

    async def atotals(self, scope: str) -> ScopeTotals:
        return await asyncio.to_thread(self.totals, scope)

    async def atotals_many(self, scopes: Sequence[str]) -> list[ScopeTotals]:
        return [await self.atotals(scope) for scope in scopes]

    async def acharge_read(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
                           ) -> Denial | Settlement:
        denial = await self.acharge(scopes, amounts)
        if denial is not None:
            return denial
        names = [sc.scope for sc in scopes]
        return spent_after(names, amounts, await self.atotals_many(names))

    async def aclose(self) -> None:
        self.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
