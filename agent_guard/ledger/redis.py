"""Redis ledger (``redis://host:6379/0``, ``rediss://``, ``unix://``): several hosts.

Every ``reserve``, ``settle``, ``release`` and ``charge`` is exactly one EVALSHA of a
Lua script in ``lua/`` (``common.lua`` is prepended to each), so each is atomic
and costs one round trip. ``settle_later`` (what the guard uses) sends nothing: the
settle rides with this ledger's next ``reserve`` or ``charge`` script, or is flushed
after ``settle_delay`` seconds (0.05) by a background thread, by ``flush``, ``totals``,
``close`` and at process exit, so a guarded call costs one round trip (see
docs/redis-ledger.md for what this does to holds and threshold events).

``reserve`` and ``charge`` first give back up to 100 expired leases, so no separate
reclaim call is needed; ``reclaim_expired`` loops over ``reclaim.lua`` until none are
left. ``extend`` is one ``HINCRBY`` and
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
import atexit
import codecs
import contextlib
import json
import logging
import math
import os
import select
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import quote

import redis

from .._frozen import fast_init, fields_maker
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

logger = logging.getLogger("agent_guard")

# Amounts, caps and extensions must be below this: Lua compares them as doubles.
MAX_AMOUNT = 2**53
RECLAIM_BATCH = 1000
_SCRIPTS = ("reserve", "settle", "release", "charge", "reclaim", "renew")
_FAILURES = REDIS_ERRORS
# compact JSON, as json.dumps(value, separators=(",", ":")) writes it; one encoder for
# every call (json.dumps builds a new JSONEncoder per call when given options)
_json = json.JSONEncoder(separators=(",", ":")).encode
# Deferred settles: the default bounded delay, and the most one script carries.
SETTLE_DELAY_SECONDS = 0.05
SETTLE_BATCH = 64

Reply = Any  # what a script call answers (lists, bytes, ints)

_CAN_POLL = hasattr(select, "poll")
# How long the sync ledger polls for a script's reply before it blocks (microseconds;
# ``reply_spin_us``) where this process may run on two CPUs or more. Spins that find no
# reply wait longer and longer (up to SPIN_BACKOFF replies) before the next spin.
REPLY_SPIN_US = 200.0
SPIN_BACKOFF = 1024
SPIN_FIRST_BACKOFF = 2


def default_reply_spin_us() -> float:
    """REPLY_SPIN_US, or 0 where this process may use one CPU only: there the server
    (or the thread that would answer) may need the core the client would spin on."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return REPLY_SPIN_US if cpus > 1 and _CAN_POLL else 0.0


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
    for value in amounts.values():
        # the common case (an int in range) without a call or an error text per amount;
        # anything else takes the full checks, which raise their own errors in order
        if type(value) is not int or not 0 <= value < MAX_AMOUNT:
            check_amounts(amounts)
            for dim, value_ in amounts.items():
                _int(value_, f"ledger amount for {dim!r}")
            return


def _cap_pairs(sc: ScopeCaps) -> list[list[str]]:
    """``[[dim, "cap"], ...]`` of ``sc``, the caps argument of the scripts' check (each
    cap checked as by ``_int``, whose error text is built only for a cap it refuses)."""
    return [[dim, str(cap) if type(cap) is int and -MAX_AMOUNT < cap < MAX_AMOUNT
             else str(_int(cap, f"cap on {dim!r} of {sc.scope!r}"))]
            for dim, cap in sc.caps.items()]


_NAMES: dict[str, str] = {}  # a dimension name -> its JSON string literal


def _name(dim: str) -> str:
    """``dim`` as a JSON string literal, as ``_json`` writes it (kept per name)."""
    text = _NAMES.get(dim)
    if text is None:
        if len(_NAMES) >= 4096:
            _NAMES.clear()
        text = _NAMES[dim] = _json(dim)
    return text


_PAIRS: dict[str, str] = {}  # a dimension name -> its JSON string literal, a comma, a quote


def _pair(dim: str) -> str:
    """``dim`` as the start of a ``dim, "amount"`` pair in JSON (kept per name)."""
    if len(_PAIRS) >= 4096:
        _PAIRS.clear()
    text = _PAIRS[dim] = _name(dim) + ',"'
    return text


_READS: dict[tuple[tuple[str, ...], ...], str] = {}  # a settle's reads -> their JSON


def _reads(reads: tuple[tuple[str, ...], ...]) -> str:
    """A settle's ``reads`` (dimensions per scope) as the JSON of a list of lists,
    without its brackets (kept per value: a guard's settles repeat a few)."""
    text = _READS.get(reads)
    if text is None:
        if len(_READS) >= 4096:
            _READS.clear()
        text = _READS[reads] = ",".join(["[" + ",".join([_name(d) for d in dims]) + "]"
                                         for dims in reads])
    return text


def _quoted(keys: Sequence[str]) -> str:
    """``_json(list(keys))`` of keys this ledger built: percent-encoded names under a
    prefix of safe characters, so no character in them needs an escape."""
    return '["' + '","'.join(keys) + '"]'


def _record_head(keys: Sequence[str]) -> str:
    """The start of a reserve's record on the scope keys ``keys`` (see ``_record``)."""
    return '{"k":' + _quoted(keys) + ',"a":{'


def _record(head: str, amounts: Mapping[str, int], token: str) -> str:
    """A reserve's record, ``_json({"k": keys, "a": {dim: "amount" (non-zero)}, "t":
    token})`` written directly from ``head = _record_head(keys)`` (a test checks the two
    agree)."""
    return head + ",".join([_name(d) + ':"' + str(v) + '"' for d, v in amounts.items()
                            if v]) + '},"t":"' + token + '"}'


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _token() -> str:
    """Unique per script call, across processes (what a reservation id is made of)."""
    return new_reservation_id()


@fast_init
@dataclass(frozen=True, slots=True)
class _Later:
    """A settle waiting to ride with the next script: its token is fixed when queued, so
    a batch resent after an error counts once."""

    reservation: Reservation
    actual: Mapping[str, int]
    reads: tuple[tuple[str, ...], ...]  # dimensions to read back, per scope
    then: Callable[[Settlement], Any] | None
    token: str


@dataclass(frozen=True, slots=True)
class _Scoped:
    """A reserve's arguments that depend on its scopes alone (``RedisLedger._scoped``):
    its scope keys then the past buckets' keys, the head of its record up to the
    amounts, and its caps argument."""

    scopes: Sequence[ScopeCaps] | None
    keys: tuple[str, ...]
    record_head: str
    caps: str
    names: tuple[str, ...]  # the scopes' names, a Reservation's ``scopes``


_NO_SCOPED = _Scoped(None, (), "", "", ())
# made from fields known valid, without __init__'s checks and twin switch
_new_later = fields_maker(_Later)
_new_reservation = fields_maker(Reservation)
_new_settlement = fields_maker(Settlement)


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


class _Wire:
    """How the sync ledger sends a script on one Redis: one EVALSHA written to a
    connection it keeps between calls, its reply read back (redis-py's per-command
    machinery, a pool checkout and release plus retry and observability wrappers,
    cost more client CPU than the write and the read; see docs/redis-ledger.md).

    Connections still come from the client's bounded blocking pool, so
    ``max_connections`` and ``pool_timeout`` hold: one is kept for reuse only while
    the pool has another free slot; otherwise it goes back to the pool, where a
    thread waiting for one (or ``totals``, which uses the pool) gets it.
    ``NOSCRIPT`` loads the script and sends it again (it did not run); any other
    error drops the connection."""

    def __init__(self, pool: Any, spin_us: float = 0.0) -> None:
        self.pool = pool
        self.idle: list[Any] = []
        self.spin_ns = int(spin_us * 1000) if _CAN_POLL else 0
        self.skip = 0  # replies to wait for without a spin (after a spin found none)
        self.backoff = 0  # what `skip` was last set to; 0 after a spin found its reply
        # the connections of this wire's calls between their send and their reply (set
        # add and discard are atomic): a call spins only when it is alone there
        self.waiting: set[Any] = set()
        # the command is packed here (redis-py's packer encodes and checks each argument
        # alone: several times the cost) when its text is ASCII, which reads the same in
        # the connections' encoding; otherwise redis-py packs it
        encoding = pool.connection_kwargs.get("encoding", "utf-8")
        self.packs = codecs.lookup(encoding).name in ("utf-8", "ascii", "iso8859-1")

    def call(self, script: Any, keys: list[str], args: list[str]) -> Reply:
        try:
            conn = self.idle.pop()
        except IndexError:
            conn = self.pool.get_connection()  # waits up to pool_timeout, or raises
        else:
            try:  # as the pool checks: a socket the server closed meanwhile is readable
                if self._readable(conn):
                    conn.disconnect()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                    OSError, ValueError):
                conn.disconnect()
        waiting = self.waiting
        waiting.add(conn)
        try:
            if getattr(conn, "_sock", None) is None:  # new, or after close() or an error
                conn.connect()
            packed = self._pack(conn, script.sha, keys, args)
            try:
                conn.send_packed_command(packed)
                skip = self.skip  # read once: threads race here (a lost count is harmless)
                if skip > 0:
                    self.skip = skip - 1
                elif self.spin_ns and len(waiting) == 1:
                    self._spin(conn)
                return conn.read_response()
            except redis.exceptions.NoScriptError:
                conn.send_command("SCRIPT", "LOAD", script.script)
                conn.read_response()
                conn.send_packed_command(packed)
                return conn.read_response()
        except redis.exceptions.ResponseError:
            raise  # an error reply: the connection is still in step
        except BaseException:
            conn.disconnect()
            raise
        finally:
            waiting.discard(conn)
            if self.pool.pool.empty():
                self.pool.release(conn)
            else:
                self.idle.append(conn)

    @staticmethod
    def _poll(conn: Any) -> Any:
        """A poll object on ``conn``'s socket (kept on the connection while its socket
        lives), or None (not connected, or no ``select.poll`` here)."""
        sock = getattr(conn, "_sock", None)
        if sock is None or not _CAN_POLL:
            return None
        kept = getattr(conn, "_agent_guard_poll", None)
        if kept is None or kept[0] is not sock:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            kept = conn._agent_guard_poll = (sock, poller)
        return kept[1]

    def _readable(self, conn: Any) -> bool:
        """Whether a kept connection has bytes (or an end of stream) waiting: a reply
        nobody asked for, or a server that closed it. One ``poll`` with no wait, instead
        of redis-py's ``can_read`` (a read attempt between two timeout changes)."""
        poller = self._poll(conn)
        if poller is None:
            return bool(conn.can_read())
        return bool(poller.poll(0))

    def _spin(self, conn: Any) -> None:
        """Wait for the reply by polling, up to ``spin_ns``, before the blocking read.

        A thread that blocks gives its core away: on the machines measured the wake-up
        adds tens of microseconds to a loopback round trip, and the guard's own work
        after it runs on cold caches (docs/redis-ledger.md, "Waiting for a reply").
        Polling costs CPU while the reply is on its way, most of it while the server runs
        the script (bench_redis: 41-82 us less wall time, 6-63 us more CPU per guarded
        call).
        When a spin ends with no reply (a remote or busy
        server), the next 2 replies are waited for blocking, twice as many after each
        further spin in vain, up to SPIN_BACKOFF; a spin that finds its reply resets
        that (a host that stalls now and then costs a few replies each time; a server
        always slower than the spin, one spin in SPIN_BACKOFF replies).

        Only a call alone on the wire spins: while another thread of this ledger waits
        for its reply, a spinning thread takes the core (and, between its polls, the
        GIL) that thread needs when its reply comes; with 32 threads on two cores,
        spinning cost about a third of the pairs per second (benchmarks/bench_load.py
        ``--reply-spin-us``)."""
        poller = self._poll(conn)
        if poller is None:
            return
        end = time.perf_counter_ns() + self.spin_ns
        while not poller.poll(0):
            if time.perf_counter_ns() > end:
                self.backoff = min(max(SPIN_FIRST_BACKOFF, 2 * self.backoff), SPIN_BACKOFF)
                self.skip = self.backoff
                return
        self.backoff = 0

    def _pack(self, conn: Any, sha: str, keys: list[str], args: list[str]) -> list[bytes]:
        """``EVALSHA sha len(keys) *keys *args`` in the Redis protocol, for ``conn``."""
        items = [str(len(keys)), *keys, *args]
        text = "".join([f"${len(item)}\r\n{item}\r\n" for item in items])
        if self.packs and text.isascii():  # one byte per character: the lengths hold
            head = f"*{len(items) + 2}\r\n$7\r\nEVALSHA\r\n${len(sha)}\r\n{sha}\r\n"
            return [(head + text).encode()]
        return list(conn.pack_command("EVALSHA", sha, *items))


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

    ``settle_delay`` (seconds, ``?settle_delay=`` in the URL; default 0.05): how long a
    :meth:`settle_later` may wait for a script to ride with before a background thread
    flushes it; 0 turns deferral off (``settle_later`` settles at once).

    ``reply_spin_us`` (``?reply_spin_us=`` in the URL; default 200 where the process may
    run on two or more CPUs, else 0): how long the sync client polls for a script's
    reply before it blocks for it; 0 always blocks. See docs/redis-ledger.md.
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
        settle_delay: float | None = None,
        reply_spin_us: float | None = None,
        **client_options: Any,
    ) -> None:
        spin = default_reply_spin_us() if reply_spin_us is None else reply_spin_us
        if isinstance(spin, bool) or not isinstance(spin, int | float) or not (
                0 <= spin <= 100_000):
            raise ValueError(f"reply_spin_us must be a number of microseconds in "
                             f"[0, 100000], got {reply_spin_us!r}")
        delay = SETTLE_DELAY_SECONDS if settle_delay is None else settle_delay
        if isinstance(delay, bool) or not isinstance(delay, int | float) or not (
                0 <= delay < 60):
            raise ValueError(f"settle_delay must be a number of seconds in [0, 60), "
                             f"got {settle_delay!r}")
        self.settle_delay = float(delay)
        self.defers_settles = self.settle_delay > 0
        # settles waiting for a script to ride with (settle_later); _idle guards them and
        # counts the settles on their way (_inflight), so a read can wait for them
        self._pending: list[_Later] = []
        self._pending_since = 0.0  # monotonic time the oldest queued settle was queued
        self._inflight = 0
        self._idle = threading.Condition(threading.Lock())

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
        # a client built here sends each script once (redis-py's retries off); one given
        # may resend after a timeout, so every reserve then checks its id (_carrying)
        self._sends_once = client is None and retries == 0
        if client is None:
            try:  # a cluster client learns the slot map here: it needs a node to answer
                client = redis_client(url, **self._client_args)
            except _FAILURES as exc:
                raise LedgerUnavailable(self.url, exc) from exc
        self.client: redis.Redis = client
        self._sync = _Scripts.on(self.client)
        pool = getattr(client, "connection_pool", None)
        self._wire = _Wire(pool, float(spin)) if (
            retries == 0 and type(client) is redis.Redis
            and isinstance(pool, redis.BlockingConnectionPool)) else None
        self._async_by_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, _Scripts] = weakref.WeakKeyDictionary()
        self._async_closers: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self.prefix = f"ag:{{{quote(namespace, safe='')}}}:"
        self._open = self.prefix + "open"
        self._leases = self.prefix + "leases"
        self._scope_keys: dict[str, str] = {}
        self._last_scoped = _NO_SCOPED
        _LEDGERS.add(self)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisLedger:
        """``namespace`` and ``scope_ttl_seconds`` may come in the URL's query (as for
        the usage store's URL), beside redis-py's options; keyword options win; any
        other option raises (see :mod:`agent_guard.stores`). ``cells=N`` (N >= 1)
        builds a :class:`~agent_guard.ledger.redis_cells.CellsRedisLedger`."""
        from ..stores import parse_url

        parsed = parse_url(url, "ledger")
        if parsed.backend not in REDIS_BACKENDS:
            raise ValueError(f"not a Redis URL: {parsed.redacted!r}")
        merged = {**parsed.kind_options, **options}
        cells = merged.pop("cells", None)
        if cells:  # a namespace spread over hash tags (docs/redis-cluster.md)
            from .redis_cells import CellsRedisLedger

            return CellsRedisLedger(parsed.client_url, cells=cells, **merged)
        return cls(parsed.client_url, **merged)

    # -- keys and arguments --------------------------------------------------------------

    def scope_key(self, scope: str) -> str:
        """The HASH of ``scope``'s counters (injective in ``scope``)."""
        key = self._scope_keys.get(scope)
        if key is None:
            key = self.prefix + "s:" + quote(scope, safe="", errors="surrogatepass")
            if len(self._scope_keys) >= 4096:
                self._scope_keys.clear()
            self._scope_keys[scope] = key
        return key

    def _done_key(self, rid: str) -> str:
        return self.prefix + "done:" + rid

    def _now(self) -> str:
        return "" if self._clock is None else repr(float(self._clock()))

    def _caps(self, scopes: Sequence[ScopeCaps], keys: list[str]) -> str:
        """The caps argument of a check; past buckets of rolling windows are appended
        to ``keys`` and named by their (1-based) index."""
        out: list[Any] = []
        for sc in scopes:
            pairs = _cap_pairs(sc)
            if sc.history:
                first = len(keys) + 1
                keys.extend(self.scope_key(past) for past in sc.history)
                out.append({"c": pairs, "h": list(range(first, len(keys) + 1))})
            else:
                out.append(pairs)
        return _json(out)

    def _scoped(self, scopes: Sequence[ScopeCaps]) -> _Scoped:
        """What a reserve on ``scopes`` sends that depends on them alone, kept for the
        last ``scopes`` tuple (a guard passes the same tuple of frozen ScopeCaps on every
        call while its window periods last, see engine.plan.Resolved): building it was
        a fifth of the client's work of a reserve. A list is read each time (it may
        change between calls)."""
        kept = self._last_scoped  # read once: another thread may replace it
        if kept.scopes is scopes:
            return kept
        scope_keys = [self.scope_key(sc.scope) for sc in scopes]
        keys = [self._open, self._leases, "", *scope_keys]  # (done:<id> comes per call)
        caps = self._caps(scopes, keys)
        kept = _Scoped(scopes if type(scopes) is tuple else None, tuple(keys[3:]),
                       _record_head(scope_keys), caps, tuple([sc.scope for sc in scopes]))
        self._last_scoped = kept
        return kept

    def _reserve_call(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int],
                      lease_seconds: float, rid: str) -> tuple[list[str], list[str]]:
        scoped = self._scoped(scopes)
        token = _token()
        return [self._open, self._leases, self._done_key(rid), *scoped.keys], [
            self._now(), repr(float(lease_seconds)), rid, token,
            _record(scoped.record_head, amounts, token), scoped.caps, self._ttl]

    def _charge_call(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int],
                     read: bool = False) -> tuple[list[str], list[str]]:
        """``read``: name the charged dimensions, so the script returns their new
        totals (a plain charge skips those reads)."""
        keys = [self._open, self._leases, *(self.scope_key(sc.scope) for sc in scopes)]
        spend = {d: str(v) for d, v in amounts.items() if v}
        return keys, [self._now(), self._caps(scopes, keys), _json(spend),
                      self._ttl, "", "", *(spend if read else ())]

    @staticmethod
    def _charged(reply: Reply, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
                 ) -> Denial | Settlement:
        if int(reply[0]) == 0:
            return _denial(reply, scopes)
        dims = [d for d, v in amounts.items() if v]
        values = iter(reply[1:])
        return Settlement(True, {sc.scope: {dim: int(next(values)) for dim in dims}
                                 for sc in scopes})

    def _release_call(self, reservation: Reservation) -> tuple[list[str], list[str]]:
        rid = reservation.id
        return ([self._open, self._leases, self._done_key(rid)],
                [rid, _token(), self._done_retention, self._ttl])

    def _batch(self, items: Sequence[_Later], keys: list[str]) -> str:
        """The settle batch JSON of ``items`` (see ``ag_settle``); their keys are named by
        their index in ``keys``, appended when not there yet."""
        index = {key: i for i, key in enumerate(keys, 1)}  # a key already sent: by index

        def at(key: str) -> int:
            found = index.get(key)
            if found is None:
                keys.append(key)
                found = index[key] = len(keys)
            return found

        pairs = _PAIRS
        out = []  # each item's _json([id, token, done, [scopes], [dim, "n", ...], reads])
        for item in items:
            r = item.reservation
            # (a zero adds nothing: the script skips it, so it is not sent)
            flat = ",".join([(pairs.get(dim) or _pair(dim)) + str(amount) + '"'
                             for dim, amount in item.actual.items() if amount])
            reads = _reads(item.reads)
            done = at(self._done_key(r.id))
            scopes = ",".join([str(at(self.scope_key(scope))) for scope in r.scopes])
            rid = f'"{r.id}"' if r.id.isascii() and r.id.isalnum() else _json(r.id)
            out.append(f'[{rid},"{item.token}",{done},[{scopes}],[{flat}],[{reads}]]')
        return "[" + ",".join(out) + "]"

    def _carrying(self, items: Sequence[_Later], keys: list[str], args: list[str], *,
                  fresh: bool) -> None:
        """A reserve's last arguments: the settles riding along (if any), and whether its
        id is fresh. An id this ledger made (unique by construction) on a client that
        never resends a script (built here, ``retries=0``) cannot be in use: the script
        then skips its two reads that answer a resent or reused id."""
        fresh = fresh and self._sends_once
        if items:
            args += (self._done_retention, self._batch(items, keys))
        elif fresh:
            args += ("", "")
        if fresh:
            args.append("1")

    def _settle_call(self, items: Sequence[_Later]) -> tuple[list[str], list[str]]:
        keys = [self._open, self._leases]
        return keys, [self._ttl, self._done_retention, self._batch(items, keys)]

    def _later(self, reservation: Reservation, actual: Mapping[str, int],
               reads: Mapping[str, Sequence[str]] | None,
               then: Callable[[Settlement], Any] | None) -> _Later:
        _check(actual)
        if reads is None:  # the contract's settle: every settled dimension of every scope
            per_scope = (tuple(actual),) * len(reservation.scopes)
        else:
            per_scope = tuple([tuple(reads.get(scope, ())) for scope in reservation.scopes])
        return _new_later(reservation, actual, per_scope, then, _token())

    def _renew_call(self, reservation: Reservation, lease_seconds: float
                    ) -> tuple[list[str], list[str]]:
        return [self._open, self._leases], [self._now(), repr(float(lease_seconds)),
                                            reservation.id]

    def _reclaim_call(self) -> tuple[list[str], list[str]]:
        return [self._open, self._leases], [self._now(), str(RECLAIM_BATCH), self._ttl]

    # -- replies ------------------------------------------------------------------------------

    def _reserved(self, reply: Reply, scopes: Sequence[ScopeCaps],
                  amounts: Mapping[str, int], rid: str) -> Reservation | Denial:
        status = reply[0]
        if status != "1" and status != b"1":  # (a success, as the scripts' two replies say it)
            status = int(status)
            if status == -1:
                raise ValueError(f"reservation id {rid!r} was already used")
            if status == 0:
                return _denial(reply, scopes)
        kept = self._last_scoped
        names = kept.names if kept.scopes is scopes else tuple([sc.scope for sc in scopes])
        return _new_reservation(rid, names, dict(amounts), float(reply[1]))

    @staticmethod
    def _settled(reply: Reply, item: _Later) -> Settlement:
        """A settle's reply: 0 (it counted nothing), or 1 and the spent totals of
        ``item.reads`` in order (an error if the count does not match)."""
        if not isinstance(reply, list):
            return Settlement(False)
        scopes, reads = item.reservation.scopes, item.reads
        if len(scopes) != len(reads) or len(reply) != 1 + sum(map(len, reads)):
            raise ValueError(f"a settle's reply does not match its reads: {reply!r}")
        if len(scopes) == 1:  # the common case, its dict built in C
            return _new_settlement(True, {scopes[0]: dict(zip(
                reads[0], map(int, reply[1:]), strict=True))})
        spent, at = {}, 1
        for scope, dims in zip(scopes, reads, strict=True):
            spent[scope] = dict(zip(dims, map(int, reply[at:at + len(dims)]), strict=True))
            at += len(dims)
        return _new_settlement(True, spent)

    def _unavailable(self, exc: BaseException) -> LedgerUnavailable:
        if isinstance(exc, redis.exceptions.MovedError | redis.exceptions.AskError):
            return LedgerUnavailable(self.url, exc, hint=(
                "This server is a Redis Cluster node: a redis:// client reaches only the "
                "slots it owns. Name the cluster with a "
                "redis+cluster://host:port[,host:port...] URL."))
        return LedgerUnavailable(self.url, exc)

    def _run(self, script: Any, keys: list[str], args: list[str]) -> Reply:
        try:
            if self._wire is not None:
                return self._wire.call(script, keys, args)
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
        items = self._take()
        self._carrying(items, keys, args, fresh=not reservation_id)
        reply = self._carry(items, self._sync.reserve, keys, args)
        return self._reserved(reply, scopes, amounts, rid)

    def settle(self, reservation: Reservation, actual: Mapping[str, int]) -> Settlement:
        item = self._later(reservation, actual, None, None)
        keys, args = self._settle_call([item])
        return self._settled(self._run(self._sync.settle, keys, args)[0], item)

    def settle_later(self, reservation: Reservation, actual: Mapping[str, int], *,
                     reads: Mapping[str, Sequence[str]] | None = None,
                     then: Callable[[Settlement], Any] | None = None) -> None:
        """Queue a settle to ride with this ledger's next reserve or charge script (or a
        flush within ``settle_delay`` seconds). The hold keeps counting until it lands.
        ``reads``: the dimensions of each scope to read back (default: every settled
        one); ``then`` gets the :class:`Settlement` when it lands, in whichever thread
        lands it (a callback that raises is logged). A ledger with ``settle_delay=0``
        settles at once (and raises ``LedgerUnavailable`` as ``settle`` does)."""
        item = self._later(reservation, actual, reads, then)
        if not self.defers_settles:
            keys, args = self._settle_call([item])
            self._landed([item], self._run(self._sync.settle, keys, args))
            return
        with self._idle:
            self._pending.append(item)
            queued = len(self._pending)
            if queued == 1:
                self._pending_since = time.monotonic()
                _QUEUED.add(self)  # kept alive until its settles land
        if queued == 1:
            _FLUSHER.schedule(self, self._pending_since + self.settle_delay)
        elif queued >= SETTLE_BATCH:
            _FLUSHER.schedule(self, 0.0)

    def _flush_due(self) -> None:
        """The flusher's call: flush when the oldest queued settle has waited
        ``settle_delay`` (a reserve may have carried the ones it was woken for)."""
        if not self._pending:
            return
        due = self._pending_since + self.settle_delay
        if len(self._pending) < SETTLE_BATCH and time.monotonic() < due:
            _FLUSHER.schedule(self, due)
            return
        self.flush()

    def release(self, reservation: Reservation) -> bool:
        keys, args = self._release_call(reservation)
        return int(self._run(self._sync.release, keys, args)) == 1

    def renew(self, reservation: Reservation, lease_seconds: float) -> Reservation | None:
        reply = self._run(self._sync.renew, *self._renew_call(reservation, lease_seconds))
        return None if reply is None else replace(reservation, expires_at=float(reply))

    def charge(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]) -> Denial | None:
        _check(amounts)
        reply = self._charge_run(*self._charge_call(scopes, amounts))
        return _denial(reply, scopes) if int(reply[0]) == 0 else None

    def charge_read(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
                    ) -> Denial | Settlement:
        _check(amounts)
        reply = self._charge_run(*self._charge_call(scopes, amounts, read=True))
        return self._charged(reply, scopes, amounts)

    def _charge_run(self, keys: list[str], args: list[str]) -> Reply:
        items = self._take()
        if items:
            args[4:6] = (self._done_retention, self._batch(items, keys))
        return self._carry(items, self._sync.charge, keys, args)

    # -- deferred settles ---------------------------------------------------------------

    @property
    def pending_settles(self) -> int:
        """Settles queued by :meth:`settle_later` that have not landed yet."""
        return len(self._pending) + self._inflight

    def _take(self) -> list[_Later]:
        """Up to SETTLE_BATCH queued settles, now on their way (``_landed`` ends that)."""
        if not self._pending:
            return []
        with self._idle:
            items = self._pending[:SETTLE_BATCH]
            del self._pending[:SETTLE_BATCH]
            self._inflight += len(items)
        return items

    def _landed(self, items: Sequence[_Later], replies: Reply | None) -> None:
        """A batch came back (``replies``) or failed (None: back to the queue's front, to
        ride again with the same tokens, so it counts once whatever ran)."""
        with self._idle:
            self._inflight -= len(items)
            if replies is None:
                if not self._pending:
                    self._pending_since = time.monotonic()
                self._pending[:0] = items
            elif not self._pending and not self._inflight:
                _QUEUED.discard(self)
            self._idle.notify_all()
        if replies is None:
            _FLUSHER.schedule(self, time.monotonic() + max(self.settle_delay, 1.0))
            return
        for item, reply in zip(items, replies, strict=True):
            if item.then is not None:
                try:
                    item.then(self._settled(reply, item))
                except Exception:
                    logger.exception("agent-guard: a settle callback failed")

    def _carry(self, items: Sequence[_Later], script: Any, keys: list[str], args: list[str]
               ) -> Reply:
        """Run ``script`` with ``items`` riding along; its own reply."""
        if not items:
            return self._run(script, keys, args)
        try:
            reply, replies = _with_settles(self._run(script, keys, args))
        except BaseException:
            self._landed(items, None)
            raise
        self._landed(items, replies)
        return reply

    async def _acarry(self, items: Sequence[_Later], script: Any, keys: list[str],
                      args: list[str]) -> Reply:
        if not items:
            return await self._arun(script, keys, args)
        try:
            reply, replies = _with_settles(await self._arun(script, keys, args))
        except BaseException:
            self._landed(items, None)
            raise
        self._landed(items, replies)
        return reply

    def flush(self) -> None:
        """Land every deferred settle now, and wait for those already on their way.
        Raises ``LedgerUnavailable`` (the settles stay queued) when Redis does not
        answer."""
        while items := self._take():
            keys, args = self._settle_call(items)
            try:
                replies = self._run(self._sync.settle, keys, args)
            except BaseException:
                self._landed(items, None)
                raise
            self._landed(items, replies)
        if self._inflight:
            self._wait_idle()

    async def aflush(self) -> None:
        while items := self._take():
            keys, args = self._settle_call(items)
            try:
                replies = await self._arun((await self._aready()).settle, keys, args)
            except BaseException:
                self._landed(items, None)
                raise
            self._landed(items, replies)
        if self._inflight:
            await asyncio.to_thread(self._wait_idle)

    def _wait_idle(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: not self._inflight, timeout=30.0)

    def _close_flush(self) -> None:
        try:
            self.flush()
        except LedgerUnavailable as exc:
            logger.error("agent-guard: closing %s with %d settled calls it never counted "
                         "(%s); their holds expire at lease end", self.url,
                         self.pending_settles, exc)

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
        if self._pending or self._inflight:
            self.flush()
        try:
            raw = self.client.hgetall(self.scope_key(scope))
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc
        return _totals(scope, raw)

    def totals_many(self, scopes: Sequence[str]) -> list[ScopeTotals]:
        if self._pending or self._inflight:
            self.flush()
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for scope in scopes:
                    pipe.hgetall(self.scope_key(scope))
                raws = pipe.execute()
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc
        return [_totals(scope, raw) for scope, raw in zip(scopes, raws, strict=True)]

    def reclaim_expired(self) -> int:
        if self._pending or self._inflight:
            self.flush()
        total = 0
        while True:
            examined, reclaimed = self._run(self._sync.reclaim, *self._reclaim_call())
            total += int(reclaimed)
            if int(examined) < RECLAIM_BATCH:
                return total

    def close(self) -> None:
        self._close_flush()
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
        scripts = await self._aready()
        items = self._take()
        self._carrying(items, keys, args, fresh=not reservation_id)
        reply = await self._acarry(items, scripts.reserve, keys, args)
        return self._reserved(reply, scopes, amounts, rid)

    async def asettle(self, reservation: Reservation, actual: Mapping[str, int]) -> Settlement:
        item = self._later(reservation, actual, None, None)
        keys, args = self._settle_call([item])
        reply = await self._arun((await self._aready()).settle, keys, args)
        return self._settled(reply[0], item)

    async def arelease(self, reservation: Reservation) -> bool:
        keys, args = self._release_call(reservation)
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
        reply = await self._acharge_run(*self._charge_call(scopes, amounts))
        return _denial(reply, scopes) if int(reply[0]) == 0 else None

    async def acharge_read(self, scopes: Sequence[ScopeCaps], amounts: Mapping[str, int]
                           ) -> Denial | Settlement:
        _check(amounts)
        reply = await self._acharge_run(*self._charge_call(scopes, amounts, read=True))
        return self._charged(reply, scopes, amounts)

    async def _acharge_run(self, keys: list[str], args: list[str]) -> Reply:
        scripts = await self._aready()
        items = self._take()
        if items:
            args[4:6] = (self._done_retention, self._batch(items, keys))
        return await self._acarry(items, scripts.charge, keys, args)

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
        if self._pending or self._inflight:
            await self.aflush()
        try:
            raw = await (await self._aready()).client.hgetall(self.scope_key(scope))
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc
        return _totals(scope, raw)

    async def atotals_many(self, scopes: Sequence[str]) -> list[ScopeTotals]:
        if self._pending or self._inflight:
            await self.aflush()
        try:
            async with (await self._aready()).client.pipeline(transaction=False) as pipe:
                for scope in scopes:
                    pipe.hgetall(self.scope_key(scope))
                raws = await pipe.execute()
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc
        return [_totals(scope, raw) for scope, raw in zip(scopes, raws, strict=True)]

    async def aclose(self) -> None:
        with contextlib.suppress(LedgerUnavailable):  # close() below retries and logs
            await self.aflush()
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


def _with_settles(raw: Reply) -> tuple[Reply, Reply]:
    """A script's own reply and its settles' replies (``ag_with_settles``): the table
    ``{reply, settled}``, or a success as the string ``"1 v ...|s|s..."``, each ``s``
    ``0`` or ``"1 spent ..."``, read here into the lists the table would hold."""
    if isinstance(raw, list):
        return raw[0], raw[1]
    own, *settles = _text(raw).split("|")
    return own.split(), [0 if s == "0" else s.split() for s in settles]


def _totals(scope: str, raw: Mapping[bytes | str, bytes | str]) -> ScopeTotals:
    counters: dict[str, dict[str, int]] = {"s": {}, "r": {}, "x": {}}
    for key, value in raw.items():
        kind, _, dim = _text(key).partition(":")
        if kind in counters:
            counters[kind][dim] = int(value)
    return ScopeTotals(scope, counters["s"], counters["r"], counters["x"])


# -- deferred settles: one background thread per process, and a last flush at exit ----------

#: every RedisLedger of this process (a fork's reset walks them)
_LEDGERS: weakref.WeakSet[RedisLedger] = weakref.WeakSet()
#: the ledgers with queued settles, held so that dropping a ledger loses none of them
_QUEUED: set[RedisLedger] = set()


class _Flusher:
    """One daemon thread per process lands the deferred settles of every ledger whose
    ``settle_delay`` has passed without a script to ride with (and retries, every
    second, a flush that found Redis unavailable)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._due: dict[int, tuple[float, weakref.ref[RedisLedger]]] = {}
        self._wake = 0.0  # when the thread wakes next (inf: waits for a notify)
        self._pid = 0

    def schedule(self, ledger: RedisLedger, at: float) -> None:
        with self._cond:
            if self._pid != os.getpid():  # first use in this process (or a fork's child)
                self._pid = os.getpid()
                threading.Thread(target=self._loop, name="agent-guard-settles",
                                 daemon=True).start()
                _flush_at_process_exit()
            due = self._due.get(id(ledger))
            if due is None or at < due[0] or due[1]() is not ledger:
                self._due[id(ledger)] = (at, weakref.ref(ledger))
                if at < self._wake:  # else the thread wakes in time anyway: no switch
                    self._wake = at
                    self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                ready = [key for key, (at, _) in self._due.items() if at <= now]
                if not ready:
                    self._wake = min((at for at, _ in self._due.values()),
                                     default=math.inf)
                    self._cond.wait(None if self._wake == math.inf else self._wake - now)
                    continue
                refs = [self._due.pop(key)[1] for key in ready]
            for ref in refs:
                ledger = ref()
                if ledger is not None:
                    try:
                        ledger._flush_due()
                    except Exception as exc:  # queued again by _landed, retried in 1 s
                        logger.warning("agent-guard: %d deferred settles wait for %s (%s)",
                                       ledger.pending_settles, ledger.url, exc)

    def after_fork(self) -> None:
        """In a fork's child: the parent's thread and queue are the parent's (its settles
        land from the parent; sent from here too, they would still count once)."""
        self._cond = threading.Condition(threading.Lock())
        self._due = {}
        self._wake = 0.0
        self._pid = 0
        _QUEUED.clear()
        for ledger in list(_LEDGERS):
            if ledger._wire is not None:  # the parent's sockets (the pool resets itself)
                ledger._wire.idle = []  # and calls (of threads that do not run here)
                ledger._wire.waiting = set()
            ledger._pending = []
            ledger._inflight = 0
            ledger._idle = threading.Condition(threading.Lock())


_FLUSHER = _Flusher()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_FLUSHER.after_fork)


def _flush_all() -> None:
    for ledger in list(_QUEUED):
        if ledger.pending_settles:
            ledger._close_flush()


_exit_hooked = 0  # the pid that registered the exit flush


def _flush_at_process_exit() -> None:
    """Land what is still queued when the process exits: ``atexit`` for a normal exit,
    and multiprocessing's finalizers, which a ``Process`` child runs instead (once per
    process: a multiprocessing child starts with its parent's finalizers cleared)."""
    global _exit_hooked
    if _exit_hooked == os.getpid():
        return
    _exit_hooked = os.getpid()
    atexit.register(_flush_all)
    from multiprocessing import util

    util.Finalize(None, _flush_all, exitpriority=100)
