"""Sub-task (LangGraph node) caching over the same stores as tool results.

:class:`NodeCache` is a LangGraph ``BaseCache``; :func:`content_key` is a
``CachePolicy.key_func`` that hashes what a node's input *says*, not message
ids (``add_messages`` gives every new message a fresh UUID, so LangGraph's
default pickle key never hits across runs on a message state). The key also
carries the tenant of the run, which ``guarded_graph`` sets for the run.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

from langchain_core.messages import BaseMessage
from langgraph.cache.base import BaseCache, FullKey, Namespace

from .result import ResultCache, canonical_json
from .store import key_part

__all__ = ["NodeCache", "astream_as_tenant", "content_key", "stream_as_tenant"]

_TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("agent_guard_node_cache_tenant",
                                                              default="_default")
# serialisation formats a cached node value may come back in; never "pickle"
_SAFE_ENCODINGS = frozenset({"json", "msgpack", "bytes", "bytearray", "null"})


def stream_as_tenant(tenant: str, start: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    """Iterate ``start()`` with node cache keys made as ``tenant``'s, on every step.

    A generator has no context of its own: a ContextVar set inside it lands in the
    context of whoever calls ``next()``, so two streams consumed in turn, or one
    consumed from a thread pool step by step, would make keys under each other's
    tenant. The stream runs in a context of its own, entered for each step."""
    ctx = contextvars.copy_context()
    ctx.run(_TENANT.set, tenant)
    it = ctx.run(start)
    try:
        while True:
            try:
                chunk = ctx.run(next, it)
            except StopIteration:
                return
            yield chunk
    finally:
        ctx.run(getattr(it, "close", lambda: None))


async def astream_as_tenant(tenant: str, start: Callable[[], AsyncIterator[Any]]
                            ) -> AsyncIterator[Any]:
    """The async twin of :func:`stream_as_tenant`: each step runs as a task in the
    stream's own context."""
    ctx = contextvars.copy_context()
    ctx.run(_TENANT.set, tenant)
    agen = ctx.run(start)
    try:
        while True:
            try:
                chunk = await asyncio.create_task(_anext(agen), context=ctx)
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        closer = getattr(agen, "aclose", None)
        if closer is not None:
            await asyncio.create_task(closer(), context=ctx)


async def _anext(agen: AsyncIterator[Any]) -> Any:
    return await agen.__anext__()


def _content(value: Any, ignore: frozenset[str]) -> Any:
    if isinstance(value, BaseMessage):
        out: dict[str, Any] = {"type": value.type, "content": value.content}
        if value.name:
            out["name"] = value.name
        tool_calls = getattr(value, "tool_calls", None)
        if tool_calls:
            out["tool_calls"] = [(tc["name"], tc["args"]) for tc in tool_calls]
        if getattr(value, "tool_call_id", None):
            out["tool_call_id"] = value.tool_call_id
        return out
    if isinstance(value, Mapping):
        return {str(k): _content(v, ignore) for k, v in value.items() if k not in ignore}
    if isinstance(value, list | tuple):
        return [_content(v, ignore) for v in value]
    return value


def content_key(state: Any, *, ignore: Sequence[str] = ()) -> str:
    """A cache key from the content of a node's input: message ids, run ids and the
    keys in ``ignore`` (volatile state such as timestamps) do not count."""
    body = canonical_json(_content(state, frozenset(ignore)))
    return f"{_TENANT.get()}\x00{body}"


class NodeCache(BaseCache[Any]):
    """LangGraph's node cache on a :class:`ResultCache`'s store (memory, SQLite, Redis).

    Values are LangGraph's own JSON/msgpack serialisation (``pickle_fallback``
    off); an entry claiming to be a pickle is ignored, never loaded.
    """

    def __init__(self, results: ResultCache) -> None:
        super().__init__()
        self.results = results
        self.prefix = results.prefix + "node:"

    def _key(self, ns: Namespace, key: str) -> str:
        return self.prefix + ":".join(key_part(p) for p in ns) + "|" + key_part(key)

    def _decode(self, raw: str | None) -> Any:
        if raw is None:
            return None
        entry = json.loads(raw)
        if entry.get("enc") not in _SAFE_ENCODINGS:
            return None
        return self.serde.loads_typed((entry["enc"], base64.b64decode(entry["data"])))

    def get(self, keys: Sequence[FullKey]) -> dict[FullKey, Any]:
        found: dict[FullKey, Any] = {}
        for ns, key in keys:
            value = self._decode(self.results.store.get(self._key(ns, key)))
            node = ns[-1] if ns else "?"
            self.results._count(f"node:{node}", hit=value is not None)
            if value is not None:
                found[(ns, key)] = value
        return found

    def set(self, pairs: Mapping[FullKey, tuple[Any, int | None]]) -> None:
        for (ns, key), (value, ttl) in pairs.items():
            enc, data = self.serde.dumps_typed(value)
            if enc not in _SAFE_ENCODINGS:
                continue
            text = json.dumps({"enc": enc, "data": base64.b64encode(data).decode()})
            self.results.store.set(self._key(ns, key), text, ttl)

    def clear(self, namespaces: Sequence[Namespace] | None = None) -> None:
        if namespaces is None:
            self.results.store.delete_prefix(self.prefix)
            return
        for ns in namespaces:
            self.results.store.delete_prefix(
                self.prefix + ":".join(key_part(p) for p in ns) + "|")

    async def aget(self, keys: Sequence[FullKey]) -> dict[FullKey, Any]:
        return await asyncio.to_thread(self.get, keys)

    async def aset(self, pairs: Mapping[FullKey, tuple[Any, int | None]]) -> None:
        await asyncio.to_thread(self.set, pairs)

    async def aclear(self, namespaces: Sequence[Namespace] | None = None) -> None:
        await asyncio.to_thread(self.clear, namespaces)
