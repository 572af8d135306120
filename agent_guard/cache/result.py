"""Caching of tool results: exact keys, TTL classes, isolated per tenant.

A key is the namespace, the tenant, the tool's name and version, and the
SHA-256 of the canonical JSON of its arguments. The tenant is read from the
call's config metadata (``tenant`` by default) and a tool's results are only
shared across tenants when the tool is declared ``public``. Tools with side
effects are never cached; errors are never cached; values are written with the
allow-list serializer (:mod:`.serde`), so reading one constructs nothing else.

A store that fails, or an entry that cannot be read back, is a miss (counted in
:meth:`ResultCache.stats`, logged once per cause; see :mod:`.safety`): the tool
runs, and the agent goes on.

TTL classes out of the box (:data:`DEFAULT_TTL`): ``factual`` 30 days, ``daily``
24 hours, ``realtime`` never cached; ``ttl=`` adds classes or replaces these.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from langchain_core.callbacks import BaseCallbackManager
from langchain_core.callbacks.manager import adispatch_custom_event, dispatch_custom_event
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import var_child_runnable_config
from langchain_core.tools import BaseTool, StructuredTool

from ..context import tenant_of
from ..engine.usage import nano_to_usd, usd_to_nano
from ..telemetry.langsmith import note_tool_run
from .safety import DEFAULT_RETRY_AFTER, CacheIO, Failure, check_settings
from .serde import DEFAULT_MAX_BYTES
from .store import KVStore, key_part, store_from_url

__all__ = ["CACHE_HIT_EVENT", "DEFAULT_TTL", "TTL", "CacheStats", "ResultCache", "cached_tool",
           "collecting_cache_hits"]

logger = logging.getLogger("agent_guard")
MISS: Any = object()
#: The LangChain custom event a ``cached_tool`` dispatches when it answers from the cache
#: (data: ``{"tool": name, "saved_nano": int}``); its run_id is the tool's run, so a
#: callback handler (GuardCallbackHandler's telemetry) can mark that tool span.
CACHE_HIT_EVENT = "agent_guard.cache_hit"
# what each cached_tool hit saved (nano-USD), for an adapter that sees no callbacks
_HITS: ContextVar[list[int] | None] = ContextVar("agent_guard_cache_hits", default=None)


@contextmanager
def collecting_cache_hits() -> Iterator[list[int]]:
    """Collect what every ``cached_tool`` answering from the cache inside this block
    saved (nano-USD, one entry per hit): ``GuardMiddleware`` records a tool call that
    ran this way as a cache hit, as the callback handler does from the hit's event."""
    sink: list[int] = []
    token = _HITS.set(sink)
    try:
        yield sink
    finally:
        _HITS.reset(token)


def _note_hit(saved: int) -> None:
    sink = _HITS.get()
    if sink is not None:
        sink.append(saved)


class TTL:
    """Readable TTLs in seconds: ``TTL.days(30)``, ``TTL.hours(24)``."""

    @staticmethod
    def seconds(n: float) -> float:
        return float(n)

    @staticmethod
    def minutes(n: float) -> float:
        return n * 60.0

    @staticmethod
    def hours(n: float) -> float:
        return n * 3600.0

    @staticmethod
    def days(n: float) -> float:
        return n * 86400.0


#: TTL classes every cache has unless ``ttl=`` replaces them (seconds; None: never cached).
DEFAULT_TTL: dict[str, float | None] = {
    "factual": TTL.days(30),  # reference data, documentation, definitions
    "daily": TTL.hours(24),  # prices, rankings, anything refreshed daily
    "realtime": None,  # quotes, stock, weather: never cached
}


@dataclass
class CacheStats:
    """``misses`` counts every lookup that was not a hit; of those, ``errors`` the
    ones whose store failed (or was being left alone after failing) and
    ``undecodable`` the ones whose entry was refused. ``unstorable``: results
    that could not be written (not on the serializer's allow-list, too large)."""

    hits: int = 0
    misses: int = 0
    saved_nano: int = 0
    errors: int = 0
    undecodable: int = 0
    unstorable: int = 0

    @property
    def saved_usd(self) -> Decimal:
        return nano_to_usd(self.saved_nano)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)


class ResultCache:
    """Tool and sub-task results, per namespace, tenant and TTL class.

    ``ttl`` maps class names to seconds (``None`` = never cached, e.g. for
    real-time data), on top of :data:`DEFAULT_TTL`. ``store`` is ``memory://``
    (LRU-bounded by ``max_entries``), ``sqlite:///cache.db`` or ``redis://...``
    (see :func:`~agent_guard.cache.store.store_from_url`); ``namespace`` defaults to
    the URL's ``?namespace=``, else ``default``. ``max_bytes`` bounds an entry;
    after a store error the store is left alone ``retry_after`` seconds.
    """

    def __init__(
        self,
        store: str | KVStore = "memory://",
        *,
        namespace: str | None = None,
        ttl: Mapping[str, float | None] | None = None,
        tenant_key: str = "tenant",
        max_entries: int | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        retry_after: float = DEFAULT_RETRY_AFTER,
    ) -> None:
        check_settings(max_bytes, retry_after)
        options: dict[str, Any] = {}
        if max_entries is not None:
            if not (isinstance(store, str) and store.lower().startswith("memory://")):
                raise ValueError("max_entries bounds a memory:// store only")
            options["max_entries"] = max_entries
        self.store = store_from_url(store, **options)
        self.namespace = namespace or self.store.namespace or "default"
        self.ttl = {**DEFAULT_TTL, **(ttl or {})}
        for cls, seconds in self.ttl.items():
            if seconds is not None and not seconds > 0:
                raise ValueError(f"TTL of class {cls!r} must be > 0 seconds or None, "
                                 f"got {seconds!r}")
        self.tenant_key = tenant_key
        self.max_bytes = max_bytes
        self.io = CacheIO.of(self.store)
        self.io.retry_after = retry_after
        self.prefix = f"agc:{{{key_part(self.namespace)}}}:"
        self._stats: defaultdict[str, CacheStats] = defaultdict(CacheStats)
        self._lock = threading.Lock()

    # -- policy -----------------------------------------------------------------------

    def cacheable(self, ttl_class: str) -> bool:
        if ttl_class not in self.ttl:
            raise ValueError(f"unknown TTL class {ttl_class!r}; this cache has "
                             f"{sorted(self.ttl)}")
        return self.ttl[ttl_class] is not None

    def ttl_for(self, ttl_class: str) -> float | None:
        self.cacheable(ttl_class)
        return self.ttl[ttl_class]

    def tenant_from(self, config: Mapping[str, Any] | None) -> str:
        return tenant_of((config or {}).get("metadata"), self.tenant_key)

    def tool_key(self, tool: str, args: Any, *, tenant: str, version: str | None = None,
                 public: bool = False) -> str:
        digest = hashlib.sha256(canonical_json(args).encode()).hexdigest()
        owner = "_public" if public else "t=" + key_part(tenant)
        return (f"{self.prefix}tool:{owner}:{key_part(tool)}:v={key_part(version or '')}:"
                f"{digest}")

    # -- reading and writing ------------------------------------------------------------

    def _count(self, tool: str, *, hit: bool, saved_nano: int = 0,
               failure: Failure | None = None) -> None:
        with self._lock:
            stats = self._stats[tool]
            if hit:
                stats.hits += 1
                stats.saved_nano += saved_nano
            else:
                stats.misses += 1
                if failure is Failure.ERROR:
                    stats.errors += 1
                elif failure is Failure.UNDECODABLE:
                    stats.undecodable += 1

    def _unstorable(self, name: str) -> None:
        with self._lock:
            self._stats[name].unstorable += 1

    def get_tool(self, tool: str, args: Any, *, tenant: str, ttl_class: str,
                 version: str | None = None, public: bool = False) -> Any:
        """The cached result, or ``MISS``."""
        return self.lookup_tool(tool, args, tenant=tenant, ttl_class=ttl_class,
                                version=version, public=public)[0]

    def lookup_tool(self, tool: str, args: Any, *, tenant: str, ttl_class: str,
                    version: str | None = None, public: bool = False) -> tuple[Any, int]:
        """``(cached result or MISS, nano-USD a hit saved)``; never raises for the
        store's sake (a failure is a miss)."""
        if not self.cacheable(ttl_class):
            return MISS, 0
        key = self.tool_key(tool, args, tenant=tenant, version=version, public=public)
        entry, failure = self.io.read(key, self.max_bytes, "tool result")
        if entry is None and failure is None:
            self._count(tool, hit=False)
            return MISS, 0
        if failure is None and not _tool_entry(entry):
            self.io.refused("not a tool entry", "tool result")
            failure = Failure.UNDECODABLE
        if failure is not None:
            self._count(tool, hit=False, failure=failure)
            return MISS, 0
        saved = entry["cost_nano"]
        self._count(tool, hit=True, saved_nano=saved)
        return entry["result"], saved

    def put_tool(self, tool: str, args: Any, value: Any, *, tenant: str, ttl_class: str,
                 version: str | None = None, public: bool = False,
                 cost_usd: Any = None) -> bool:
        """Store a result; False when it is not cached (class, value, or the store)."""
        if not self.cacheable(ttl_class):
            return False
        text = self.io.encode({"result": value, "at": time.time(),
                               "cost_nano": usd_to_nano(cost_usd) if cost_usd else 0},
                              f"a result of {tool}", self.max_bytes)
        if text is None:
            self._unstorable(tool)
            return False
        key = self.tool_key(tool, args, tenant=tenant, version=version, public=public)
        return self.io.write_text(key, text, self.ttl[ttl_class])

    def stats(self) -> dict[str, CacheStats]:
        """Hits, misses (and why) and saved dollars per tool, and per ``node:<name>``
        for node results, of this namespace (this process)."""
        with self._lock:
            return {k: dataclasses.replace(v) for k, v in self._stats.items()}

    def clear(self) -> int:
        return self.io.delete_prefix(self.prefix)


def _tool_entry(entry: Any) -> bool:
    return (type(entry) is dict and "result" in entry and type(entry.get("cost_nano")) is int
            and entry["cost_nano"] >= 0)


def cached_tool(
    tool: BaseTool,
    cache: ResultCache,
    ttl_class: str,
    *,
    side_effects: bool = False,
    version: str | None = None,
    public: bool = False,
    cost_usd: Any = None,
) -> BaseTool:
    """``tool`` answering repeated calls from ``cache``: same name, schema and async
    support. ``side_effects=True`` tools are returned as they are (never cached);
    ``public=True`` shares results across tenants; ``cost_usd`` is what one real
    call costs (counted as saved on each hit)."""
    if side_effects:
        return tool
    cache.cacheable(ttl_class)  # fail now on an unknown class

    def lookup(kwargs: dict[str, Any], config: RunnableConfig) -> tuple[str, Any, int]:
        tenant = cache.tenant_from(config)
        hit, saved = cache.lookup_tool(tool.name, kwargs, tenant=tenant, ttl_class=ttl_class,
                                       version=version, public=public)
        return tenant, hit, saved

    def hit_event(saved: int) -> dict[str, Any]:
        return {"tool": tool.name, "saved_nano": saved}

    def inner_config(config: RunnableConfig) -> RunnableConfig:
        # the wrapper's own run is the one callbacks see: do not count the tool twice
        return {**config, "callbacks": []}

    def run(config: RunnableConfig, **kwargs: Any) -> Any:
        tenant, hit, saved = lookup(kwargs, config)
        if hit is not MISS:
            _note_hit(saved)
            run_config = _tool_run_config()
            if run_config is not None:
                dispatch_custom_event(CACHE_HIT_EVENT, hit_event(saved), config=run_config)
            note_tool_run(cost_usd=0, cache_hit=True, saved_nano=saved)
            return hit
        result = tool.invoke(kwargs, inner_config(config))
        cache.put_tool(tool.name, kwargs, result, tenant=tenant, ttl_class=ttl_class,
                       version=version, public=public, cost_usd=cost_usd)
        note_tool_run(cost_usd=cost_usd, cache_hit=False)
        return result

    async def arun(config: RunnableConfig, **kwargs: Any) -> Any:
        # the store's I/O runs in a thread: a slow cache never blocks the event loop
        tenant, hit, saved = await asyncio.to_thread(lookup, kwargs, config)
        if hit is not MISS:
            _note_hit(saved)
            run_config = _tool_run_config()
            if run_config is not None:
                await adispatch_custom_event(CACHE_HIT_EVENT, hit_event(saved),
                                             config=run_config)
            note_tool_run(cost_usd=0, cache_hit=True, saved_nano=saved)
            return hit
        result = await tool.ainvoke(kwargs, inner_config(config))
        await asyncio.to_thread(functools.partial(
            cache.put_tool, tool.name, kwargs, result, tenant=tenant, ttl_class=ttl_class,
            version=version, public=public, cost_usd=cost_usd))
        note_tool_run(cost_usd=cost_usd, cache_hit=False)
        return result

    return StructuredTool.from_function(
        func=run, coroutine=arun, name=tool.name, description=tool.description,
        args_schema=tool.args_schema, return_direct=tool.return_direct,
        response_format=tool.response_format,
        # the tool's own metadata (a price declared with priced_tool) stays on it
        metadata=dict(tool.metadata) if tool.metadata else None,
    )


def _tool_run_config() -> RunnableConfig | None:
    """The config LangChain set for the running tool's children (the ``config`` a tool
    function receives is its caller's): its callback manager's parent run is the tool
    run, which an event must name. None outside a run (dispatching would raise)."""
    config = var_child_runnable_config.get()
    manager = (config or {}).get("callbacks")
    if isinstance(manager, BaseCallbackManager) and manager.parent_run_id is not None:
        return config
    return None
