"""Key-value stores with TTL for the caches, chosen by URL like the ledgers.

Values are text written by the caches (:mod:`.serde`); nothing read back is ever
unpickled, and what a store returns is checked by the cache that reads it
(:mod:`.safety`): another writer may have put anything there. ``memory://`` is
bounded (LRU eviction, ``?max_entries=``); ``sqlite:///path.db`` (``?timeout=``)
and ``redis://`` expire entries by TTL. URLs follow :mod:`agent_guard.stores`:
``?namespace=`` names the cache; an unknown option raises.

A store raises what its backend raises; the caches turn that into a miss. The Redis
store's client comes from :func:`agent_guard.stores.redis_client` with the cache
profile (short timeouts, a bounded pool, no retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from ..stores import open_store
from ..stores.redis import CACHE, REDIS_ERRORS, redis_client
from ..stores.sqlite import SQLitePool
from ..stores.url import redact_url

__all__ = ["KVStore", "MemoryStore", "RedisStore", "SQLiteStore", "store_from_url"]


class KVStore(ABC):
    """Text values under string keys, with an optional TTL in seconds.

    ``get`` returns what is stored: text, or whatever another writer left (bytes
    that are not UTF-8...); the caches check it. ``namespace`` is the cache
    namespace a URL named (``?namespace=``), else None."""

    namespace: str | None = None

    @abstractmethod
    def get(self, key: str) -> Any: ...

    @abstractmethod
    def set(self, key: str, value: str, ttl: float | None = None) -> None: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with ``prefix``; return how many."""

    def scan(self, prefix: str) -> list[tuple[str, str]]:
        """Every (key, value) under ``prefix`` (for the semantic index)."""
        raise NotImplementedError

    async def aget(self, key: str) -> str | None:
        return await asyncio.to_thread(self.get, key)

    async def aset(self, key: str, value: str, ttl: float | None = None) -> None:
        await asyncio.to_thread(self.set, key, value, ttl)

    async def adelete_prefix(self, prefix: str) -> int:
        return await asyncio.to_thread(self.delete_prefix, prefix)

    def close(self) -> None:  # noqa: B027 - optional
        pass


class MemoryStore(KVStore):
    """An LRU dict with per-entry expiry; safe across threads."""

    def __init__(self, max_entries: int = 10_000, *, clock: Callable[[], float] = time.time
                 ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[str, tuple[str, float | None]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            value, expires = item
            if expires is not None and expires <= self._clock():
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return value

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        expires = None if ttl is None else self._clock() + ttl
        with self._lock:
            self._data[key] = (value, expires)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def delete_prefix(self, prefix: str) -> int:
        with self._lock:
            doomed = [k for k in self._data if k.startswith(prefix)]
            for k in doomed:
                del self._data[k]
            return len(doomed)

    def scan(self, prefix: str) -> list[tuple[str, str]]:
        now = self._clock()
        with self._lock:
            return [(k, v) for k, (v, exp) in self._data.items()
                    if k.startswith(prefix) and (exp is None or exp > now)]

    def __len__(self) -> int:
        return len(self._data)


class SQLiteStore(KVStore):
    """Table ``ag_cache`` of a SQLite file; ``timeout`` is the busy timeout in seconds
    (short: a cache that waits long for a lock is worse than a miss)."""

    def __init__(self, path: str, *, timeout: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self._clock = clock
        self._pool = SQLitePool(path, timeout=timeout)
        with self._pool.connection() as db:
            db.execute("CREATE TABLE IF NOT EXISTS ag_cache (key TEXT PRIMARY KEY, "
                       "value TEXT NOT NULL, expires_at REAL)")

    def _execute(self, sql: str, args: tuple[Any, ...]) -> tuple[list[Any], int]:
        """One autocommitted statement: (its rows, fetched before the connection goes
        back to the pool; the rows it changed)."""
        with self._pool.connection() as db:
            cur = db.execute(sql, args)
            return cur.fetchall(), cur.rowcount

    def close(self) -> None:
        self._pool.close()

    def get(self, key: str) -> Any:
        rows, _ = self._execute("SELECT value, expires_at FROM ag_cache WHERE key = ?", (key,))
        row = rows[0] if rows else None
        if row is None or (row[1] is not None and row[1] <= self._clock()):
            return None
        return row[0]

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        expires = None if ttl is None else self._clock() + ttl
        self._execute("INSERT OR REPLACE INTO ag_cache (key, value, expires_at) "
                      "VALUES (?, ?, ?)", (key, value, expires))

    def delete_prefix(self, prefix: str) -> int:
        _, changed = self._execute("DELETE FROM ag_cache WHERE substr(key, 1, ?) = ?",
                                   (len(prefix), prefix))
        return changed

    def scan(self, prefix: str) -> list[tuple[str, str]]:
        rows, _ = self._execute(
            "SELECT key, value FROM ag_cache WHERE substr(key, 1, ?) = ? AND "
            "(expires_at IS NULL OR expires_at > ?)", (len(prefix), prefix, self._clock()))
        return [(str(k), v) for k, v in rows]


class RedisStore(KVStore):
    """Keys live under ``agc:{namespace}:``; Redis expires them (``SET ... PX``).

    ``options`` go to :func:`agent_guard.stores.redis_client` (``socket_timeout``,
    ``max_connections``...); ``client`` uses a client you built instead.

    On a Redis Cluster (``redis+cluster://``) the namespace's braces become ``<>`` in
    the stored key (``agc:<namespace>:...``; the namespace is percent-encoded, so it
    holds neither), so each key has a slot of its own and a namespace's entries spread
    over every node; the multi-key reads and deletes of :meth:`scan` and
    :meth:`delete_prefix` are split by slot (redis-py's ``mget_nonatomic`` and
    ``delete``)."""

    def __init__(self, url: str, *, client: Any = None, **options: Any) -> None:
        self.url = redact_url(url)
        self._raw_url, self._options = url, options
        self._client = client
        self._cluster = url.split("://", 1)[0].lower().endswith("+cluster") or \
            _is_cluster(client)
        if client is None:
            # a cluster client reaches a node when built: with none answering, the
            # store is built anyway and every use is a miss until one answers
            with contextlib.suppress(*REDIS_ERRORS):
                self._client = redis_client(url, profile=CACHE, **options)

    @property
    def client(self) -> Any:
        if self._client is None:  # raises REDIS_ERRORS while no node answers: a miss
            self._client = redis_client(self._raw_url, profile=CACHE, **self._options)
        return self._client

    def _key(self, key: str) -> str:
        return key.replace("{", "<", 1).replace("}", ">", 1) if self._cluster else key

    def _unkey(self, key: str) -> str:
        return key.replace("<", "{", 1).replace(">", "}", 1) if self._cluster else key

    def get(self, key: str) -> Any:
        return _text(self.client.get(self._key(key)))

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        if ttl is None:
            self.client.set(self._key(key), value)
        else:
            self.client.set(self._key(key), value, px=max(1, int(ttl * 1000)))

    def _keys(self, prefix: str) -> list[Any]:
        return list(self.client.scan_iter(match=_glob_escape(self._key(prefix)) + "*",
                                          count=1000))

    def delete_prefix(self, prefix: str) -> int:
        keys = self._keys(prefix)
        return int(self.client.delete(*keys)) if keys else 0

    def scan(self, prefix: str) -> list[tuple[str, Any]]:
        keys = self._keys(prefix)
        if not keys:
            return []
        values = self.client.mget_nonatomic(keys) if self._cluster else self.client.mget(keys)
        return [(self._unkey(k.decode()), _text(v)) for k, v in zip(keys, values, strict=True)
                if v is not None]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _text(value: Any) -> Any:
    """UTF-8 text as ``str``; other bytes as they are (the cache refuses them)."""
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return value
    return value


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _is_cluster(client: Any) -> bool:
    try:
        from redis.cluster import RedisCluster
    except ImportError:  # pragma: no cover - redis is an optional extra
        return False
    return isinstance(client, RedisCluster)


def store_from_url(url: str | KVStore, **options: Any) -> KVStore:
    """``memory://`` (``?max_entries=N``), ``sqlite:///path.db`` (``?timeout=S``),
    ``redis://host/db`` (redis-py's options); ``?namespace=`` on each. Keyword options
    win over the URL's; an unknown option raises naming the known ones."""
    if isinstance(url, KVStore):
        return url
    store: KVStore = open_store(url, "cache", **options)
    return store


def key_part(text: str) -> str:
    """Encode a user-controlled name so it cannot collide or escape its key segment."""
    return quote(str(text), safe="")
