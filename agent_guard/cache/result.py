"""Caching of tool results: exact keys, TTL classes, isolated per tenant.

A key is the namespace, the tenant, the tool's name and version, and the
SHA-256 of the canonical JSON of its arguments. The tenant is read from the
call's config metadata (``tenant`` by default) and a tool's results are only
shared across tenants when the tool is declared ``public``. Tools with side
effects are never cached; errors are never cached; values are stored as JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from langchain_core.callbacks import BaseCallbackManager
from langchain_core.callbacks.manager import adispatch_custom_event, dispatch_custom_event
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import var_child_runnable_config
from langchain_core.tools import BaseTool, StructuredTool

from ..usage import nano_to_usd, usd_to_nano
from .store import KVStore, key_part, store_from_url

__all__ = ["CACHE_HIT_EVENT", "TTL", "CacheStats", "ResultCache", "cached_tool"]

logger = logging.getLogger("agent_guard")
MISS: Any = object()
#: The LangChain custom event a ``cached_tool`` dispatches when it answers from the cache
#: (data: ``{"tool": name, "saved_nano": int}``); its run_id is the tool's run, so a
#: callback handler (GuardCallbackHandler's telemetry) can mark that tool span.
CACHE_HIT_EVENT = "agent_guard.cache_hit"


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


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    saved_nano: int = 0

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
    real-time data). ``store`` is ``memory://`` (LRU-bounded by
    ``max_entries``), ``sqlite:///cache.db`` or ``redis://...``.
    """

    def __init__(
        self,
        store: str | KVStore = "memory://",
        *,
        namespace: str = "default",
        ttl: Mapping[str, float | None] | None = None,
        tenant_key: str = "tenant",
        max_entries: int = 10_000,
    ) -> None:
        options: dict[str, Any] = {}
        if isinstance(store, str) and store.startswith("memory://"):
            options["max_entries"] = max_entries
        self.store = store_from_url(store, **options)
        self.namespace = namespace
        self.ttl = dict(ttl or {})
        for cls, seconds in self.ttl.items():
            if seconds is not None and not seconds > 0:
                raise ValueError(f"TTL of class {cls!r} must be > 0 seconds or None, "
                                 f"got {seconds!r}")
        self.tenant_key = tenant_key
        self.prefix = f"agc:{{{key_part(namespace)}}}:"
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
        meta = (config or {}).get("metadata") or {}
        tenant = meta.get(self.tenant_key)
        return str(tenant) if tenant not in (None, "") else "_default"

    def tool_key(self, tool: str, args: Any, *, tenant: str, version: str | None = None,
                 public: bool = False) -> str:
        digest = hashlib.sha256(canonical_json(args).encode()).hexdigest()
        owner = "_public" if public else "t=" + key_part(tenant)
        return (f"{self.prefix}tool:{owner}:{key_part(tool)}:v={key_part(version or '')}:"
                f"{digest}")

    # -- reading and writing ------------------------------------------------------------

    def _count(self, tool: str, *, hit: bool, saved_nano: int = 0) -> None:
        with self._lock:
            stats = self._stats[tool]
            if hit:
                stats.hits += 1
                stats.saved_nano += saved_nano
            else:
                stats.misses += 1

    def get_tool(self, tool: str, args: Any, *, tenant: str, ttl_class: str,
                 version: str | None = None, public: bool = False) -> Any:
        """The cached result, or ``MISS``."""
        return self.lookup_tool(tool, args, tenant=tenant, ttl_class=ttl_class,
                                version=version, public=public)[0]

    def lookup_tool(self, tool: str, args: Any, *, tenant: str, ttl_class: str,
                    version: str | None = None, public: bool = False) -> tuple[Any, int]:
        """``(cached result or MISS, nano-USD a hit saved)``."""
        if not self.cacheable(ttl_class):
            return MISS, 0
        raw = self.store.get(self.tool_key(tool, args, tenant=tenant, version=version,
                                           public=public))
        if raw is None:
            self._count(tool, hit=False)
            return MISS, 0
        entry = json.loads(raw)
        saved = int(entry.get("cost_nano", 0))
        self._count(tool, hit=True, saved_nano=saved)
        return entry["value"], saved

    def put_tool(self, tool: str, args: Any, value: Any, *, tenant: str, ttl_class: str,
                 version: str | None = None, public: bool = False,
                 cost_usd: Any = None) -> bool:
        """Store a result; False when it is not cacheable (class or value)."""
        if not self.cacheable(ttl_class):
            return False
        try:
            text = json.dumps({"value": value, "at": time.time(),
                               "cost_nano": usd_to_nano(cost_usd) if cost_usd else 0})
        except (TypeError, ValueError):
            logger.debug("agent-guard: result of %s is not JSON; not cached", tool)
            return False
        self.store.set(self.tool_key(tool, args, tenant=tenant, version=version,
                                     public=public), text, self.ttl[ttl_class])
        return True

    def stats(self) -> dict[str, CacheStats]:
        """Hits, misses and saved dollars per tool of this namespace (this process)."""
        with self._lock:
            return {k: CacheStats(v.hits, v.misses, v.saved_nano)
                    for k, v in self._stats.items()}

    def clear(self) -> int:
        return self.store.delete_prefix(self.prefix)


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
            run_config = _tool_run_config()
            if run_config is not None:
                dispatch_custom_event(CACHE_HIT_EVENT, hit_event(saved), config=run_config)
            return hit
        result = tool.invoke(kwargs, inner_config(config))
        cache.put_tool(tool.name, kwargs, result, tenant=tenant, ttl_class=ttl_class,
                       version=version, public=public, cost_usd=cost_usd)
        return result

    async def arun(config: RunnableConfig, **kwargs: Any) -> Any:
        tenant, hit, saved = lookup(kwargs, config)
        if hit is not MISS:
            run_config = _tool_run_config()
            if run_config is not None:
                await adispatch_custom_event(CACHE_HIT_EVENT, hit_event(saved),
                                             config=run_config)
            return hit
        result = await tool.ainvoke(kwargs, inner_config(config))
        cache.put_tool(tool.name, kwargs, result, tenant=tenant, ttl_class=ttl_class,
                       version=version, public=public, cost_usd=cost_usd)
        return result

    return StructuredTool.from_function(
        func=run, coroutine=arun, name=tool.name, description=tool.description,
        args_schema=tool.args_schema, return_direct=tool.return_direct,
        response_format=tool.response_format,
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
