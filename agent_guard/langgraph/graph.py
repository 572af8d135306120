"""``guarded_graph()``: a LangGraph graph with caps, step limits and an action at the cap.

Every node is wrapped so that it counts one step before it runs and turns a
refusal (raised by the guard's callback handler on a model or tool call
inside it, or by the step count) into the chosen action: ``raise``, ``end``
(return the state so far plus a final message, ``Command(goto=END)``) or
``interrupt`` (LangGraph ``interrupt()``; resuming with
``Command(resume={"extend_usd": 1.0})`` raises the cap and re-runs the node,
``Command(resume={"stop": True})`` ends).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from langchain_core.callbacks import BaseCallbackManager
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import merge_configs
from langgraph._internal._runnable import RunnableCallable
from langgraph.graph import END, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import CachePolicy, Command, interrupt

from ..actions import (
    OnExceed,
    apply_resume,
    check_on_exceed,
    interrupt_payload,
    is_guard_payload,
    stop_message,
    wants_stop,
)
from ..budgets import Budgets, attributes_from_metadata
from ..cache.node import NodeCache, astream_as_tenant, content_key, stream_as_tenant
from ..cache.result import ResultCache
from ..errors import GuardError
from ..guard import Guard
from ..langchain.callback import GuardCallbackHandler, session_from_metadata
from ..ledger import Ledger
from ..limits import Limits
from ..usage import usd_to_nano

__all__ = ["GuardedStateGraph", "budget_gate", "guarded_graph", "session_of"]

_RESUME = "agent_guard_resume"  # what a normalised resume value carries


def session_of(config: RunnableConfig | None, default: str | None = None) -> str:
    """The session of a graph run: ``thread_id``, else ``metadata["session_id"]``."""
    config = config or {}
    meta = dict(config.get("metadata") or {})
    thread = (config.get("configurable") or {}).get("thread_id")
    if thread is not None:
        meta["thread_id"] = thread
    return session_from_metadata(meta, default)


class _NodeGuard:
    """Wraps one node: count the step, run it, act on a refusal."""

    def __init__(self, name: str, inner: Runnable, guard: Guard, on_exceed: OnExceed,
                 has_messages: bool, default_session: str | None,
                 explained: dict[str, Any], lock: threading.Lock) -> None:
        self.name = name
        self.inner = inner
        self.guard = guard
        self.on_exceed = on_exceed
        self.has_messages = has_messages
        self.default_session = default_session
        self.explained = explained
        self.lock = lock

    def _end(self, exc: GuardError, session: str, config: RunnableConfig) -> Command:
        """Go to END; the explanation is added once per session and superstep."""
        step = (config.get("metadata") or {}).get("langgraph_step")
        with self.lock:
            first = self.explained.get(session) != step
            self.explained[session] = step
        update = {"messages": [stop_message(exc)]} if self.has_messages and first else {}
        return Command(goto=END, update=update)

    def _decide(self, exc: GuardError, session: str, config: RunnableConfig) -> Any:
        """None to retry the node, or what the node returns instead."""
        if self.on_exceed == "raise":
            raise exc
        if self.on_exceed == "end":
            return self._end(exc, session, config)
        resume = interrupt(interrupt_payload(exc, self.name))
        if isinstance(resume, Mapping) and _RESUME in resume:
            resume = resume[_RESUME]  # extensions were applied once, by the graph
        else:
            apply_resume(self.guard, session, resume)  # resumed by interrupt id
        if wants_stop(resume):
            return self._end(exc, session, config)
        return None

    def invoke(self, state: Any, config: RunnableConfig) -> Any:
        session = session_of(config, self.default_session)
        while True:
            try:
                self.guard.before_step(session, attributes=attributes_from_metadata(
                    config.get("metadata"), self.guard.attribute_names))
                return self.inner.invoke(state, config)
            except GuardError as exc:
                outcome = self._decide(exc, session, config)
                if outcome is not None:
                    return outcome

    async def ainvoke(self, state: Any, config: RunnableConfig) -> Any:
        session = session_of(config, self.default_session)
        while True:
            try:
                await self.guard.abefore_step(session, attributes=attributes_from_metadata(
                    config.get("metadata"), self.guard.attribute_names))
                return await self.inner.ainvoke(state, config)
            except GuardError as exc:
                outcome = self._decide(exc, session, config)
                if outcome is not None:
                    return outcome


def _handler_of(config: Mapping[str, Any] | None) -> GuardCallbackHandler | None:
    callbacks = (config or {}).get("callbacks")
    if isinstance(callbacks, list):
        for cb in callbacks:
            if isinstance(cb, GuardCallbackHandler):
                return cb
    return None


class GuardedStateGraph(CompiledStateGraph):
    """A compiled graph returned by :func:`guarded_graph`.

    It behaves as the original; in addition, resuming a run paused by the guard
    with ``Command(resume={"extend_usd": 1.0})`` applies the extension once and
    answers every pending guard pause (a fan-out may have paused several
    branches at once, which plain LangGraph would only take by interrupt id).
    """

    def _normalise(self, input: Any, config: RunnableConfig | None, pending: tuple) -> Any:
        if not isinstance(input, Command) or input.resume is None:
            return input
        ids = {i.id for i in pending}
        resume = input.resume
        if isinstance(resume, Mapping) and resume and set(resume) <= ids:
            return input  # already answered by interrupt id
        guard_pending = [i for i in pending if is_guard_payload(i.value)]
        if not guard_pending or len(guard_pending) != len(pending):
            return input
        handler = _handler_of(self.config)
        if handler is not None:
            apply_resume(handler.guard, session_of(config, handler.session_id), resume)
        value = {_RESUME: dict(resume) if isinstance(resume, Mapping) else resume}
        return Command(graph=input.graph, update=input.update, goto=input.goto,
                       resume={i.id: value for i in guard_pending})

    def _tenant(self, config: RunnableConfig | None) -> str:
        """The run's tenant, for node cache keys (see :mod:`agent_guard.cache.node`)."""
        if isinstance(self.cache, NodeCache):
            return self.cache.results.tenant_from(merge_configs(self.config, config))
        return "_default"

    def _deduplicated(self, config: RunnableConfig | None) -> GuardedStateGraph:
        """This graph, without its own handler when the run brings a handler of the same
        guard (both would charge every call)."""
        own = _handler_of(self.config)
        if own is None or not getattr(own, "_graph_default", False) or not config:
            return self
        given = config.get("callbacks")
        handlers = given.handlers if isinstance(given, BaseCallbackManager) else given
        if not any(isinstance(h, GuardCallbackHandler) and h.guard is own.guard
                   for h in handlers or ()):
            return self
        callbacks = [cb for cb in self.config.get("callbacks") or () if cb is not own]
        return self.copy({"config": {**self.config, "callbacks": callbacks}})

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
               ) -> Any:
        graph = self._deduplicated(config)
        if graph is not self:
            yield from graph.stream(input, config, **kwargs)
            return
        if isinstance(input, Command) and input.resume is not None and self.checkpointer:
            input = self._normalise(input, config, self.get_state(config or {}).interrupts)
        parent = super()
        yield from stream_as_tenant(self._tenant(config),
                                    lambda: parent.stream(input, config, **kwargs))

    async def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
                      ) -> Any:
        graph = self._deduplicated(config)
        if graph is not self:
            async for chunk in graph.astream(input, config, **kwargs):
                yield chunk
            return
        if isinstance(input, Command) and input.resume is not None and self.checkpointer:
            snapshot = await self.aget_state(config or {})
            input = self._normalise(input, config, snapshot.interrupts)
        parent = super()
        async for chunk in astream_as_tenant(
                self._tenant(config), lambda: parent.astream(input, config, **kwargs)):
            yield chunk


def guarded_graph(
    graph: StateGraph | CompiledStateGraph,
    *,
    guard: Guard | None = None,
    limits: Limits | Budgets | None = None,
    ledger: str | Ledger | None = None,
    on_exceed: OnExceed = "raise",
    session_id: str | None = None,
    router: Any = None,
    cache: ResultCache | None = None,
    cache_nodes: Mapping[str, str] | None = None,
    cache_ignore: Sequence[str] = (),
    **compile_kwargs: Any,
) -> GuardedStateGraph:
    """Compile ``graph`` (a ``StateGraph`` builder, or a compiled graph whose builder,
    checkpointer, store, cache and config are kept) with the guard on every node.

    The session is the run's ``thread_id`` (else ``metadata["session_id"]``, else
    ``session_id``); caps hold across invocations of a thread. ``compile_kwargs``
    go to ``StateGraph.compile`` (e.g. ``checkpointer=``). A ``router``
    (:class:`~agent_guard.routing.ModelRouter`) used by the nodes is given this
    guard, so it can step down to a cheaper tier when the budget runs short.

    ``cache_nodes`` maps node names to TTL classes of ``cache``: those nodes'
    results are cached by the *content* of their input (message ids and the
    state keys in ``cache_ignore`` do not count) and per tenant, so a repeated
    sub-task is answered without running (or paying for) it again.
    """
    on_exceed = check_on_exceed(on_exceed)
    if guard is None:
        guard = Guard(limits=limits, ledger=ledger if ledger is not None else "memory://")
    elif limits is not None or ledger is not None:
        raise ValueError("pass either guard=... or limits=/ledger=..., not both")
    if router is not None and getattr(router, "guard", None) is None:
        router.guard = guard
    base_config: dict[str, Any] = {}
    if isinstance(graph, CompiledStateGraph):
        builder = graph.builder
        kept = {"checkpointer": graph.checkpointer, "store": graph.store, "cache": graph.cache,
                "interrupt_before": graph.interrupt_before_nodes or None,
                "interrupt_after": graph.interrupt_after_nodes or None,
                "debug": graph.debug, "name": graph.name}
        compile_kwargs = {**{k: v for k, v in kept.items() if v is not None}, **compile_kwargs}
        base_config = dict(graph.config or {})
    elif isinstance(graph, StateGraph):
        builder = graph
    else:
        raise TypeError(f"guarded_graph takes a StateGraph or a compiled graph, got "
                        f"{type(graph).__name__}")

    has_messages = "messages" in builder.channels
    explained: dict[str, Any] = {}
    lock = threading.Lock()
    wrapped = copy.copy(builder)
    wrapped.nodes = {}
    for name, spec in builder.nodes.items():
        if spec.is_error_handler:
            wrapped.nodes[name] = spec
            continue
        node = _NodeGuard(name, spec.runnable, guard, on_exceed, has_messages, session_id,
                          explained, lock)
        runnable = RunnableCallable(node.invoke, node.ainvoke, name=name, trace=False)
        wrapped.nodes[name] = dataclasses.replace(spec, runnable=runnable)
    if cache_nodes:
        if cache is None:
            raise ValueError("cache_nodes needs cache=ResultCache(...)")
        unknown = set(cache_nodes) - set(builder.nodes)
        if unknown:
            raise ValueError(f"cache_nodes names unknown nodes {sorted(unknown)}")
        key_func = functools.partial(content_key, ignore=tuple(cache_ignore))
        for name, ttl_class in cache_nodes.items():
            ttl = cache.ttl_for(ttl_class)
            if cache.cacheable(ttl_class):
                wrapped.nodes[name] = dataclasses.replace(
                    wrapped.nodes[name],
                    cache_policy=CachePolicy(key_func=key_func, ttl=int(ttl) if ttl else None))
        compile_kwargs["cache"] = NodeCache(cache)
    compiled = wrapped.compile(**compile_kwargs)
    compiled.__class__ = GuardedStateGraph
    callbacks = list(base_config.get("callbacks") or [])
    own = GuardCallbackHandler(guard, session_id=session_id)
    own._graph_default = True  # stands down for a handler of the same guard given per run
    callbacks.insert(0, own)
    return compiled.with_config({**base_config, "callbacks": callbacks})


def budget_gate(
    guard: Guard,
    *,
    next: Hashable,
    otherwise: Hashable = END,
    min_remaining_usd: Any = None,
    estimate_usd: Callable[[Any], Any] | None = None,
    session_id: str | None = None,
) -> Callable[[Any, RunnableConfig], Hashable]:
    """A routing function for ``add_conditional_edges``: go to ``next`` while the
    session's remaining dollars cover what the next step needs (a fixed
    ``min_remaining_usd``, or ``estimate_usd(state)``), else to ``otherwise``
    (a cheaper fallback node, or END)."""
    if min_remaining_usd is None and estimate_usd is None:
        raise ValueError("budget_gate needs min_remaining_usd= or estimate_usd=")

    def route(state: Any, config: RunnableConfig) -> Hashable:
        usage = guard.usage(session_of(config, session_id))
        if usage.cap_nano is None:
            return next
        need = estimate_usd(state) if estimate_usd is not None else min_remaining_usd
        remaining = usage.cap_nano - usage.cost_nano - usage.reserved_nano
        return next if remaining >= usd_to_nano(need) else otherwise

    return route
