"""``guarded_graph()``: a LangGraph graph with caps, step limits and an action at the cap.

Every node is wrapped so that it counts one step before it runs and turns a
refusal (raised by the guard's callback handler on a model or tool call
inside it, or by the step count) into the chosen action. A refusal ends the
*whole run* whatever the graph's edges (see ``docs/graph-control.md``):

- each run (one ``invoke``/``stream``/``astream``/``batch`` item, subgraphs
  included) carries a :class:`_Run` in its config; the refused node marks it
  stopped and returns no update;
- every edge out of a node (static, conditional, ``Send`` fan-outs) is
  rewritten to lead, once the run is stopped, to a final node that answers
  the tool calls left without a ``ToolMessage`` and adds the explanation (it
  writes nothing when the state has no ``messages``); nodes already
  scheduled return at once without counting or paying, and a callback gate
  refuses any model or tool call started after the stop;
- ``raise`` ends the run the same way (the thread's history stays valid) and
  then raises the refusal from ``invoke``/``stream``; ``interrupt`` pauses the
  run with LangGraph ``interrupt()`` (``Command(resume={"extend_usd": 1.0})``
  raises the cap and re-runs the node, ``Command(resume={"stop": True})`` ends
  as ``end`` does).

Compiled ``StateGraph`` s used as nodes are guarded the same way, on the same
run, so their node runs are steps too.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, cast

from langchain_core.callbacks import BaseCallbackHandler, BaseCallbackManager
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import merge_configs, var_child_runnable_config
from langgraph.cache.base import BaseCache
from langgraph.errors import GraphInterrupt
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import CachePolicy, Command, interrupt

from ..actions import (
    OnExceed,
    Stop,
    answer_tool_calls,
    check_on_exceed,
    interrupt_payload,
    is_guard_payload,
    logger,
    resume_steps,
    wants_stop,
)
from ..cache.node import NodeCache, astream_as_tenant, content_key, stream_as_tenant
from ..cache.result import ResultCache
from ..cache.safety import CacheIO
from ..cache.serde import AllowListSerializer, UndecodableEntry, UnencodableValue
from ..compat import BranchSpec, RunnableCallable
from ..context import session_of
from ..engine.budgets import Budgets, attributes_from_metadata
from ..engine.drive import Steps, adrive, drive
from ..engine.guard import Guard
from ..engine.limits import Limits
from ..engine.usage import usd_to_nano
from ..errors import GuardError
from ..langchain.callback import GuardCallbackHandler
from ..langchain.dispatch import close_unstarted_starts
from ..ledger import Ledger

__all__ = ["GuardedStateGraph", "budget_gate", "guarded_graph", "session_of"]

_RESUME = "agent_guard_resume"  # what a normalised resume value carries
_RUN_KEY = "__agent_guard_run__"  # configurable key of the run ("__": never checkpointed)
FINAL_NODE = "agent_guard_end"  # answers pending tool calls and explains, then END
_STOPPED = "__agent_guard_stopped__"  # a branch's answer once the run is stopped



class RunHalted(GuardError):
    """A model or tool call started after the run was stopped or paused (internal)."""


class _Run:
    """One run of a guarded graph and its subgraphs: stopped, paused, or going on.

    It lives in ``config["configurable"]`` for the length of one top-level
    ``stream``/``astream`` call (``invoke``, ``batch`` and ``astream_events`` go
    through them), never in a checkpoint: a later invocation of the same thread
    is a new run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stop: Stop | None = None
        self.error: GuardError | None = None  # to raise at the end (on_exceed="raise")
        self.paused: tuple[GuardError, str] | None = None
        self.message_id = f"agent-guard-stop-{uuid.uuid4().hex}"
        # the tool calls whose tool started (LangChain's on_tool_start): a stop answers
        # them "Stopped", not "Not run"
        self.started_tools: set[str] = set()

    @property
    def halted(self) -> bool:
        return self.stop is not None or self.paused is not None

    def end(self, exc: GuardError, *, reraise: bool) -> bool:
        """Mark the run stopped by ``exc``; True the first time."""
        with self._lock:
            if self.stop is not None:
                return False
            self.stop = Stop.of(exc)
            self.error = exc if reraise else None
            return True

    def end_from(self, stop: Stop) -> None:
        with self._lock:
            if self.stop is None:
                self.stop = stop

    def pause(self, exc: GuardError, node: str) -> bool:
        """Mark the run paused by ``exc``; True the first time."""
        with self._lock:
            if self.paused is not None:
                return False
            self.paused = (exc, node)
            return True


def _run_of(config: Mapping[str, Any] | None) -> _Run | None:
    run = ((config or {}).get("configurable") or {}).get(_RUN_KEY)
    return run if isinstance(run, _Run) else None


def _with_run(config: RunnableConfig | None) -> tuple[RunnableConfig, _Run, bool]:
    """The config carrying this run's :class:`_Run`; True if this call started the run."""
    out: dict[str, Any] = dict(config or {})
    run = _run_of(cast(RunnableConfig, out))
    if run is not None:
        return cast(RunnableConfig, out), run, False
    run = _Run()
    out["configurable"] = {**(out.get("configurable") or {}), _RUN_KEY: run}
    return cast(RunnableConfig, out), run, True


class _RunGate(BaseCallbackHandler):
    """Refuses any model or tool call started once the run is stopped or paused.

    The node wrappers stop nodes that have not started; this stops branches of the
    same superstep that were already running when another branch was refused."""

    raise_error: bool = True
    run_inline: bool = True

    @staticmethod
    def _check() -> None:
        run = _run_of(var_child_runnable_config.get())
        if run is not None and run.halted:
            close_unstarted_starts()  # the other handlers' starts, made on async paths
            raise RunHalted("the run was stopped or paused by agent-guard")

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        self._check()

    def on_llm_start(self, *args: Any, **kwargs: Any) -> None:
        self._check()

    def on_tool_start(self, *args: Any, tool_call_id: str | None = None, **kwargs: Any
                      ) -> None:
        self._check()
        run = _run_of(var_child_runnable_config.get())
        if run is not None and tool_call_id:
            run.started_tools.add(tool_call_id)


_RETRY = object()


class _NodeGuard:
    """Wraps one node: count the step, run it, act on a refusal."""

    def __init__(self, name: str, inner: Runnable, guard: Guard, on_exceed: OnExceed,
                 default_session: str | None, subgraph: bool) -> None:
        self.name = name
        self.inner = inner
        self.guard = guard
        self.on_exceed = on_exceed
        self.default_session = default_session
        self.subgraph = subgraph  # a guarded subgraph ends (or pauses) by itself

    def _stopped(self, run: _Run | None, exc: GuardError, session: str) -> None:
        """``end``/``raise``: mark the run stopped; this node writes nothing."""
        if run is None:  # not run through GuardedStateGraph: nothing else can stop it
            raise exc
        if run.end(exc, reraise=self.on_exceed == "raise") and self.on_exceed == "end":
            logger.warning("agent-guard: %s The run of session %r ended at node %r "
                           "(on_exceed='end').", exc, session, self.name)

    def _pause(self, run: _Run | None, exc: GuardError, session: str) -> Any:
        """``interrupt``: pause; the resume value once resumed."""
        payload = interrupt_payload(exc, self.name)
        try:
            return interrupt(payload)
        except GraphInterrupt:
            if run is not None and run.pause(exc, self.name):
                logger.warning("agent-guard: %s The run of session %r paused at node %r "
                               "(on_exceed='interrupt'); resume with "
                               "Command(resume={'extend_usd': ...}) or "
                               "Command(resume={'stop': True}).", exc, session, self.name)
            raise

    def _decide(self, exc: GuardError, run: _Run | None, session: str) -> Any:
        """``_RETRY`` to run the node again (caps raised), or what the node returns."""
        return drive(self.guard.ledger, self._deciding(exc, run, session))

    async def _adecide(self, exc: GuardError, run: _Run | None, session: str) -> Any:
        return await adrive(self.guard.ledger, self._deciding(exc, run, session))

    def _deciding(self, exc: GuardError, run: _Run | None, session: str) -> Steps[Any]:
        if isinstance(exc, RunHalted):
            if run is not None and run.paused is not None and run.stop is None:
                exc = run.paused[0]  # a sibling paused: pause here too, for the same reason
            else:
                return None
        if self.on_exceed != "interrupt":
            self._stopped(run, exc, session)
            return None
        resume = self._pause(run, exc, session)
        if isinstance(resume, Mapping) and _RESUME in resume:
            resume = resume[_RESUME]  # extensions were applied once, by the graph
        else:  # resumed by interrupt id
            yield from resume_steps(self.guard, session, resume, getattr(exc, "dimension", None))
        if wants_stop(resume):
            if run is not None:
                run.end(exc, reraise=False)
            return None
        return _RETRY

    def _skip(self, run: _Run | None) -> bool:
        """The run is over: this node must not run (a guarded subgraph still runs, to end
        its own state cleanly; its nodes skip)."""
        return run is not None and run.stop is not None and not self.subgraph

    def invoke(self, state: Any, config: RunnableConfig) -> Any:
        run = _run_of(config)
        if self._skip(run):
            return None
        if self.subgraph and run is not None and run.stop is not None:
            return self.inner.invoke(state, config)
        session = session_of(config, self.default_session)
        while True:
            try:
                if run is not None and run.halted:
                    raise RunHalted("the run was paused by agent-guard")
                self.guard.before_step(session, attributes=attributes_from_metadata(
                    config.get("metadata"), self.guard.attribute_names))
                return self.inner.invoke(state, config)
            except GuardError as exc:
                outcome = self._decide(exc, run, session)
                if outcome is not _RETRY:
                    return outcome

    async def ainvoke(self, state: Any, config: RunnableConfig) -> Any:
        run = _run_of(config)
        if self._skip(run):
            return None
        if self.subgraph and run is not None and run.stop is not None:
            return await self.inner.ainvoke(state, config)
        session = session_of(config, self.default_session)
        while True:
            try:
                if run is not None and run.halted:
                    raise RunHalted("the run was paused by agent-guard")
                await self.guard.abefore_step(session, attributes=attributes_from_metadata(
                    config.get("metadata"), self.guard.attribute_names))
                return await self.inner.ainvoke(state, config)
            except GuardError as exc:
                outcome = await self._adecide(exc, run, session)
                if outcome is not _RETRY:
                    return outcome


def _final_node(state: Any, config: RunnableConfig) -> Any:
    """After a stop: answer the tool calls left open, then say why (once per run: the
    message's id is the run's, so a subgraph's and its parent's explanations merge)."""
    run = _run_of(config)
    if run is None or run.stop is None:
        return None
    messages = state.get("messages") if isinstance(state, Mapping) else getattr(
        state, "messages", None)
    if not isinstance(messages, list):
        return None
    return {"messages": [*answer_tool_calls(messages, run.stop, run.started_tools),
                         run.stop.message(id=run.message_id)]}


def _stop_route(path: Runnable, on_stop: Hashable, on_exceed: OnExceed) -> Runnable:
    """A conditional edge's function that leads to ``on_stop`` once the run is stopped
    (a refusal inside the function itself stops the run too)."""

    def refused(exc: GuardError, config: RunnableConfig) -> Hashable:
        run = _run_of(config)
        if run is None:
            raise exc
        if not isinstance(exc, RunHalted):  # no pause from an edge: it ends the run
            run.end(exc, reraise=on_exceed == "raise")
        return on_stop

    def route(state: Any, config: RunnableConfig) -> Any:
        run = _run_of(config)
        if run is not None and run.stop is not None:
            return on_stop
        try:
            return path.invoke(state, config)
        except GuardError as exc:
            return refused(exc, config)

    async def aroute(state: Any, config: RunnableConfig) -> Any:
        run = _run_of(config)
        if run is not None and run.stop is not None:
            return on_stop
        try:
            return await path.ainvoke(state, config)
        except GuardError as exc:
            return refused(exc, config)

    return RunnableCallable(route, aroute, name=path.get_name(), trace=False)


def _route_stops(builder: StateGraph, final: str, on_exceed: OnExceed) -> None:
    """Rewrite every edge out of a node so that a stopped run goes to ``final``.

    Static edges ``a -> b`` become conditional edges of ``a`` (same targets while
    the run goes on); conditional edges and ``Send`` fan-outs are wrapped. Edges
    from START, joins (``add_edge([a, b], c)``: ``c`` skips) and edges out of
    ``final`` are kept."""
    branches: defaultdict[str, dict[str, BranchSpec]] = defaultdict(dict)
    for source, specs in builder.branches.items():
        for name, spec in specs.items():
            ends = None if spec.ends is None else {**spec.ends, _STOPPED: final}
            on_stop = final if ends is None else _STOPPED
            branches[source][name] = BranchSpec(
                path=_stop_route(spec.path, on_stop, on_exceed), ends=ends,
                input_schema=spec.input_schema)
    targets: defaultdict[str, list[str]] = defaultdict(list)
    kept: set[tuple[str, str]] = set()
    for source, target in builder.edges:
        if source == START:
            kept.add((source, target))
        else:
            targets[source].append(target)
    for source, dests in targets.items():
        fixed = sorted(dests)

        def static(state: Any, _fixed: list[str] = fixed) -> list[str]:
            return _fixed

        path = RunnableCallable(static, name=f"{source}_edges", trace=False)
        name = "agent_guard_edges"
        branches[source][name] = BranchSpec(
            path=_stop_route(path, _STOPPED, on_exceed),
            ends={**{t: t for t in fixed}, _STOPPED: final})
    builder.edges = kept
    builder.branches = branches


def _guard_builder(builder: StateGraph, guard: Guard, on_exceed: OnExceed,
                   session_id: str | None) -> StateGraph:
    """A copy of ``builder`` with every node wrapped, guarded subgraphs and stop routes."""
    if FINAL_NODE in builder.nodes:
        raise ValueError(f"the graph already has a node named {FINAL_NODE!r}")
    wrapped = copy.copy(builder)
    wrapped.compiled = False  # a copy of a compiled graph's builder: nodes are added below
    wrapped.nodes = {}
    wrapped.edges = set(builder.edges)
    wrapped.waiting_edges = set(builder.waiting_edges)
    wrapped.branches = defaultdict(dict, {k: dict(v) for k, v in builder.branches.items()})
    for name, spec in builder.nodes.items():
        if spec.is_error_handler:
            wrapped.nodes[name] = spec
            continue
        inner: Runnable = cast(Runnable, spec.runnable)
        subgraph = _guard_subgraph(inner, guard, on_exceed, session_id)
        node = _NodeGuard(name, subgraph or inner, guard, on_exceed, session_id,
                          subgraph is not None)
        runnable = RunnableCallable(node.invoke, node.ainvoke, name=name, trace=False)
        wrapped.nodes[name] = dataclasses.replace(spec, runnable=runnable)
    # the final node also exists without messages (it writes nothing then): every
    # write a stopped run makes carries its route, which no cache may keep
    wrapped.add_node(FINAL_NODE, _final_node, input_schema=builder.state_schema)
    _route_stops(wrapped, FINAL_NODE, on_exceed)
    wrapped.edges.add((FINAL_NODE, END))
    return wrapped


_STOP_ROUTE = f"branch:to:{FINAL_NODE}"


def _storable(key: Any, writes: Any) -> bool:
    """A node's writes that may be cached: not empty, not made in a stopped run (a
    skipped node's nothing, or a result routed to the final node, replayed by a later
    run, would end that run without a refusal), and not the final node's (a graph-wide
    ``cache_policy`` caches every node: a later stop would say an earlier run's reason).
    ``key`` is LangGraph's ``(namespace, key)``, the namespace ending in the node."""
    namespace = key[0] if isinstance(key, tuple) and key else None
    if isinstance(namespace, tuple) and namespace and namespace[-1] == FINAL_NODE:
        return False
    try:
        return bool(writes) and not any(w[0] == _STOP_ROUTE for w in writes)
    except (TypeError, IndexError):
        return False


class _StopAwareCache(BaseCache[Any]):
    """The graph's own LangGraph node cache, kept safe: minus what a refusal produced (see
    :func:`_storable`), and read and written only through the cache allow-list
    (:class:`~agent_guard.cache.serde.AllowListSerializer`): an entry planted in a shared
    store can construct nothing, and an entry that can't be read, a value off the list or
    a backend that fails is a miss (logged once per cause), never the run's error."""

    def __init__(self, inner: BaseCache[Any]) -> None:
        inner.serde = AllowListSerializer()  # LangGraph's default rebuilds msgpack types
        super().__init__(serde=inner.serde)
        self.inner = inner
        self.io = CacheIO.of(inner)

    def _read(self, keys: Sequence[Any], read: Callable[[Sequence[Any]], Any]) -> Any:
        try:
            return read(keys)
        except Exception as exc:  # one bad entry: read the others one by one
            if len(keys) <= 1:
                self._missed(exc)
                return {}
        found: dict[Any, Any] = {}
        for key in keys:
            try:
                found.update(read([key]))
            except Exception as exc:
                self._missed(exc)
        return found

    def _missed(self, exc: Exception) -> None:
        if isinstance(exc, UndecodableEntry):
            self.io.refused(str(exc), "node entry")
        else:
            self.io.unstorable(f"{type(exc).__name__}: {exc}", "a LangGraph cache read")

    def get(self, keys: Sequence[Any]) -> dict[Any, Any]:
        return self._read(keys, self.inner.get)  # type: ignore[no-any-return]

    async def aget(self, keys: Sequence[Any]) -> dict[Any, Any]:
        try:
            return await self.inner.aget(keys)
        except Exception as exc:
            if len(keys) <= 1:
                self._missed(exc)
                return {}
        found: dict[Any, Any] = {}
        for key in keys:
            try:
                found.update(await self.inner.aget([key]))
            except Exception as exc:
                self._missed(exc)
        return found

    def set(self, pairs: Mapping[Any, tuple[Any, int | None]]) -> None:
        kept = {k: v for k, v in pairs.items() if _storable(k, v[0])}
        if not kept:
            return
        try:
            self.inner.set(kept)
        except Exception as exc:  # e.g. one value off the allow-list: store the others
            if len(kept) == 1:
                return self._unstored(exc)
            for key, value in kept.items():
                try:
                    self.inner.set({key: value})
                except Exception as each:
                    self._unstored(each)

    async def aset(self, pairs: Mapping[Any, tuple[Any, int | None]]) -> None:
        kept = {k: v for k, v in pairs.items() if _storable(k, v[0])}
        if not kept:
            return
        try:
            await self.inner.aset(kept)
        except Exception as exc:
            if len(kept) == 1:
                return self._unstored(exc)
            for key, value in kept.items():
                try:
                    await self.inner.aset({key: value})
                except Exception as each:
                    self._unstored(each)

    def _unstored(self, exc: Exception) -> None:
        why = str(exc) if isinstance(exc, UnencodableValue) else f"{type(exc).__name__}: {exc}"
        self.io.unstorable(why, "a node's writes")

    def clear(self, namespaces: Sequence[Any] | None = None) -> None:
        self.inner.clear(namespaces)

    async def aclear(self, namespaces: Sequence[Any] | None = None) -> None:
        await self.inner.aclear(namespaces)


def _stop_aware(kwargs: dict[str, Any]) -> dict[str, Any]:
    cache = kwargs.get("cache")
    if isinstance(cache, BaseCache) and not isinstance(cache, _StopAwareCache):
        kwargs = {**kwargs, "cache": _StopAwareCache(cache)}
    return kwargs


def _guard_subgraph(runnable: Any, guard: Guard, on_exceed: OnExceed,
                    session_id: str | None) -> Runnable | None:
    """A compiled ``StateGraph`` used as a node, guarded on the parent's run (its node
    runs count as steps; a refusal inside it ends it cleanly), or None."""
    if not isinstance(runnable, CompiledStateGraph) or isinstance(runnable, GuardedStateGraph):
        return None
    inner = _compile(runnable, guard, on_exceed, session_id, {})
    config = {k: v for k, v in (runnable.config or {}).items() if k != "callbacks"}
    return inner.with_config(cast(RunnableConfig, config)) if config else inner


def _compile_kwargs_of(graph: CompiledStateGraph) -> dict[str, Any]:
    """What ``graph`` was compiled with, to compile its guarded builder the same way."""
    kept = {"checkpointer": graph.checkpointer, "store": graph.store, "cache": graph.cache,
            "interrupt_before": graph.interrupt_before_nodes or None,
            "interrupt_after": graph.interrupt_after_nodes or None,
            "debug": graph.debug, "name": graph.name}
    return {k: v for k, v in kept.items() if v is not None}


# what a compiled graph carries that neither its builder nor compile() sets: LangGraph
# reads them from the graph at each run (``app.step_timeout = 30`` after compile)
_RUN_SETTINGS = ("step_timeout", "retry_policy", "cache_policy", "stream_mode",
                 "stream_eager", "stream_transformers")


def _carry_settings(graph: CompiledStateGraph, compiled: CompiledStateGraph,
                    compile_kwargs: Mapping[str, Any]) -> None:
    """Give ``compiled`` (``graph``'s builder, guarded) ``graph``'s run settings."""
    for name in _RUN_SETTINGS:
        if name == "stream_transformers" and compile_kwargs.get("transformers") is not None:
            continue  # given to guarded_graph: they win
        if hasattr(graph, name):
            setattr(compiled, name, getattr(graph, name))


def _compile(graph: CompiledStateGraph, guard: Guard, on_exceed: OnExceed,
             session_id: str | None, compile_kwargs: dict[str, Any]) -> GuardedStateGraph:
    kwargs = {**_compile_kwargs_of(graph), **compile_kwargs}
    compiled = _guard_builder(graph.builder, guard, on_exceed, session_id).compile(
        **_stop_aware(kwargs))
    _carry_settings(graph, compiled, kwargs)
    compiled.__class__ = GuardedStateGraph
    return compiled  # type: ignore[return-value]


def _handler_of(config: Mapping[str, Any] | None) -> GuardCallbackHandler | None:
    callbacks = (config or {}).get("callbacks")
    if isinstance(callbacks, list):
        for cb in callbacks:
            if isinstance(cb, GuardCallbackHandler):
                return cb
    return None


class GuardedStateGraph(CompiledStateGraph):
    """A compiled graph returned by :func:`guarded_graph`.

    It behaves as the original, except that a refusal ends (or pauses) the whole
    run (see :mod:`agent_guard.langgraph.graph`). ``invoke``'s result carries
    ``"__agent_guard__"`` (the reason and the numbers) when the guard ended the
    run. Resuming a run paused by the guard with ``Command(resume={"extend_usd":
    1.0})`` applies the extension once and answers every pending guard pause (a
    fan-out may have paused several branches at once, which plain LangGraph would
    only take by interrupt id); ``Command(resume={"stop": True})`` ends the run
    before any paused node runs again.

    ``app.guard`` is the graph's :class:`~agent_guard.Guard` (its usage, limits and
    ledger: ``app.guard.usage(thread_id)``).
    """

    @property
    def guard(self) -> Guard | None:
        """The guard every node of this graph runs under."""
        handler = _handler_of(self.config)
        return handler.guard if handler is not None else None

    def _ledger(self) -> Any:
        guard = self.guard
        return guard.ledger if guard is not None else None

    def _normalise(self, input: Any, config: RunnableConfig | None, pending: tuple
                   ) -> Steps[tuple[Any, Stop | None]]:
        """(the input to run, the stop a resume asks for), applying the extensions it
        asks for once (ledger operations: driven sync or async by the caller)."""
        if not isinstance(input, Command) or input.resume is None:
            return input, None
        ids = {i.id for i in pending}
        resume = input.resume
        if isinstance(resume, Mapping) and resume and set(resume) <= ids:
            return input, None  # already answered by interrupt id
        guard_pending = [i for i in pending if is_guard_payload(i.value)]
        if not guard_pending or len(guard_pending) != len(pending):
            return input, None
        first = guard_pending[0].value
        handler = _handler_of(self.config)
        if handler is not None:
            yield from resume_steps(handler.guard, session_of(config, handler.session_id),
                                    resume, first.get("dimension"))
        value = {_RESUME: dict(resume) if isinstance(resume, Mapping) else resume}
        normalised = Command(graph=input.graph, update=input.update, goto=input.goto,
                             resume={i.id: value for i in guard_pending})
        return normalised, Stop.from_payload(first) if wants_stop(resume) else None

    def _tenant(self, config: RunnableConfig | None) -> str:
        """The run's tenant, for node cache keys (see :mod:`agent_guard.cache.node`)."""
        cache = self.cache.inner if isinstance(self.cache, _StopAwareCache) else self.cache
        if isinstance(cache, NodeCache):
            return cache.results.tenant_from(merge_configs(self.config, config))
        return "_default"

    def _deduplicated(self, config: RunnableConfig | None) -> GuardedStateGraph:
        """This graph, without its own handler when the run brings a handler of the same
        guard (both would charge every call)."""
        own = _handler_of(self.config)
        if own is None or not getattr(own, "_graph_default", False) or not config:
            return self
        given = config.get("callbacks")
        handlers: Any = given.handlers if isinstance(given, BaseCallbackManager) else given
        if not any(isinstance(h, GuardCallbackHandler) and h.guard is own.guard
                   for h in handlers or ()):
            return self
        mine: dict[str, Any] = dict(self.config or {})
        callbacks = [cb for cb in mine.get("callbacks") or () if cb is not own]
        return self.copy({"config": {**mine, "callbacks": callbacks}})

    @staticmethod
    def _finish(run: _Run, output: Any) -> Any:
        if run.error is not None:
            raise run.error
        # a run ended before any node wrote the state: LangGraph's invoke returns None
        if run.stop is not None and (output is None or isinstance(output, dict)):
            output = {**(output or {}), "__agent_guard__": {"message": run.stop.text,
                                                            **run.stop.details}}
        return output

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
               ) -> Any:
        config, run, owner = _with_run(config)
        output = super().invoke(input, config, **kwargs)
        return self._finish(run, output) if owner else output

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
                      ) -> Any:
        config, run, owner = _with_run(config)
        output = await super().ainvoke(input, config, **kwargs)
        return self._finish(run, output) if owner else output

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
               ) -> Any:
        config, run, owner = _with_run(config)
        graph = self._deduplicated(config)
        if graph is not self:
            yield from graph.stream(input, config, **kwargs)
        else:
            if isinstance(input, Command) and input.resume is not None and self.checkpointer:
                input, stop = drive(self._ledger(), self._normalise(
                    input, config, self.get_state(config).interrupts))
                if stop is not None:
                    run.end_from(stop)
            parent: Any = super()
            yield from stream_as_tenant(self._tenant(config),
                                        lambda: parent.stream(input, config, **kwargs))
        if owner and run.error is not None:
            raise run.error

    async def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
                      ) -> Any:
        config, run, owner = _with_run(config)
        graph = self._deduplicated(config)
        if graph is not self:
            async for chunk in graph.astream(input, config, **kwargs):
                yield chunk
        else:
            if isinstance(input, Command) and input.resume is not None and self.checkpointer:
                snapshot = await self.aget_state(config)
                input, stop = await adrive(self._ledger(), self._normalise(
                    input, config, snapshot.interrupts))
                if stop is not None:
                    run.end_from(stop)
            parent: Any = super()
            async for chunk in astream_as_tenant(
                    self._tenant(config), lambda: parent.astream(input, config, **kwargs)):
                yield chunk
        if owner and run.error is not None:
            raise run.error


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
    checkpointer, store, cache, interrupts, debug, name, config and run settings such as
    ``step_timeout`` and ``retry_policy`` are kept) with the guard on every node.

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
        compile_kwargs = {**_compile_kwargs_of(graph), **compile_kwargs}
        base_config = dict(graph.config or {})
    elif isinstance(graph, StateGraph):
        builder = graph
    else:
        raise TypeError(f"guarded_graph takes a StateGraph or a compiled graph, got "
                        f"{type(graph).__name__}")

    wrapped = _guard_builder(builder, guard, on_exceed, session_id)
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
    compiled = wrapped.compile(**_stop_aware(compile_kwargs))
    if isinstance(graph, CompiledStateGraph):
        _carry_settings(graph, compiled, compile_kwargs)
    compiled.__class__ = GuardedStateGraph
    callbacks = list(base_config.get("callbacks") or [])
    own = GuardCallbackHandler(guard, session_id=session_id)
    own._graph_default = True  # stands down for a handler of the same guard given per run
    callbacks[:0] = [_RunGate(), own]  # the gate first: a halted run reserves nothing
    return cast(GuardedStateGraph,
                compiled.with_config(cast(RunnableConfig, {**base_config, "callbacks": callbacks})))


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
