"""Redis ledger (``redis://host:6379/0``, ``rediss://``, ``unix://``): several hosts.

Each operation is one Lua script call, so one round trip: ``hold.lua``
reclaims expired leases and then reserves (or charges) atomically across
every scope; ``finish.lua`` settles or releases once. All keys of a ledger
share one hash tag, ``ag:{<namespace>}:``, so multi-scope scripts also run on
Redis Cluster (shard by namespace). Scope names are percent-encoded into keys,
so no name can collide with another or leave the hash tag. Stored values are
integers and JSON, never pickles.

Amounts must stay below 2**53 (about $9,000,000 in nano-USD per counter):
Lua compares them as doubles.

Leases use the Redis server's clock (``TIME``) so hosts with skewed clocks
agree; pass ``clock=`` (tests) to use a client clock instead.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any
from urllib.parse import quote

import redis
import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import LedgerUnavailable
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

__all__ = ["RedisLedger"]

MAX_AMOUNT = 2**53
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)


def _script(name: str) -> str:
    return (resources.files("agent_guard.ledger") / "lua" / name).read_text()


def _check_bound(amounts: Mapping[str, int]) -> None:
    check_amounts(amounts)
    for dim, value in amounts.items():
        if value >= MAX_AMOUNT:
            raise ValueError(f"ledger amount for {dim!r} must be < 2**53 on Redis, got {value}")


def _strings(amounts: Mapping[str, int]) -> dict[str, str]:
    return {dim: str(int(v)) for dim, v in amounts.items() if v}


class RedisLedger(Ledger):
    def __init__(
        self,
        url: str,
        *,
        namespace: str = "default",
        clock: Callable[[], float] | None = None,
        client: redis.Redis | None = None,
        **client_options: Any,
    ) -> None:
        from . import redact_url

        self.url = redact_url(url)
        self._raw_url = url
        self.namespace = namespace
        self._clock = clock
        options = {"socket_connect_timeout": 2.0, "socket_timeout": 5.0, **client_options}
        self._client_options = options
        self.client: redis.Redis = client or redis.Redis.from_url(url, **options)
        self._async_clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[Any, Any, aredis.Redis]
        ] = weakref.WeakKeyDictionary()
        self.prefix = f"ag:{{{quote(namespace, safe='')}}}:"
        self._leases = self.prefix + "leases"
        self._hold_src, self._finish_src = _script("hold.lua"), _script("finish.lua")
        self._hold = self.client.register_script(self._hold_src)
        self._finish = self.client.register_script(self._finish_src)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisLedger:
        return cls(url, **options)

    # -- keys and arguments --------------------------------------------------------------

    def scope_key(self, scope: str) -> str:
        return self.prefix + "s:" + quote(scope, safe="")

    def _now(self) -> str:
        return "" if self._clock is None else repr(float(self._clock()))

    def _hold_call(self, mode: str, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int],
                   lease_seconds: float, rid: str) -> tuple[list[str], list[str]]:
        scope_keys = [self.scope_key(sc.scope) for sc in scopes]
        for sc in scopes:
            _check_bound(sc.caps)
        keys = [self._leases, self.prefix + "r:" + rid, self.prefix + "d:" + rid, *scope_keys]
        payload = json.dumps({"s": scope_keys, "a": _strings(amounts)})
        caps = json.dumps([{d: str(c) for d, c in sc.caps.items()} for sc in scopes])
        args = [self.prefix, self._now(), repr(float(lease_seconds)), payload, caps, rid, mode]
        return keys, args

    def _finish_call(self, mode: str, reservation: Reservation, actual: Mapping[str, int]
                     ) -> tuple[list[str], list[str]]:
        rid = reservation.id
        keys = [self._leases, self.prefix + "r:" + rid, self.prefix + "d:" + rid,
                *(self.scope_key(s) for s in reservation.scopes)]
        args = [json.dumps(_strings(actual)), rid, str(DONE_RETENTION_SECONDS), mode]
        return keys, args

    @staticmethod
    def _reserved(reply: list[Any], scopes: Sequence[ScopeCaps], amounts: Mapping[str, int],
                  rid: str) -> Reservation | Denial:
        status = int(reply[0])
        if status == -1:
            raise ValueError(f"reservation id {rid!r} was already used")
        if status == 0:
            return _denial(reply, scopes)
        return Reservation(rid, tuple(sc.scope for sc in scopes), dict(amounts),
                           float(reply[1]))

    def _unavailable(self, exc: BaseException) -> LedgerUnavailable:
        return LedgerUnavailable(self.url, exc)

    # -- contract --------------------------------------------------------------------------

    def reserve(
        self,
        scopes: Sequence[ScopeCaps],
        amounts: Mapping[str, int],
        *,
        lease_seconds: float,
        reservation_id: str | None = None,
    ) -> Reservation | Denial:
        _check_bound(amounts)
        rid = reservation_id or new_reservation_id()
        keys, args = self._hold_call("reserve", scopes, amounts, lease_seconds, rid)
        try:
            reply = self._hold(keys=keys, args=args)
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc
        return self._reserved(reply, scopes, amounts, rid)

    def settle(self, reservation: Reservation, actual: Mapping[str, int]) -> Settlement:
        _check_bound(actual)
        keys, args = self._finish_call("settle", reservation, actual)
        try:
            return _settlement(reservation, self._finish(keys=keys, args=args))
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc

    def release(self, reservation: Reservation) -> bool:
        keys, args = self._finish_call("release", reservation, {})
        try:
            return bool(int(self._finish(keys=keys, args=args)))
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc

    def charge(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]) -> Denial | None:
        _check_bound(amounts)
        keys, args = self._hold_call("charge", scopes, amounts, 0, new_reservation_id())
        try:
            reply = self._hold(keys=keys, args=args)
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc
        return _denial(reply, scopes) if int(reply[0]) == 0 else None

    def extend(self, scope: str, dimension: str, amount: int) -> None:
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise TypeError(f"extend amount must be an int, got {amount!r}")
        try:
            self.client.hincrby(self.scope_key(scope), "x:" + dimension, amount)
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc

    def totals(self, scope: str) -> ScopeTotals:
        try:
            raw = self.client.hgetall(self.scope_key(scope))
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc
        return _totals(scope, raw)

    def reclaim_expired(self) -> int:
        total = 0
        while True:
            keys, args = self._hold_call("reclaim", [], {}, 0, new_reservation_id())
            try:
                reply = self._hold(keys=keys, args=args)
            except _UNAVAILABLE as exc:
                raise self._unavailable(exc) from exc
            n = int(reply[1])
            total += n
            if n < 1000:
                return total

    def close(self) -> None:
        self.client.close()

    # -- native async twins --------------------------------------------------------------

    def _async(self) -> tuple[Any, Any, aredis.Redis]:
        """The async client of the running event loop (an asyncio client is bound to
        the loop it was created on)."""
        loop = asyncio.get_running_loop()
        found = self._async_clients.get(loop)
        if found is None:
            client = aredis.Redis.from_url(self._raw_url, **self._client_options)
            found = (client.register_script(self._hold_src),
                     client.register_script(self._finish_src), client)
            self._async_clients[loop] = found
        return found

    async def areserve(
        self,
        scopes: Sequence[ScopeCaps],
        amounts: Mapping[str, int],
        *,
        lease_seconds: float,
        reservation_id: str | None = None,
    ) -> Reservation | Denial:
        _check_bound(amounts)
        rid = reservation_id or new_reservation_id()
        hold, _, _ = self._async()
        keys, args = self._hold_call("reserve", scopes, amounts, lease_seconds, rid)
        try:
            reply = await hold(keys=keys, args=args)
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc
        return self._reserved(reply, scopes, amounts, rid)

    async def asettle(self, reservation: Reservation, actual: Mapping[str, int]) -> Settlement:
        _check_bound(actual)
        _, finish, _ = self._async()
        keys, args = self._finish_call("settle", reservation, actual)
        try:
            return _settlement(reservation, await finish(keys=keys, args=args))
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc

    async def arelease(self, reservation: Reservation) -> bool:
        _, finish, _ = self._async()
        keys, args = self._finish_call("release", reservation, {})
        try:
            return bool(int(await finish(keys=keys, args=args)))
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc

    async def acharge(
        self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
    ) -> Denial | None:
        _check_bound(amounts)
        hold, _, _ = self._async()
        keys, args = self._hold_call("charge", scopes, amounts, 0, new_reservation_id())
        try:
            reply = await hold(keys=keys, args=args)
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc
        return _denial(reply, scopes) if int(reply[0]) == 0 else None

    async def aextend(self, scope: str, dimension: str, amount: int) -> None:
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise TypeError(f"extend amount must be an int, got {amount!r}")
        _, _, client = self._async()
        try:
            await client.hincrby(self.scope_key(scope), "x:" + dimension, amount)
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc

    async def atotals(self, scope: str) -> ScopeTotals:
        _, _, client = self._async()
        try:
            raw = await client.hgetall(self.scope_key(scope))
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc
        return _totals(scope, raw)

    async def aclose(self) -> None:
        found = self._async_clients.pop(asyncio.get_running_loop(), None)
        if found is not None:
            await found[2].aclose()
        self.close()


def _denial(reply: list[Any], scopes: Sequence[ScopeCaps]) -> Denial:
    _, index, dim, cap, spent, reserved, want = (
        x.decode() if isinstance(x, bytes) else x for x in reply)
    return Denial(scopes[int(index) - 1].scope, str(dim), int(cap), int(spent), int(reserved),
                  int(want))


def _settlement(reservation: Reservation, reply: Any) -> Settlement:
    """finish.lua answers 0, or {1, '[{dim: spent, ...} per scope]'}."""
    if not isinstance(reply, list):
        return Settlement(False)
    raw = reply[1].decode() if isinstance(reply[1], bytes) else reply[1]
    per_scope = json.loads(raw) if raw not in ("", "{}") else []
    return Settlement(True, {
        scope: {d: int(v) for d, v in values.items()}
        for scope, values in zip(reservation.scopes, per_scope, strict=False)
    })


def _totals(scope: str, raw: Mapping[Any, Any]) -> ScopeTotals:
    spent: dict[str, int] = {}
    reserved: dict[str, int] = {}
    extra: dict[str, int] = {}
    target = {"s": spent, "r": reserved, "x": extra}
    for key, value in raw.items():
        k = key.decode() if isinstance(key, bytes) else str(key)
        kind, _, dim = k.partition(":")
        if kind in target:
            target[kind][dim] = int(value)
    return ScopeTotals(scope, spent, reserved, extra)
