"""The Redis ledger spread over cells (``redis+cluster://...?cells=16``): one namespace's
budgets on every node of a Redis Cluster.

:class:`RedisLedger` keeps a namespace in one hash tag, so every script can check and
change every scope of a call atomically, and a namespace is served by one node. Here a
namespace's keys are spread over ``cells`` hash tags, chosen so that their slots are
evenly spaced (a cluster whose nodes own equal slot ranges gets equal shares of cells):

- a call runs in the cell of its first scope (the session's), as one script, exactly as
  on one Redis: its reservation, lease, done marker and every scope key it touches live
  in that cell;
- each scope has a home cell (from its name up to its first ``@``, so the buckets of a
  window share it). In its home cell a scope is its full hash; in another cell it is a
  stripe that admits only within an allowance lent by the home (``lua/cells.lua``);
- a stripe short of allowance makes the script answer "short" without holding anything;
  the client borrows at the home (``cells_borrow.lua``), and the retried script applies
  the grant and holds atomically. When the home has no room left to lend, the client
  recalls the unused allowance of every cell holding a loan (``cells_give.lua``), credits
  it at the home and borrows again; if that does not cover the call, it is refused.

Costs, guarantees and failure cases: docs/redis-cluster.md. Works on one Redis too (the
cells are then only key names). ``scope_ttl_seconds`` is refused: a home hash expiring
while stripes still hold its allowance would forget the loans.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import quote

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from ..errors import LedgerUnavailable
from .base import (
    Denial,
    Reservation,
    ScopeCaps,
    ScopeTotals,
    Settlement,
    new_reservation_id,
)
from .redis import (
    _FAILURES,
    RECLAIM_BATCH,
    SETTLE_BATCH,
    RedisLedger,
    Reply,
    _cap_pairs,
    _check,
    _denial,
    _int,
    _json,
    _Later,
    _text,
    _token,
    _totals,
)

__all__ = ["MAX_CELLS", "CellsRedisLedger", "cell_tags"]

logger = logging.getLogger("agent_guard")

MAX_CELLS = 1024
#: scripts of one reserve or charge at most: short -> borrow (or recall) -> retry
ATTEMPTS = 4
_CELL_SCRIPTS = ("reserve", "charge", "settle", "borrow", "give", "grant")


@cache
def _cells_source(name: str) -> str:
    lua = resources.files("agent_guard.ledger") / "lua"
    return ((lua / "common.lua").read_text() + (lua / "cells.lua").read_text()
            + (lua / f"cells_{name}.lua").read_text())


@cache
def cell_tags(namespace: str, cells: int) -> tuple[str, ...]:
    """The hash tag of each cell of ``namespace``: cell ``k``'s slot lies in the middle
    half of the ``k``-th of ``cells`` equal slot ranges (deterministic: every client
    finds the same tags)."""
    ns = quote(namespace, safe="")
    tags = []
    for k in range(cells):
        lo = k * REDIS_CLUSTER_HASH_SLOTS // cells
        hi = (k + 1) * REDIS_CLUSTER_HASH_SLOTS // cells
        quarter = (hi - lo) // 4
        lo, hi = lo + quarter, hi - quarter
        j = 0
        while not lo <= key_slot(f"{ns}/{k}.{j}".encode()) < hi:
            j += 1
        tags.append(f"{ns}/{k}.{j}")
    return tuple(tags)


@dataclass(frozen=True, slots=True)
class _CellScripts:
    reserve: Any
    charge: Any
    settle: Any
    borrow: Any
    give: Any
    grant: Any

    @classmethod
    def on(cls, client: Any) -> _CellScripts:
        return cls(*(client.register_script(_cells_source(n)) for n in _CELL_SCRIPTS))


class CellsRedisLedger(RedisLedger):
    """:class:`RedisLedger` with a namespace spread over ``cells`` hash tags (see the
    module docstring). The async twins run the sync methods in a worker thread."""

    def __init__(self, url: str, *, cells: int, **options: Any) -> None:
        if isinstance(cells, bool) or not isinstance(cells, int) or not (
                1 <= cells <= MAX_CELLS):
            raise ValueError(f"cells must be an int in [1, {MAX_CELLS}], got {cells!r}")
        if options.get("scope_ttl_seconds") is not None:
            raise ValueError("scope_ttl_seconds is not supported with cells: a scope's home "
                             "hash expiring would forget the allowance it lent")
        super().__init__(url, **options)
        self.cells = cells
        self._prefixes = tuple(f"ag:{{{tag}}}:" for tag in cell_tags(self.namespace, cells))
        self._cells = _CellScripts.on(self.client)
        self._homes: dict[str, int] = {}
        self._keys: dict[tuple[int, str], str] = {}
        self._registered: set[tuple[str, int]] = set()
        #: read-backs computed for a landed batch, by id of their queued settle
        self._ready: dict[int, Settlement] = {}
        self._readbacks = _ReadBacks(weakref.ref(self), self.settle_delay)
        _CELL_LEDGERS.add(self)
        self._divisor = str(4 * cells)

    # -- layout ------------------------------------------------------------------------------

    def home(self, scope: str) -> int:
        """The cell holding ``scope``'s home hash."""
        found = self._homes.get(scope)
        if found is None:
            name = scope.partition("@")[0].encode("utf-8", "surrogatepass")
            found = zlib.crc32(name) % self.cells
            if len(self._homes) >= 4096:
                self._homes.clear()
            self._homes[scope] = found
        return found

    def key(self, cell: int, scope: str) -> str:
        """``scope``'s hash in ``cell`` (its home hash in its home cell, else a stripe)."""
        found = self._keys.get((cell, scope))
        if found is None:
            found = self._prefixes[cell] + "s:" + quote(scope, safe="", errors="surrogatepass")
            if len(self._keys) >= 8192:
                self._keys.clear()
            self._keys[cell, scope] = found
        return found

    def scope_key(self, scope: str) -> str:
        return self.key(self.home(scope), scope)

    def _cell_of(self, scopes: Sequence[ScopeCaps] | Sequence[str]) -> int:
        first = scopes[0] if scopes else ""
        return self.home(first if isinstance(first, str) else first.scope)

    def _open_keys(self, cell: int) -> list[str]:
        prefix = self._prefixes[cell]
        return [prefix + "open", prefix + "leases"]

    def _register(self, cell: int, scopes: Sequence[ScopeCaps]) -> None:
        """Mark at home each scope that gets a stripe in ``cell`` (so totals read the
        stripes), before the stripe is first written; once per scope, cell and ledger."""
        for sc in scopes:
            home = self.home(sc.scope)
            if home == cell or (sc.scope, cell) in self._registered:
                continue
            try:
                self.client.hset(self.key(home, sc.scope), "n", "1")
            except _FAILURES as exc:
                raise self._unavailable(exc) from exc
            if len(self._registered) >= 100_000:
                self._registered.clear()
            self._registered.add((sc.scope, cell))

    def _cell_caps(self, cell: int, scopes: Sequence[ScopeCaps], keys: list[str],
                   final: set[int]) -> str:
        out: list[Any] = []
        for i, sc in enumerate(scopes, 1):
            entry: dict[str, Any] = {"c": _cap_pairs(sc)}
            if self.home(sc.scope) != cell:
                entry["s"] = 1
            else:
                if sc.history:
                    first = len(keys) + 1
                    keys.extend(self.key(cell, past) for past in sc.history)
                    entry["h"] = list(range(first, len(keys) + 1))
                if i in final:
                    entry["f"] = 1
            out.append(entry)
        return _json(out)

    def _cell_batch(self, cell: int, items: Sequence[_Later], keys: list[str]) -> str:
        index = {key: i for i, key in enumerate(keys, 1)}

        def at(key: str) -> int:
            found = index.get(key)
            if found is None:
                keys.append(key)
                found = index[key] = len(keys)
            return found

        prefix = self._prefixes[cell]
        out = []
        for item in items:
            r = item.reservation
            flat: list[str] = []
            for dim, amount in item.actual.items():
                flat += (dim, str(amount))
            out.append([r.id, item.token, at(prefix + "done:" + r.id),
                        [at(self.key(cell, scope)) for scope in r.scopes], flat, item.reads])
        return _json(out)

    # -- borrowing ------------------------------------------------------------------------

    def _bank(self, sc: ScopeCaps) -> tuple[int, list[str], list[str]]:
        """``sc``'s home cell, the names of its buckets (current first) and their keys."""
        home = self.home(sc.scope)
        names = [sc.scope, *sc.history]
        return home, names, [self.key(home, name) for name in names]

    def _borrow(self, sc: ScopeCaps, cell: int, need: str, credits: list[list[Any]]
                ) -> Reply:
        _, _, keys = self._bank(sc)
        caps = [[dim, str(cap)] for dim, cap in sc.caps.items()]
        return self._run(self._cells.borrow, keys,
                         [str(cell), _json(caps), need, _json(credits) if credits else "",
                          self._divisor])

    def _recall(self, sc: ScopeCaps, loans: Iterable[Sequence[Any]]) -> list[list[Any]]:
        """Take back the unused allowance of every (bucket, cell) loan of ``sc``: one
        script per cell holding one; the credits for the home."""
        _, names, _ = self._bank(sc)
        by_cell: dict[int, list[int]] = {}
        for k, c in loans:
            by_cell.setdefault(int(c), []).append(int(k))
        credits: list[list[Any]] = []
        for c, idxs in by_cell.items():
            backs = self._run(self._cells.give, [*self._open_keys(c), *(
                self.key(c, names[k - 1]) for k in idxs)], [self._now()])
            for k, back in zip(idxs, backs, strict=True):
                for dim, total in zip(back[::2], back[1::2], strict=True):
                    credits.append([k, c, _text(dim), _text(total)])
        return credits

    def _refill(self, cell: int, scopes: Sequence[ScopeCaps], shorts: Reply, offset: int,
                amounts: Mapping[str, int], final: set[int]
                ) -> tuple[list[list[Any]], Denial | None]:
        """Borrow (recalling when the home is out of room) for each short scope; the
        grants for the retry, or the denial of the first scope that stays short."""
        grants: list[list[Any]] = []
        recalled = False  # an earlier scope was recalled: the retry checks it first
        for index, needs in shorts:
            i = int(index)
            sc = scopes[i - 1]
            pairs = [(_text(d), _text(n)) for d, n in zip(needs[::2], needs[1::2], strict=True)]
            if self.home(sc.scope) == cell:  # loans out: bring them back, then check exactly
                loans = self._borrow(sc, cell, "loans", [])[1]
                self._borrow(sc, cell, "", self._recall(sc, loans))
                final.add(i)
                recalled = True
                continue
            need = _json([x for pair in pairs for x in pair])
            reply = self._borrow(sc, cell, need, [])
            if int(reply[0]) == 0:
                reply = self._borrow(sc, cell, need, self._recall(sc, reply[1]))
                if int(reply[0]) == 0:
                    if recalled:
                        break
                    return grants, self._shared_denial(sc, pairs[0][0], amounts)
            got = reply[1]
            grants += [[offset + i, _text(d), _text(g)]
                       for d, g in zip(got[::2], got[1::2], strict=True)]
        return grants, None

    def _shared_denial(self, sc: ScopeCaps, dim: str, amounts: Mapping[str, int]) -> Denial:
        """The denial of a scope spread over cells, with its totals over every cell: on
        its first capped dimension, in order, that does not fit (else on ``dim``, which
        did not fit a moment ago)."""
        totals = self._read_totals([sc.scope, *sc.history])

        def denial(d: str) -> Denial:
            return Denial(sc.scope, d, sc.caps[d] + totals[0].get_extra(d),
                          sum(t.get_spent(d) for t in totals),
                          sum(t.get_reserved(d) for t in totals), amounts[d])

        for d in sc.caps:
            if amounts.get(d, 0) > 0:
                found = denial(d)
                if found.spent + found.reserved + found.requested > found.cap:
                    return found
        return denial(dim)

    def _final_denial(self, reply: Reply, scopes: Sequence[ScopeCaps],
                      amounts: Mapping[str, int], final: set[int]) -> Denial:
        denial = _denial(reply, scopes)
        if int(reply[1]) in final:
            return self._shared_denial(scopes[int(reply[1]) - 1], denial.dimension, amounts)
        return denial

    def _attempts(self, cell: int, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int],
                  offset: int, send: Callable[[list[list[Any]], set[int]], Reply]
                  ) -> Reply | Denial:
        """Run ``send(grants, final)`` until it does not answer short (borrowing or
        recalling in between); its last reply, or a denial."""
        grants: list[list[Any]] = []
        final: set[int] = set()
        reply: Reply = None
        for _ in range(ATTEMPTS):
            reply = send(grants, final)
            if int(reply[0]) != 2:
                if int(reply[0]) == 0:
                    return self._final_denial(reply, scopes, amounts, final)
                return reply
            grants, denial = self._refill(cell, scopes, reply[1], offset, amounts, final)
            if denial is not None:
                return denial
        index, needs = reply[1][0]
        return self._shared_denial(scopes[int(index) - 1], _text(needs[0]), amounts)

    # -- the contract -----------------------------------------------------------------------

    def reserve(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int], *,
                lease_seconds: float, reservation_id: str | None = None
                ) -> Reservation | Denial:
        _check(amounts)
        rid = reservation_id or new_reservation_id()
        cell = self._cell_of(scopes)
        self._register(cell, scopes)
        prefix = self._prefixes[cell]
        record_keys = [self.key(cell, sc.scope) for sc in scopes]
        record = {"k": record_keys, "a": {d: str(v) for d, v in amounts.items() if v}}
        carried = [self._take_cell(cell)]

        def send(grants: list[list[Any]], final: set[int]) -> Reply:
            token = _token()
            keys = [*self._open_keys(cell), prefix + "done:" + rid, *record_keys]
            args = [self._now(), repr(float(lease_seconds)), rid, token,
                    _json({**record, "t": token}), self._cell_caps(cell, scopes, keys, final),
                    _json(grants) if grants else ""]
            items, carried[0] = carried[0], []
            if items:
                args += (self._done_retention, self._cell_batch(cell, items, keys))
            return self._carry(items, self._cells.reserve, keys, args)

        reply = self._attempts(cell, scopes, amounts, 3, send)
        if isinstance(reply, Denial):
            return reply
        return self._reserved(reply, scopes, amounts, rid)

    def _charge_in_cells(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int],
                         read: bool) -> Reply | Denial:
        _check(amounts)
        cell = self._cell_of(scopes)
        self._register(cell, scopes)
        spend = {d: str(v) for d, v in amounts.items() if v}
        carried = [self._take_cell(cell)]

        def send(grants: list[list[Any]], final: set[int]) -> Reply:
            keys = [*self._open_keys(cell), *(self.key(cell, sc.scope) for sc in scopes)]
            args = [self._now(), self._cell_caps(cell, scopes, keys, final), _json(spend),
                    _json(grants) if grants else "", "", ""]
            items, carried[0] = carried[0], []
            if items:
                args[4:6] = (self._done_retention, self._cell_batch(cell, items, keys))
            args += spend if read else ()
            return self._carry(items, self._cells.charge, keys, args)

        return self._attempts(cell, scopes, amounts, 2, send)

    def charge(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]) -> Denial | None:
        reply = self._charge_in_cells(scopes, amounts, False)
        return reply if isinstance(reply, Denial) else None

    def charge_read(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
                    ) -> Denial | Settlement:
        reply = self._charge_in_cells(scopes, amounts, True)
        if isinstance(reply, Denial):
            return reply
        dims = [d for d, v in amounts.items() if v]
        names = [sc.scope for sc in scopes]
        try:  # the totals over every cell (a scope's hash here holds only its part)
            totals = {t.scope: t for t in self._read_totals(names)}
        except LedgerUnavailable:  # the charge counted; the read back is a hint
            values = iter(reply[1:])
            return Settlement(True, {n: {d: int(next(values)) for d in dims} for n in names})
        return Settlement(True, {n: {d: totals[n].get_spent(d) for d in dims} for n in names})

    def _cell_settle_call(self, cell: int, items: Sequence[_Later]
                          ) -> tuple[list[str], list[str]]:
        keys = self._open_keys(cell)
        return keys, [self._done_retention, self._cell_batch(cell, items, keys)]

    def settle(self, reservation: Reservation, actual: Mapping[str, int]) -> Settlement:
        item = self._later(reservation, actual, None, None)
        keys, args = self._cell_settle_call(self._cell_of(reservation.scopes), [item])
        return self._settled(self._run(self._cells.settle, keys, args)[0], item)

    def settle_later(self, reservation: Reservation, actual: Mapping[str, int], *,
                     reads: Mapping[str, Sequence[str]] | None = None,
                     then: Callable[[Settlement], Any] | None = None) -> None:
        if self.defers_settles:
            super().settle_later(reservation, actual, reads=reads, then=then)
            return
        item = self._later(reservation, actual, reads, then)
        keys, args = self._cell_settle_call(self._cell_of(reservation.scopes), [item])
        self._landed([item], self._run(self._cells.settle, keys, args))

    def _settled(self, reply: Reply, item: _Later) -> Settlement:  # type: ignore[override]
        """A settle's reply: each read scope's spent, a scope with stripes in other cells
        (or a stripe itself) read again over every cell."""
        ready = self._ready.pop(id(item), None)
        if ready is not None:
            return ready
        spent, spread = self._parse([(reply, item)])[0]
        if spent is None:
            return Settlement(False)
        self._read_back([(spent, spread)])
        return Settlement(True, spent)

    def _parse(self, landed: Sequence[tuple[Reply, _Later]]
               ) -> list[tuple[dict[str, dict[str, int]] | None, dict[str, set[str]]]]:
        """Each settle's read-back as its script answered it (None: not counted), with
        the scopes and dimensions to read again over every cell; reports the debts the
        settles left."""
        out: list[tuple[dict[str, dict[str, int]] | None, dict[str, set[str]]]] = []
        debts: dict[tuple[str, int], list[str]] = {}
        for reply, item in landed:
            if not isinstance(reply, list):
                out.append((None, {}))
                continue
            r = item.reservation
            cell = self._cell_of(r.scopes)
            count = sum(len(dims) for dims in item.reads)
            values = iter(reply[1:1 + count])
            flags = reply[1 + count:1 + count + len(r.scopes)]
            for position, dim, debt in reply[1 + count + len(r.scopes)]:
                debts.setdefault((r.scopes[int(position) - 1], cell), []).extend(
                    (_text(dim), _text(debt)))
            spent: dict[str, dict[str, int]] = {}
            spread: dict[str, set[str]] = {}
            for scope, dims, flag in zip(r.scopes, item.reads, flags, strict=True):
                spent[scope] = {dim: int(next(values)) for dim in dims}
                if dims and (self.home(scope) != cell or int(flag)):
                    spread.setdefault(scope, set()).update(dims)
            out.append((spent, spread))
        for (scope, cell), flat in debts.items():
            self._report_debt(scope, cell, flat)
        return out

    def _read_back(self, entries: Sequence[tuple[dict[str, dict[str, int]],
                                                 dict[str, set[str]]]]) -> None:
        """Replace, in each entry's read-back, the spread scopes' values by their spent
        over every cell: one pipeline for every entry."""
        union: dict[str, set[str]] = {}
        for _, spread in entries:
            for scope, dims in spread.items():
                union.setdefault(scope, set()).update(dims)
        if not union:
            return
        try:
            totals = self._spent_over_cells(union)
        except LedgerUnavailable as exc:  # the settles counted; the read back is a hint
            logger.debug("agent-guard: spend read back from one cell only (%s)", exc)
            return
        for spent, spread in entries:
            for scope in spread:
                got = spent[scope]
                got.update((d, totals[scope][d]) for d in got)

    def _landed(self, items: Sequence[_Later], replies: Reply | None) -> None:
        """Deferred settles landed: their debts are reported; a callback whose read-back
        has a spread scope gets it from the read-back thread (one read over the cells
        for every settle landed meanwhile, off the caller's path); the others at once."""
        if replies is not None:
            parsed = self._parse(list(zip(replies, items, strict=True)))
            later = []
            passed: list[_Later] = []
            for item, (spent, spread) in zip(items, parsed, strict=True):
                if item.then is not None and spent is not None and spread:
                    later.append((item.then, spent, spread))
                    item = replace(item, then=None)
                elif item.then is not None:
                    self._ready[id(item)] = (Settlement(False) if spent is None
                                             else Settlement(True, spent))
                passed.append(item)
            if later:
                self._readbacks.put(later)
            items = passed
        super()._landed(items, replies)

    def _drain_read_backs(self) -> None:
        """Deliver every queued read-back now (flush, totals, close)."""
        self._readbacks.drain()

    def _report_debt(self, scope: str, cell: int, flat: list[str]) -> None:
        """A settle above its hold left ``scope``'s stripe in ``cell`` spent past its
        allowance (``flat``: dim, debt, ...): the home lends it that much whatever its
        room (it is spent), so every cell's room shrinks as on one Redis. Until this
        lands (a crash, an error) the debt is the stripe's alone: its next borrow asks
        for it."""
        home = self.home(scope)
        try:
            reply = self._run(self._cells.borrow, [self.key(home, scope)],
                              [str(cell), _json(flat), "debt", "", self._divisor])
            got = reply[1]
            grants = [[1, _text(d), _text(g)] for d, g in zip(got[::2], got[1::2], strict=True)]
            self._run(self._cells.grant, [self.key(cell, scope)], [_json(grants)])
        except LedgerUnavailable as exc:
            logger.warning("agent-guard: a spend above its hold on %r is not yet known to "
                           "its other cells (%s)", scope, exc)

    def _spent_over_cells(self, dims_of: Mapping[str, Iterable[str]]
                          ) -> dict[str, dict[str, int]]:
        """The spent of ``dims_of``'s dimensions of each scope, summed over every cell:
        one pipeline."""
        wanted = [(scope, list(dims)) for scope, dims in dims_of.items()]
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for scope, dims in wanted:
                    for c in range(self.cells):
                        pipe.hmget(self.key(c, scope), ["s:" + d for d in dims])
                raws = iter(pipe.execute())
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc
        out: dict[str, dict[str, int]] = {}
        for scope, dims in wanted:
            sums = [0] * len(dims)
            for _ in range(self.cells):
                for j, value in enumerate(next(raws)):
                    sums[j] += int(value or 0)
            out[scope] = dict(zip(dims, sums, strict=True))
        return out

    def release(self, reservation: Reservation) -> bool:
        cell = self._cell_of(reservation.scopes)
        rid = reservation.id
        keys = [*self._open_keys(cell), self._prefixes[cell] + "done:" + rid]
        args = [rid, _token(), self._done_retention, "0"]
        return int(self._run(self._sync.release, keys, args)) == 1

    def renew(self, reservation: Reservation, lease_seconds: float) -> Reservation | None:
        keys = self._open_keys(self._cell_of(reservation.scopes))
        reply = self._run(self._sync.renew, keys,
                          [self._now(), repr(float(lease_seconds)), reservation.id])
        return None if reply is None else replace(reservation, expires_at=float(reply))

    def extend(self, scope: str, dimension: str, amount: int) -> None:
        _int(amount, "extend amount")
        try:
            self.client.hincrby(self.scope_key(scope), "x:" + dimension, amount)
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc

    def _read_totals(self, scopes: Sequence[str]) -> list[ScopeTotals]:
        """Each scope's counters summed over its home hash and its stripes: one pipeline
        of home hashes, and one of every other cell's for the scopes that have stripes."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for scope in scopes:
                    pipe.hgetall(self.scope_key(scope))
                homes = pipe.execute()
            spread = [i for i, raw in enumerate(homes) if b"n" in raw or "n" in raw]
            stripes: list[Any] = []
            if spread:
                with self.client.pipeline(transaction=False) as pipe:
                    for i in spread:
                        home = self.home(scopes[i])
                        for c in range(self.cells):
                            if c != home:
                                pipe.hgetall(self.key(c, scopes[i]))
                    stripes = pipe.execute()
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc
        out = [_totals(scope, raw) for scope, raw in zip(scopes, homes, strict=True)]
        per = self.cells - 1
        for n, i in enumerate(spread):
            parts = [out[i], *(_totals(scopes[i], raw) for raw in stripes[n * per:(n + 1) * per])]
            out[i] = ScopeTotals(scopes[i], _sum(p.spent for p in parts),
                                 _sum(p.reserved for p in parts), out[i].extra)
        return out

    def totals(self, scope: str) -> ScopeTotals:
        return self.totals_many([scope])[0]

    def totals_many(self, scopes: Sequence[str]) -> list[ScopeTotals]:
        if self._pending or self._inflight:
            self.flush()
        return self._read_totals(scopes)

    def reclaim_expired(self) -> int:
        if self._pending or self._inflight:
            self.flush()
        total = 0
        for cell in range(self.cells):
            while True:
                examined, reclaimed = self._run(
                    self._sync.reclaim, self._open_keys(cell),
                    [self._now(), str(RECLAIM_BATCH), "0"])
                total += int(reclaimed)
                if int(examined) < RECLAIM_BATCH:
                    break
        return total

    # -- deferred settles, per cell ------------------------------------------------------

    def _take_cell(self, cell: int) -> list[_Later]:
        """Up to SETTLE_BATCH queued settles of ``cell``, now on their way."""
        if not self._pending:
            return []
        with self._idle:
            mine = [item for item in self._pending
                    if self._cell_of(item.reservation.scopes) == cell][:SETTLE_BATCH]
            if mine:
                taken = {id(item) for item in mine}
                self._pending = [item for item in self._pending if id(item) not in taken]
                self._inflight += len(mine)
        return mine

    def flush(self) -> None:
        """Land every deferred settle now: one script per cell (and per SETTLE_BATCH)."""
        while self._pending:
            with self._idle:
                items, self._pending = self._pending, []
                self._inflight += len(items)
            groups: dict[int, list[_Later]] = {}
            for item in items:
                groups.setdefault(self._cell_of(item.reservation.scopes), []).append(item)
            batches = [(cell, group[i:i + SETTLE_BATCH]) for cell, group in groups.items()
                       for i in range(0, len(group), SETTLE_BATCH)]
            for n, (cell, batch) in enumerate(batches):
                keys, args = self._cell_settle_call(cell, batch)
                try:
                    replies = self._run(self._cells.settle, keys, args)
                except BaseException:
                    self._landed([it for _, b in batches[n:] for it in b], None)
                    raise
                self._landed(batch, replies)
        if self._inflight:
            self._wait_idle()
        self._drain_read_backs()

    # -- async twins: the sync methods in a worker thread ------------------------------------

    async def areserve(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int], *,
                       lease_seconds: float, reservation_id: str | None = None
                       ) -> Reservation | Denial:
        return await asyncio.to_thread(self.reserve, scopes, amounts,
                                       lease_seconds=lease_seconds,
                                       reservation_id=reservation_id)

    async def asettle(self, reservation: Reservation, actual: Mapping[str, int]) -> Settlement:
        return await asyncio.to_thread(self.settle, reservation, actual)

    async def arelease(self, reservation: Reservation) -> bool:
        return await asyncio.to_thread(self.release, reservation)

    async def arenew(self, reservation: Reservation, lease_seconds: float
                     ) -> Reservation | None:
        return await asyncio.to_thread(self.renew, reservation, lease_seconds)

    async def acharge(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
                      ) -> Denial | None:
        return await asyncio.to_thread(self.charge, scopes, amounts)

    async def acharge_read(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
                           ) -> Denial | Settlement:
        return await asyncio.to_thread(self.charge_read, scopes, amounts)

    async def aextend(self, scope: str, dimension: str, amount: int) -> None:
        await asyncio.to_thread(self.extend, scope, dimension, amount)

    async def atotals(self, scope: str) -> ScopeTotals:
        return await asyncio.to_thread(self.totals, scope)

    async def atotals_many(self, scopes: Sequence[str]) -> list[ScopeTotals]:
        return await asyncio.to_thread(self.totals_many, scopes)

    async def aflush(self) -> None:
        await asyncio.to_thread(self.flush)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)


def _sum(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        for dim, value in part.items():
            out[dim] = out.get(dim, 0) + value
    return out


Callback = Callable[[Settlement], Any]
_Entry = tuple[Callback, dict[str, dict[str, int]], dict[str, set[str]]]


class _ReadBacks:
    """Deferred settles' callbacks waiting for their spread scopes' spend over every
    cell: a daemon thread per ledger delivers them, one read for all that queued in
    ``window`` seconds (the ledger's ``settle_delay``) from the first (``drain``
    delivers at once)."""

    def __init__(self, ledger: weakref.ref[CellsRedisLedger], window: float) -> None:
        self.ledger = ledger
        self.window = window
        self.cond = threading.Condition(threading.Lock())
        self.queue: list[_Entry] = []
        self.busy = 0  # entries taken and not delivered yet
        self.thread: threading.Thread | None = None

    def put(self, entries: list[_Entry]) -> None:
        with self.cond:
            self.queue.extend(entries)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, daemon=True,
                                               name="agent-guard-cell-reads")
                self.thread.start()
            self.cond.notify_all()

    def _take(self) -> list[_Entry]:
        with self.cond:
            taken, self.queue = self.queue, []
            self.busy += len(taken)
        return taken

    def _deliver(self, taken: list[_Entry]) -> None:
        try:
            ledger = self.ledger()
            if ledger is not None:
                ledger._read_back([(spent, spread) for _, spent, spread in taken])
            for then, spent, _ in taken:
                try:
                    then(Settlement(True, spent))
                except Exception:
                    logger.exception("agent-guard: a settle callback failed")
        finally:
            with self.cond:
                self.busy -= len(taken)
                self.cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: bool(self.queue), timeout=60.0)
                if not self.queue:
                    self.thread = None
                    return
            if self.window:  # the settles landing meanwhile share the read
                time.sleep(self.window)
            self._deliver(self._take())

    def drain(self) -> None:
        """Deliver what is queued in this thread, and wait for what the thread took
        (not from a callback the thread runs: it would wait for itself)."""
        if threading.current_thread() is self.thread:
            return
        if self.queue:
            taken = self._take()
            if taken:
                self._deliver(taken)
        with self.cond:
            self.cond.wait_for(lambda: not self.busy and not self.queue, timeout=30.0)

    def after_fork(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.queue, self.busy, self.thread = [], 0, None


#: every CellsRedisLedger of this process (a fork's child resets their read-back queues)
_CELL_LEDGERS: weakref.WeakSet[CellsRedisLedger] = weakref.WeakSet()


def _after_fork() -> None:
    for ledger in list(_CELL_LEDGERS):
        ledger._readbacks.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
