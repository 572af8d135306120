"""The built-in schemes of each kind of store, and the options each kind reads.

Factories import their store lazily, so parsing a URL never imports a backend the
program does not use (and ``redis`` stays an optional extra).

=======  ========================================  ==========================================
kind     memory://                                 sqlite:///path.db   |   redis://
=======  ========================================  ==========================================
ledger   ``max_idle_seconds``, ``max_scopes``      ``timeout``  |  ``namespace``,
                                                   ``scope_ttl_seconds``, ``settle_delay``,
                                                   ``reply_spin_us``, ``cells``
cache    ``max_entries``, ``namespace``            ``timeout``, ``namespace``  |  ``namespace``
usage    ``retention_days``                        ``timeout``, ``retention_days``  |
                                                   ``namespace``, ``retention_days``,
                                                   ``max_records``
=======  ========================================  ==========================================

``timeout`` (SQLite) and redis-py's URL options (Redis) are the backend's own and
read the same way by every kind.
"""

from __future__ import annotations

from typing import Any

from .url import ALL_REDIS_SCHEMES, StoreURL, as_float, as_int, as_str, register

__all__: list[str] = []


# -- ledgers ------------------------------------------------------------------------------------


def _memory_ledger(url: StoreURL, **options: Any) -> Any:
    from ..ledger.memory import MemoryLedger

    return MemoryLedger(url.url, **options)


def _sqlite_ledger(url: StoreURL, **options: Any) -> Any:
    from ..ledger.sqlite import SQLiteLedger

    if "timeout" in url.options:
        options.setdefault("busy_timeout_s", url.options["timeout"])
    assert url.path is not None
    return SQLiteLedger(url.path, **options)


def _redis_ledger(url: StoreURL, cells: int | None = None, **options: Any) -> Any:
    if cells:  # a namespace spread over hash tags (docs/redis-cluster.md)
        from ..ledger.redis_cells import CellsRedisLedger

        return CellsRedisLedger(url.client_url, cells=cells, **options)
    from ..ledger.redis import RedisLedger

    return RedisLedger(url.client_url, **options)


register("ledger", "memory", _memory_ledger,
         options={"max_idle_seconds": as_float, "max_scopes": as_int})
register("ledger", "sqlite", _sqlite_ledger, options={})
for _scheme in ALL_REDIS_SCHEMES:
    register("ledger", _scheme, _redis_ledger,
             options={"namespace": as_str, "scope_ttl_seconds": as_int,
                      "settle_delay": as_float, "reply_spin_us": as_float,
                      "cells": as_int})


# -- cache stores -----------------------------------------------------------------------------
# ``namespace`` is the cache's (ResultCache / LLMCache), kept on the store for them.


def _memory_cache(url: StoreURL, namespace: str | None = None, **options: Any) -> Any:
    from ..cache.store import MemoryStore

    store = MemoryStore(**options)
    store.namespace = namespace
    return store


def _sqlite_cache(url: StoreURL, namespace: str | None = None, **options: Any) -> Any:
    from ..cache.store import SQLiteStore

    if "timeout" in url.options:
        options.setdefault("timeout", url.options["timeout"])
    assert url.path is not None
    store = SQLiteStore(url.path, **options)
    store.namespace = namespace
    return store


def _redis_cache(url: StoreURL, namespace: str | None = None, **options: Any) -> Any:
    from ..cache.store import RedisStore

    store = RedisStore(url.client_url, **options)
    store.namespace = namespace
    return store


register("cache", "memory", _memory_cache,
         options={"max_entries": as_int, "namespace": as_str})
register("cache", "sqlite", _sqlite_cache, options={"namespace": as_str})
for _scheme in ALL_REDIS_SCHEMES:
    register("cache", _scheme, _redis_cache, options={"namespace": as_str})


# -- usage stores -------------------------------------------------------------------------------


def _memory_usage(url: StoreURL, **options: Any) -> Any:
    from ..finops.store import MemoryUsageStore

    return MemoryUsageStore(**options)


def _sqlite_usage(url: StoreURL, **options: Any) -> Any:
    from ..finops.store import SQLiteUsageStore

    if "timeout" in url.options:
        options.setdefault("busy_timeout_s", url.options["timeout"])
    assert url.path is not None
    return SQLiteUsageStore(url.path, **options)


def _redis_usage(url: StoreURL, **options: Any) -> Any:
    from ..finops.store import RedisUsageStore

    if options.get("namespace") is None:
        options["namespace"] = "default"
    return RedisUsageStore(url.client_url, **options)


register("usage", "memory", _memory_usage, options={"retention_days": as_float})
register("usage", "sqlite", _sqlite_usage, options={"retention_days": as_float})
for _scheme in ALL_REDIS_SCHEMES:
    register("usage", _scheme, _redis_usage,
             options={"retention_days": as_float, "namespace": as_str,
                      "max_records": as_int})
