"""Sub-task (LangGraph node) caching over the same stores as tool results.

:class:`NodeCache` is a LangGraph ``BaseCache``; :func:`content_key` is a
``CachePolicy.key_func`` that hashes what a node's input *says*, not message
ids (``add_messages`` gives every new message a fresh UUID, so LangGraph's
default pickle key never hits across runs on a message state). The key also
carries the tenant of the run, which ``guarded_graph`` sets for the run.

A node's cached value is its writes (``[(channel, value), ...]``), written and read
with the allow-list serializer (:mod:`.serde`), never LangGraph's default one
(which rebuilds any importable type from msgpack extension data). Writes holding
anything else are not cached; an entry that cannot be read, or a store that fails,
is a miss, and the node runs.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

from langchain_core.messages import BaseMessage
from langgraph.cache.base import BaseCache, FullKey, Namespace

from .result import ResultCache, canonical_json
from .safety import Failure
from .store import key_part

__all__ = ["NodeCache", "astream_as_tenant", "content_key", "stream_as_tenant"]

_TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("agent_guard_node_cache_tenant",
                                                              default="_default")


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
        if tool_call_id := getattr(value, "tool_call_id", None):
            out["tool_call_id"] = tool_call_id
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

    Values go through the allow-list serializer of :mod:`.serde` (LangGraph's
    ``serde`` is not used); a refused entry or a failing store is a miss, counted
    under ``node:<name>`` in the result cache's ``stats()``.
    """

    def __init__(self, results: ResultCache) -> None:
        super().__init__()
        self.results = results
        self.prefix = results.prefix + "node:"

    def _key(self, ns: Namespace, key: str) -> str:
        return self.prefix + ":".join(key_part(p) for p in ns) + "|" + key_part(key)

    def get(self, keys: Sequence[FullKey]) -> dict[FullKey, Any]:
        found: dict[FullKey, Any] = {}
        io = self.results.io
        for ns, key in keys:
            node = ns[-1] if ns else "?"
            value, failure = io.read(self._key(ns, key), self.results.max_bytes,
                                     "node result")
            if failure is None and value is not None and not _writes(value):
                io.refused("not a list of (channel, value) writes", "node result")
                value, failure = None, Failure.UNDECODABLE
            self.results._count(f"node:{node}", hit=value is not None, failure=failure)
            if value is not None:
                found[(ns, key)] = value
        return found

    def set(self, pairs: Mapping[FullKey, tuple[Any, int | None]]) -> None:
        io = self.results.io
        for (ns, key), (value, ttl) in pairs.items():
            node = ns[-1] if ns else "?"
            text = io.encode(value, f"the result of node {node!r}", self.results.max_bytes)
            if text is None:
                self.results._unstorable(f"node:{node}")
                continue
            io.write_text(self._key(ns, key), text, ttl)

    def clear(self, namespaces: Sequence[Namespace] | None = None) -> None:
        io = self.results.io
        if namespaces is None:
            io.delete_prefix(self.prefix)
            return
        for ns in namespaces:
            io.delete_prefix(self.prefix + ":".join(key_part(p) for p in ns) + "|")

    async def aget(self, keys: Sequence[FullKey]) -> dict[FullKey, Any]:
        return await asyncio.to_thread(self.get, keys)

    async def aset(self, pairs: Mapping[FullKey, tuple[Any, int | None]]) -> None:
        await asyncio.to_thread(self.set, pairs)

    async def aclear(self, namespaces: Sequence[Namespace] | None = None) -> None:
        await asyncio.to_thread(self.clear, namespaces)


def _writes(value: Any) -> bool:
    """What LangGraph caches for a node: a list of ``(channel, value)`` pairs."""
    return type(value) is list and all(
        type(w) is tuple and len(w) == 2 and type(w[0]) is str for w in value)
