"""Redis ledger (``redis://host:6379/0``, ``rediss://``, ``unix://``): several hosts.

Every ``reserve``, ``settle``, ``release`` and ``charge`` is exactly one EVALSHA of a
Lua script in ``lua/`` (``common.lua`` is prepended to each), so each is atomic
and costs one round trip. ``reserve`` and ``charge`` first give back up to 100
expired leases, so no separate reclaim call is needed; ``reclaim_expired`` loops
over ``reclaim.lua`` until none are left. ``extend`` is one ``HINCRBY`` and
``totals`` one ``HGETALL``.

Keys (see ``lua/common.lua``) share one hash tag, ``ag:{<namespace>}:``, so
multi-scope scripts also run on Redis Cluster (one slot per namespace). Scope
names are percent-encoded into keys, so no name collides with another or leaves
the hash tag. Stored values are decimal integers and JSON, never pickles.

Exactness: counters change with ``HINCRBY`` (64-bit), but Lua compares doubles,
so amounts and caps must be below 2**53 (about $9,000,000 in nano-USD); the
client refuses larger ones with ``ValueError``.

Leases use the Redis server's clock (``TIME`` inside the script) so hosts with
skewed clocks agree; ``clock=`` (tests) sends the client's time instead.

Retries: redis-py would resend a command after a timeout, running a script
twice. The ledger's clients do not retry by default (``retries=0``: an error is
:class:`~agent_guard.errors.LedgerUnavailable` and the call is refused). With
``retries=N`` a resent reserve, settle or release is recognised by a per-call
token and answered as the first one was; a resent ``charge`` may count twice
(never less than once).

Memory bound: by default scope hashes live forever (and ``done:<id>`` markers 7
days). With ``scope_ttl_seconds=N`` (or ``?scope_ttl_seconds=N`` in the URL)
every write to a scope hash, inside the same script, refreshes an ``EXPIRE`` of
N seconds, and ``done:<id>`` markers are kept min(N, 7 days). The trade-off: a
session idle for N seconds loses its counters, so its budget resets; and a hold
whose scope expired is dropped with it. Pick N longer than any lease and than
any session lasts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import quote

import redis

from ..errors import LedgerUnavailable
from ..stores.redis import LEDGER, REDIS_ERRORS, redis_client
from ..stores.url import REDIS_BACKENDS, redact_url
from .base import (
    DONE_RETENTION_SECONDS,
    Denial,
    Ledger,
    Reservation,
    ScopeCaps,
    ScopeTotals,
    Settlement,
    check_amounts,
    new_reservation_id,
)

__all__ = ["MAX_AMOUNT", "RedisLedger"]

# Amounts, caps and extensions must be below this: Lua compares them as doubles.
MAX_AMOUNT = 2**53
RECLAIM_BATCH = 1000
_SCRIPTS = ("reserve", "settle", "release", "charge", "reclaim", "renew")
_FAILURES = REDIS_ERRORS
_JSON = {"separators": (",", ":")}

Reply = Any  # what a script call answers (lists, bytes, ints)


@cache
def script_source(name: str) -> str:
    """The full text of ``lua/<name>.lua`` as sent to Redis (``common.lua`` + body)."""
    lua = resources.files("agent_guard.ledger") / "lua"
    return (lua / "common.lua").read_text() + (lua / f"{name}.lua").read_text()


def _int(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if not -MAX_AMOUNT < value < MAX_AMOUNT:
        raise ValueError(f"{what} must be below 2**53 in magnitude on Redis, got {value}")
    return value


def _check(amounts: Mapping[str, int]) -> None:
    check_amounts(amounts)
    for dim, value in amounts.items():
        _int(value, f"ledger amount for {dim!r}")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _token() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class _Scripts:
    """One client and its registered scripts (sync or async alike)."""

    client: Any
    reserve: Any
    settle: Any
    release: Any
    charge: Any
    reclaim: Any
    renew: Any

    @classmethod
    def on(cls, client: Any) -> _Scripts:
        return cls(client, *(client.register_script(script_source(n)) for n in _SCRIPTS))


class RedisLedger(Ledger):
    """Budgets in Redis; see the module docstring for the data layout and guarantees.

    ``client_options`` go to the connections of both the sync and the asyncio
    client (defaults: ``socket_connect_timeout=2``, ``socket_timeout=5``;
    ``health_check_interval`` etc. pass through).

    Connections come from a blocking pool of ``max_connections`` (64) per client:
    a thread that finds them all busy waits up to ``pool_timeout`` seconds (5)
    for one, then the call fails with ``LedgerUnavailable`` (and the guard's
    ``fail`` policy applies), so a burst of threads never opens an unbounded
    number of sockets to Redis.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "default",
        clock: Callable[[], float] | None = None,
        retries: int = 0,
        client: redis.Redis | None = None,
        scope_ttl_seconds: int | None = None,
        max_connections: int | None = None,
        pool_timeout: float | None = None,
        **client_options: Any,
    ) -> None:

        if scope_ttl_seconds is not None and (
                isinstance(scope_ttl_seconds, bool) or not isinstance(scope_ttl_seconds, int)
                or scope_ttl_seconds < 1):
            raise ValueError("scope_ttl_seconds must be an int >= 1 (and longer than any lease), "
                             f"got {scope_ttl_seconds!r}")
        self.scope_ttl_seconds = scope_ttl_seconds
        self._ttl = str(scope_ttl_seconds or 0)
        self._done_retention = str(min(DONE_RETENTION_SECONDS,
                                       scope_ttl_seconds or DONE_RETENTION_SECONDS))

        self.url = redact_url(url)
        self._raw_url = url
        self.namespace = namespace
        self._clock = clock
        # one recipe for the sync client and each event loop's async client
        self._client_args: dict[str, Any] = {
            "profile": LEDGER, "retries": retries, "max_connections": max_connections,
            "pool_timeout": pool_timeout, **client_options}
        if client is None:
            try:  # a cluster client learns the slot map here: it needs a node to answer
                client = redis_client(url, **self._client_args)
            except _FAILURES as exc:
                raise LedgerUnavailable(self.url, exc) from exc
        self.client: redis.Redis = client
        self._sync = _Scripts.on(self.client)
        self._async_by_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, _Scripts] = weakref.WeakKeyDictionary()
        self._async_closers: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self.prefix = f"ag:{{{quote(namespace, safe='')}}}:"
        self._open = self.prefix + "open"
        self._leases = self.prefix + "leases"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisLedger:
        """``namespace`` and ``scope_ttl_seconds`` may come in the URL's query (as for
        the usage store's URL), beside redis-py's options; keyword options win; any
        other option raises (see :mod:`agent_guard.stores`)."""
        from ..stores import parse_url

        parsed = parse_url(url, "ledger")
        if parsed.backend not in REDIS_BACKENDS:
            raise ValueError(f"not a Redis URL: {parsed.redacted!r}")
        return cls(parsed.client_url, **{**parsed.kind_options, **options})

    # -- keys and arguments --------------------------------------------------------------

    def scope_key(self, scope: str) -> str:
        """The HASH of ``scope``'s counters (injective in ``scope``)."""
        return self.prefix + "s:" + quote(scope, safe="", errors="surrogatepass")

    def _done_key(self, rid: str) -> str:
        return self.prefix + "done:" + rid

    def _now(self) -> str:
        return "" if self._clock is None else repr(float(self._clock()))

    def _caps(self, scopes: Sequence[ScopeCaps], keys: list[str]) -> str:
        """The caps argument of a check; past buckets of rolling windows are appended
        to ``keys`` and named by their (1-based) index."""
        out: list[Any] = []
        for sc in scopes:
            pairs = [[dim, str(_int(cap, f"cap on {dim!r} of {sc.scope!r}"))]
                     for dim, cap in sc.caps.items()]
            if sc.history:
                first = len(keys) + 1
                keys.extend(self.scope_key(past) for past in sc.history)
                out.append({"c": pairs, "h": list(range(first, len(keys) + 1))})
            else:
                out.append(pairs)
        return json.dumps(out, **_JSON)

    def _reserve_call(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int],
                      lease_seconds: float, rid: str) -> tuple[list[str], list[str]]:
        scope_keys = [self.scope_key(sc.scope) for sc in scopes]
        token = _token()
        record = json.dumps({"k": scope_keys, "a": {d: str(v) for d, v in amounts.items() if v},
                             "t": token}, **_JSON)
        keys = [self._open, self._leases, self._done_key(rid), *scope_keys]
        return keys, [self._now(), repr(float(lease_seconds)), rid, token, record,
                      self._caps(scopes, keys), self._ttl]

    def _charge_call(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int],
                     read: bool = False) -> tuple[list[str], list[str]]:
        """``read``: name the charged dimensions, so the script returns their new
        totals (a plain charge skips those reads)."""
        keys = [self._open, self._leases, *(self.scope_key(sc.scope) for sc in scopes)]
        spend = {d: str(v) for d, v in amounts.items() if v}
        return keys, [self._now(), self._caps(scopes, keys), json.dumps(spend, **_JSON),
                      self._ttl, *(spend if read else ())]

    @staticmethod
    def _charged(reply: Reply, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
                 ) -> Denial | Settlement:
        if int(reply[0]) == 0:
            return _denial(reply, scopes)
        dims = [d for d, v in amounts.items() if v]
        values = iter(reply[1:])
        return Settlement(True, {sc.scope: {dim: int(next(values)) for dim in dims}
                                 for sc in scopes})

    def _finish_call(self, reservation: Reservation, actual: Mapping[str, int] | None
                     ) -> tuple[list[str], list[str]]:
        rid = reservation.id
        keys = [self._open, self._leases, self._done_key(rid)]
        args = [rid, _token(), self._done_retention, self._ttl]
        if actual is not None:
            keys += [self.scope_key(s) for s in reservation.scopes]
            for dim, amount in actual.items():
                args += [dim, str(amount)]
        return keys, args

    def _renew_call(self, reservation: Reservation, lease_seconds: float
                    ) -> tuple[list[str], list[str]]:
        return [self._open, self._leases], [self._now(), repr(float(lease_seconds)),
                                            reservation.id]

    def _reclaim_call(self) -> tuple[list[str], list[str]]:
        return [self._open, self._leases], [self._now(), str(RECLAIM_BATCH), self._ttl]

    # -- replies ------------------------------------------------------------------------------

    @staticmethod
    def _reserved(reply: Reply, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int],
                  rid: str) -> Reservation | Denial:
        status = int(reply[0])
        if status == -1:
            raise ValueError(f"reservation id {rid!r} was already used")
        if status == 0:
            return _denial(reply, scopes)
        return Reservation(rid, tuple(sc.scope for sc in scopes), dict(amounts),
                           float(reply[1]))

    @staticmethod
    def _settled(reply: Reply, reservation: Reservation, actual: Mapping[str, int]
                 ) -> Settlement:
        if not isinstance(reply, list):
            return Settlement(False)
        values = iter(reply[1:])
        return Settlement(True, {
            scope: {dim: int(next(values)) for dim in actual} for scope in reservation.scopes
        })

    def _unavailable(self, exc: BaseException) -> LedgerUnavailable:
        if isinstance(exc, redis.exceptions.MovedError | redis.exceptions.AskError):
            return LedgerUnavailable(self.url, exc, hint=(
                "This server is a Redis Cluster node: a redis:// client reaches only the "
                "slots it owns. Name the cluster with a "
                "redis+cluster://host:port[,host:port...] URL."))
        return LedgerUnavailable(self.url, exc)

    def _run(self, script: Any, keys: list[str], args: list[str]) -> Reply:
        try:
            return script(keys=keys, args=args)
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc

    async def _arun(self, script: Any, keys: list[str], args: list[str]) -> Reply:
        try:
            return await script(keys=keys, args=args)
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc

    # -- contract --------------------------------------------------------------------------

    def reserve(
        self,
        scopes: Sequence[ScopeCaps],
        amounts: Mapping[str, int],
        *,
        lease_seconds: float,
        reservation_id: str | None = None,
    ) -> Reservation | Denial:
        _check(amounts)
        rid = reservation_id or new_reservation_id()
        keys, args = self._reserve_call(scopes, amounts, lease_seconds, rid)
        return self._reserved(self._run(self._sync.reserve, keys, args), scopes, amounts, rid)

    def settle(self, reservation: Reservation, actual: Mapping[str, int]) -> Settlement:
        _check(actual)
        keys, args = self._finish_call(reservation, actual)
        return self._settled(self._run(self._sync.settle, keys, args), reservation, actual)

    def release(self, reservation: Reservation) -> bool:
        keys, args = self._finish_call(reservation, None)
        return int(self._run(self._sync.release, keys, args)) == 1

    def renew(self, reservation: Reservation, lease_seconds: float) -> Reservation | None:
        reply = self._run(self._sync.renew, *self._renew_call(reservation, lease_seconds))
        return None if reply is None else replace(reservation, expires_at=float(reply))

    def charge(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]) -> Denial | None:
        _check(amounts)
        keys, args = self._charge_call(scopes, amounts)
        reply = self._run(self._sync.charge, keys, args)
        return _denial(reply, scopes) if int(reply[0]) == 0 else None

    def charge_read(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
                    ) -> Denial | Settlement:
        _check(amounts)
        keys, args = self._charge_call(scopes, amounts, read=True)
        return self._charged(self._run(self._sync.charge, keys, args), scopes, amounts)

    def extend(self, scope: str, dimension: str, amount: int) -> None:
        _int(amount, "extend amount")
        key = self.scope_key(scope)
        try:
            if self.scope_ttl_seconds is None:
                self.client.hincrby(key, "x:" + dimension, amount)
            else:
                with self.client.pipeline(transaction=True) as pipe:
                    pipe.hincrby(key, "x:" + dimension, amount)
                    pipe.expire(key, self.scope_ttl_seconds)
                    pipe.execute()
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc

    def totals(self, scope: str) -> ScopeTotals:
        try:
            raw = self.client.hgetall(self.scope_key(scope))
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc
        return _totals(scope, raw)

    def totals_many(self, scopes: Sequence[str]) -> list[ScopeTotals]:
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for scope in scopes:
                    pipe.hgetall(self.scope_key(scope))
                raws = pipe.execute()
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc
        return [_totals(scope, raw) for scope, raw in zip(scopes, raws, strict=True)]

    def reclaim_expired(self) -> int:
        total = 0
        while True:
            examined, reclaimed = self._run(self._sync.reclaim, *self._reclaim_call())
            total += int(reclaimed)
            if int(examined) < RECLAIM_BATCH:
                return total

    def close(self) -> None:
        self.client.close()

    # -- native async twins --------------------------------------------------------------

    def _async(self) -> _Scripts:
        """The async client of the running event loop, made on first use (an asyncio
        client belongs to the loop it was created on) and closed when the loop shuts
        down (see :func:`_close_at_loop_shutdown`)."""
        loop = asyncio.get_running_loop()
        found = self._async_by_loop.get(loop)
        if found is None:
            # loops closed without shutting down their async generators (a bare
            # loop.close()) never ran their closer: drop their clients, whose sockets the
            # transports close when collected
            for old in [old for old in self._async_closers if old.is_closed()]:
                self._async_by_loop.pop(old, None)
                self._async_closers.pop(old, None)
            client = redis_client(self._raw_url, asynchronous=True, **self._client_args)
            found = _Scripts.on(client)
            self._async_by_loop[loop] = found
            self._async_closers[loop] = _close_at_loop_shutdown(
                (weakref.ref(self._async_by_loop), weakref.ref(self._async_closers)),
                loop, client)
        return found

    async def _aready(self) -> _Scripts:
        """:meth:`_async`, with a cluster client's slot map learnt before any command:
        redis-py's asyncio cluster client learns it lazily, and commands sent at once on
        a fresh client went to the wrong nodes (MOVED) and had their connections closed
        under them."""
        found = self._async()
        if getattr(found.client, "_initialize", False):
            try:
                await found.client.initialize()  # once; concurrent callers wait on its lock
            except _FAILURES as exc:
                raise self._unavailable(exc) from exc
        return found

    async def areserve(
        self,
        scopes: Sequence[ScopeCaps],
        amounts: Mapping[str, int],
        *,
        lease_seconds: float,
        reservation_id: str | None = None,
    ) -> Reservation | Denial:
        _check(amounts)
        rid = reservation_id or new_reservation_id()
        keys, args = self._reserve_call(scopes, amounts, lease_seconds, rid)
        reply = await self._arun((await self._aready()).reserve, keys, args)
        return self._reserved(reply, scopes, amounts, rid)

    async def asettle(self, reservation: Reservation, actual: Mapping[str, int]) -> Settlement:
        _check(actual)
        keys, args = self._finish_call(reservation, actual)
        reply = await self._arun((await self._aready()).settle, keys, args)
        return self._settled(reply, reservation, actual)

    async def arelease(self, reservation: Reservation) -> bool:
        keys, args = self._finish_call(reservation, None)
        return int(await self._arun((await self._aready()).release, keys, args)) == 1

    async def arenew(self, reservation: Reservation, lease_seconds: float
                     ) -> Reservation | None:
        reply = await self._arun((await self._aready()).renew,
                                 *self._renew_call(reservation, lease_seconds))
        return None if reply is None else replace(reservation, expires_at=float(reply))

    async def acharge(
        self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
    ) -> Denial | None:
        _check(amounts)
        keys, args = self._charge_call(scopes, amounts)
        reply = await self._arun((await self._aready()).charge, keys, args)
        return _denial(reply, scopes) if int(reply[0]) == 0 else None

    async def acharge_read(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
                           ) -> Denial | Settlement:
        _check(amounts)
        keys, args = self._charge_call(scopes, amounts, read=True)
        reply = await self._arun((await self._aready()).charge, keys, args)
        return self._charged(reply, scopes, amounts)

    async def aextend(self, scope: str, dimension: str, amount: int) -> None:
        _int(amount, "extend amount")
        key = self.scope_key(scope)
        client = (await self._aready()).client
        try:
            if self.scope_ttl_seconds is None:
                await client.hincrby(key, "x:" + dimension, amount)
            else:
                async with client.pipeline(transaction=True) as pipe:
                    pipe.hincrby(key, "x:" + dimension, amount)
                    pipe.expire(key, self.scope_ttl_seconds)
                    await pipe.execute()
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc

    async def atotals(self, scope: str) -> ScopeTotals:
        try:
            raw = await (await self._aready()).client.hgetall(self.scope_key(scope))
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc
        return _totals(scope, raw)

    async def atotals_many(self, scopes: Sequence[str]) -> list[ScopeTotals]:
        try:
            async with (await self._aready()).client.pipeline(transaction=False) as pipe:
                for scope in scopes:
                    pipe.hgetall(self.scope_key(scope))
                raws = await pipe.execute()
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc
        return [_totals(scope, raw) for scope, raw in zip(scopes, raws, strict=True)]

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        self._async_by_loop.pop(loop, None)
        closer = self._async_closers.pop(loop, None)
        if closer is not None:
            await closer.aclose()  # closes this loop's client
        self.close()


def _close_at_loop_shutdown(registries: tuple[Callable[[], Any], ...],
                            loop: asyncio.AbstractEventLoop, client: Any) -> Any:
    """An async generator, started here, whose ``finally`` closes ``client``.

    An asyncio client belongs to one loop, so each loop gets its own pool. A worker that
    calls ``asyncio.run`` per task made a new loop, and so a new pool with an open
    connection, per task; and the pool, holding the loop through its connections, was
    never collected. Event loops finalise the async generators started in them when they
    shut down (``asyncio.run`` and pytest-asyncio call ``shutdown_asyncgens``), which
    closes the client while its loop still runs. The generator is advanced to its
    ``yield`` synchronously, in the running loop, so its first-iteration hook
    registers it with that loop.
    """

    async def closer() -> Any:
        try:
            yield
        finally:
            # forget the loop everywhere: an entry (this generator included) that still
            # refers to its loop would keep that loop alive as long as the ledger
            for registry in registries:
                found = registry()
                if found is not None:
                    found.pop(loop, None)
            await client.aclose()

    gen = closer()
    with contextlib.suppress(StopIteration):  # ran to the yield: started, suspended
        gen.__anext__().send(None)
    return gen


def _denial(reply: Reply, scopes: Sequence[ScopeCaps]) -> Denial:
    """``{0, scope index, dim, cap, extra, spent, reserved, requested}`` -> Denial."""
    _, index, dim, cap, extra, spent, reserved, want = reply
    return Denial(scopes[int(index) - 1].scope, _text(dim), int(cap) + int(extra), int(spent),
                  int(reserved), int(want))


def _totals(scope: str, raw: Mapping[bytes | str, bytes | str]) -> ScopeTotals:
    counters: dict[str, dict[str, int]] = {"s": {}, "r": {}, "x": {}}
    for key, value in raw.items():
        kind, _, dim = _text(key).partition(":")
        if kind in counters:
            counters[kind][dim] = int(value)
    return ScopeTotals(scope, counters["s"], counters["r"], counters["x"])
