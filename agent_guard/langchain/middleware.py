"""``GuardMiddleware``: the guard inside LangChain v1's ``create_agent``.

- ``before_model`` counts a step and, after a tool refusal in ``end`` mode,
  jumps to the end with the explanation.
- ``wrap_model_call`` reserves the call's worst case before the model runs
  (and, when the budget is short, lowers the call's ``max_tokens`` to what
  fits), then settles from the answer's usage.
- ``wrap_tool_call`` counts the tool call (per tool, and identical repeats)
  before the tool runs; a refused call is answered with a "Not run"
  ``ToolMessage`` (the history stays valid for the provider) and the action
  (``raise``, ``end``, ``interrupt``) is taken once, in the next ``before_model``.

It owns the model and tool calls it admits: a :class:`GuardCallbackHandler` on
the same agent whose guard uses the same ledger joins them (each call is charged
and recorded once); it still charges what the middleware does not see (model
calls inside tools, or made before or after the agent). With ``telemetry`` it makes the
callback's spans (``invoke_agent``, ``chat``, ``execute_tool``) and metrics; sharing one
telemetry with a callback handler on the agent, each run gets one span.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import gc
import queue
import sys
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID

from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest, hook_config
from langchain.agents.middleware.types import ModelResponse
from langchain.agents.structured_output import (
    AutoStrategy,
    OutputToolBinding,
    ProviderStrategy,
    ToolStrategy,
)
from langchain_core.callbacks import BaseCallbackHandler, BaseCallbackManager
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import LLMResult
from langchain_core.runnables.config import var_child_runnable_config
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.config import get_config
from langgraph.errors import GraphInterrupt
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.runtime import Runtime, get_runtime
from langgraph.types import Command, interrupt

from ..actions import (
    OnExceed,
    aapply_resume,
    apply_resume,
    check_on_exceed,
    interrupt_payload,
    logger,
    stop_message,
    wants_stop,
)
from ..cache.result import MISS, ResultCache, collecting_cache_hits
from ..compat import default_params, graph_run_executor, ls_params, provider_strategy_for
from ..context import current_config, current_session, named_session
from ..engine.admission import _NOT_RUN, Admission, ModelCall, ToolAdmission
from ..engine.budgets import Budgets, attributes_from_metadata
from ..engine.guard import Guard
from ..engine.keeper import keeper
from ..engine.limits import Limits
from ..engine.records import CallRecord, Outcome
from ..errors import GuardError
from ..ledger import Ledger
from ..pricing.tools import declared_price
from ..telemetry.langsmith import note_tool_cost
from .call import (
    OWNER,
    Answer,
    ToolOwner,
    annotate,
    attempts,
    cap_place,
    choices,
    cost_breakdown,
    failed_before_running,
    max_output,
    model_name,
    read_answer,
    read_timeout,
    retried,
    tool_result,
    with_output_cap,
)
from .callback import _finish_reasons
from .dispatch import async_twin, dispatching_async, go_first

__all__ = ["GuardMiddleware"]

# agent runs whose span is open: beyond, the oldest is ended (a run that failed elsewhere)
_MAX_OPEN_AGENT_RUNS = 1024
# the tool call a traced middleware runs now: (its telemetry, its span's key)
_TOOL_SPAN: ContextVar[tuple[Any, UUID] | None] = ContextVar("agent_guard_tool_span",
                                                             default=None)


def _parent_run_id() -> Any:
    """The LangChain run the current node runs in (the tools node), if any: a tool call
    answered from the cache gets its span under that run's."""
    try:
        manager = get_config().get("callbacks")
    except RuntimeError:
        return None
    return getattr(manager, "parent_run_id", None)


def _log_end(exc: GuardError, session: str) -> None:
    logger.warning("agent-guard: %s The run of session %r ended (on_exceed='end').",
                   exc, session)


def _answer(response: Any) -> AIMessage | None:
    result = getattr(response, "model_response", response)  # ExtendedModelResponse
    if isinstance(result, AIMessage):
        return result
    for message in getattr(result, "result", None) or ():
        if isinstance(message, AIMessage):
            return message
    return None


@dataclass(slots=True)
class _AgentRun:
    """An agent run the middleware traces: its ``invoke_agent`` span's key (the run id
    the telemetry knows it by), its session, and whether an error ended its span (the
    run may still go on: a retry or fallback middleware outside this one caught it)."""

    key: UUID
    session: str
    failed: bool = False


class AgentRunAbandoned(Exception):
    """The status of an ``invoke_agent`` span whose run ended without a hook of the
    middleware seeing it end: its stream was closed between two steps, or a node
    without the middleware's hooks failed."""


# True while a garbage collection pass runs: a finalizer it runs may have interrupted
# code holding a lock a span's end takes, so that end waits for the next run
_collecting = False


def _gc_phase(phase: str, info: Any) -> None:
    global _collecting
    _collecting = phase == "start"


gc.callbacks.append(_gc_phase)


def _run_key() -> tuple[tuple[int, str], Any] | None:
    """(a key of the running agent run, the object it names) or None outside a graph:
    LangGraph gives each invocation its own ``Runtime.control`` (nested graphs share
    their caller's, so the agent's namespace is part of the key)."""
    try:
        control = getattr(get_runtime(), "control", None)
        config = get_config()
    except RuntimeError:
        return None
    if control is None:
        return None
    namespace = str((config.get("configurable") or {}).get("checkpoint_ns") or "")
    return (id(control), namespace.rpartition("|")[0]), control


_TRACED: dict[type, type] = {}


def _traced(cls: type) -> type:
    """``cls`` with the ``after_agent`` hooks that end a traced run's span (a class of
    the same name, so the agent's node names do not change)."""
    if getattr(cls, "_ends_agent_span", False):
        return cls
    found = _TRACED.get(cls)
    if found is None:
        def after_agent(self: GuardMiddleware, state: AgentState, runtime: Runtime) -> None:
            self._end_agent_run()

        async def aafter_agent(self: GuardMiddleware, state: AgentState,
                               runtime: Runtime) -> None:
            await self._aend_agent_run()

        found = _TRACED[cls] = type(cls.__name__, (cls,), {
            "after_agent": after_agent, "aafter_agent": aafter_agent,
            "_ends_agent_span": True, "__module__": cls.__module__,
            "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return found


#: the action ended the run (``on_exceed="end"``): no pause, no resume value
_ENDED = object()


def _end_or_go_on(exc: GuardError, resume: Any) -> dict[str, Any] | None:
    """The end jump after a pending tool refusal, or None: an extension lets the run go
    on."""
    if resume is not _ENDED and not wants_stop(resume):
        return None
    return {"jump_to": "end", "messages": [stop_message(exc)]}


def _outcome(result: Any) -> Outcome:
    failed = isinstance(result, ToolMessage) and result.status == "error"
    return "error" if failed else "ok"


class GuardMiddleware(AgentMiddleware):
    """Caps, step limits and an action at the cap for a ``create_agent`` agent.

    ``on_exceed``: ``"raise"`` (default), ``"end"`` (the agent answers with the
    reason and stops), or ``"interrupt"`` (pause; resume with
    ``Command(resume={"extend_usd": 1.0})`` or ``{"stop": True}``).
    ``shrink_to_fit`` lowers a call's ``max_tokens`` to what the budget still
    covers (down to ``Limits.min_output_tokens``) instead of refusing it.
    ``cache`` with ``cache_tools={"web_search": "pricing"}`` answers a repeated
    tool call (same tenant, same arguments) from the cache without running the
    tool; the call still counts toward the tool caps and loop detection.
    ``public_tools`` share results across tenants. ``telemetry`` (a
    :class:`~agent_guard.telemetry.GuardTelemetry`) gets the callback's spans and
    metrics: an ``invoke_agent`` span per agent run, under it a ``chat`` span per model
    attempt and an ``execute_tool`` span per tool call (with ``agent_guard.cache.hit``
    and ``agent_guard.cache.saved_usd`` for one answered from the cache). A callback
    handler with the same telemetry on the agent makes the agent and tool spans then.
    ``annotate_runs`` (default) writes each answer's cost where LangSmith reads it, as
    :class:`GuardCallbackHandler` does.
    """

    def __new__(cls, *args: Any, telemetry: Any = None, **kwargs: Any) -> GuardMiddleware:
        # with telemetry, an ``after_agent`` hook ends the run's ``invoke_agent`` span; a
        # middleware without telemetry adds no node to the agent's graph
        return super().__new__(_traced(cls) if telemetry is not None else cls)

    def __init__(
        self,
        guard: Guard | None = None,
        *,
        limits: Limits | Budgets | None = None,
        ledger: str | Ledger | None = None,
        on_exceed: OnExceed = "raise",
        session_id: str | None = None,
        shrink_to_fit: bool = True,
        cache: ResultCache | None = None,
        cache_tools: Mapping[str, str] | None = None,
        public_tools: Collection[str] = (),
        telemetry: Any = None,
        annotate_runs: bool = True,
    ) -> None:
        super().__init__()
        self.telemetry = telemetry
        self.annotate_runs = annotate_runs
        if cache_tools and cache is None:
            raise ValueError("cache_tools needs cache=ResultCache(...)")
        for ttl_class in (cache_tools or {}).values():
            assert cache is not None
            cache.cacheable(ttl_class)  # fail now on an unknown TTL class
        self.cache = cache
        self.cache_tools = dict(cache_tools or {})
        self.public_tools = frozenset(public_tools)
        if guard is None:
            guard = Guard(limits=limits, ledger=ledger if ledger is not None else "memory://")
        elif limits is not None or ledger is not None:
            raise ValueError("pass either guard=... or limits=/ledger=..., not both")
        self.guard = guard
        self.on_exceed = check_on_exceed(on_exceed)
        self.session_id = session_id
        self.shrink_to_fit = shrink_to_fit
        self._stopped: dict[str, GuardError] = {}  # session -> tool refusal to end on
        self._lock = threading.Lock()
        # the agent runs this middleware traces: id(run control) -> (control, its span)
        self._agent_runs: OrderedDict[tuple[int, str], tuple[Any, _AgentRun]] = (
            OrderedDict())
        # runs whose graph run LangGraph let go of, to end (see _abandoned)
        self._orphans: queue.SimpleQueue[tuple[tuple[int, str], _AgentRun]] = (
            queue.SimpleQueue())

    # -- steps and the end jump ------------------------------------------------------

    def _stop_pending(self, session: str) -> dict[str, Any] | None:
        """Act on a tool refusal of the last turn, here, once for all its tool calls.

        The refused calls were answered with a "Not run" ``ToolMessage`` (so the
        history stays valid whatever happens next); ``end`` ends here, ``raise``
        raises here, ``interrupt`` pauses here (one pause for the turn, however many
        of its parallel tool calls were refused: LangGraph takes a single
        ``Command(resume=...)`` only for a single pending interrupt). After an
        extension the model runs again and sees which calls were not run."""
        pending = self._pending_stop(session)
        if pending is None:
            return None
        exc, resume = pending
        if resume is not _ENDED:
            apply_resume(self.guard, session, resume, getattr(exc, "dimension", None))
        return _end_or_go_on(exc, resume)

    async def _astop_pending(self, session: str) -> dict[str, Any] | None:
        """:meth:`_stop_pending` with the extension awaited on the ledger."""
        pending = self._pending_stop(session)
        if pending is None:
            return None
        exc, resume = pending
        if resume is not _ENDED:
            await aapply_resume(self.guard, session, resume, getattr(exc, "dimension", None))
        return _end_or_go_on(exc, resume)

    def _pending_stop(self, session: str) -> tuple[GuardError, Any] | None:
        """(the pending tool refusal, the resume value of its pause, or ``_ENDED``)."""
        with self._lock:
            exc = self._stopped.get(session)
        if exc is None:
            return None
        if self.on_exceed == "raise":
            self._stopped.pop(session, None)
            raise exc
        if self.on_exceed == "interrupt":
            resume = self._pause(exc, session, "tools")
            with self._lock:
                self._stopped.pop(session, None)
            return exc, resume
        with self._lock:
            self._stopped.pop(session, None)
        _log_end(exc, session)
        return exc, _ENDED

    def _pause(self, exc: GuardError, session: str, node: str) -> Any:
        try:
            return interrupt(interrupt_payload(exc, node))
        except GraphInterrupt:
            logger.warning("agent-guard: %s The run of session %r paused "
                           "(on_exceed='interrupt').", exc, session)
            raise

    @hook_config(can_jump_to=["end"])
    def before_model(self, state: AgentState, runtime: Runtime) -> dict[str, Any] | None:
        if self.telemetry is None:
            return self._before_model()
        with self._stops_end_the_run():
            self._agent_run()  # the run's span opens with its first step
            return self._before_model()

    @hook_config(can_jump_to=["end"])
    async def abefore_model(self, state: AgentState, runtime: Runtime
                            ) -> dict[str, Any] | None:
        if self.telemetry is None:
            return await self._abefore_model()
        async with self._astops_end_the_run():
            self._agent_run()
            return await self._abefore_model()

    def _before_model(self) -> dict[str, Any] | None:
        session = current_session(self.session_id)
        pending = self._stop_pending(session)
        if pending is not None:
            return pending
        while True:
            try:
                self.guard.before_step(session, attributes=self._attributes())
                return None
            except GuardError as exc:
                if not self._retry_after(exc, session):
                    return {"jump_to": "end", "messages": [stop_message(exc)]}

    async def _abefore_model(self) -> dict[str, Any] | None:
        session = current_session(self.session_id)
        pending = await self._astop_pending(session)
        if pending is not None:
            return pending
        while True:
            try:
                await self.guard.abefore_step(session, attributes=self._attributes())
                return None
            except GuardError as exc:
                if not await self._aretry_after(exc, session):
                    return {"jump_to": "end", "messages": [stop_message(exc)]}

    def _retry_after(self, exc: GuardError, session: str) -> bool:
        """Apply the action; True means the caps were raised and the call may go on."""
        resume = self._resume_after(exc, session)
        if resume is _ENDED:
            return False
        apply_resume(self.guard, session, resume)
        return not wants_stop(resume)

    async def _aretry_after(self, exc: GuardError, session: str) -> bool:
        """:meth:`_retry_after` with the extension awaited on the ledger."""
        resume = self._resume_after(exc, session)
        if resume is _ENDED:
            return False
        await aapply_resume(self.guard, session, resume)
        return not wants_stop(resume)

    def _resume_after(self, exc: GuardError, session: str) -> Any:
        """Raise, end (``_ENDED``) or pause: the resume value of the pause."""
        if self.on_exceed == "raise":
            raise exc
        if self.on_exceed == "end":
            _log_end(exc, session)
            return _ENDED
        return self._pause(exc, session, "model")

    # -- the agent run's spans (what the callback handler's telemetry makes) -------------

    def _agent_run(self) -> _AgentRun | None:
        """The running agent run's ``invoke_agent`` span, opened on first use. None
        without telemetry, outside a graph run, or when a callback handler with this
        telemetry follows the run: the agent and tool spans are its to make then."""
        telemetry = self.telemetry
        if telemetry is None or not telemetry.tracing:
            return None
        key = _run_key()
        if key is None:
            return None
        with self._lock:
            found = self._agent_runs.get(key[0])
        if found is not None and found[0] is key[1]:
            return found[1]
        if not self._orphans.empty():
            self._reap()
        config = current_config()
        if telemetry.traces(getattr(config.get("callbacks"), "parent_run_id", None)):
            return None
        meta = config.get("metadata") or {}
        run = _AgentRun(uuid.uuid4(), named_session(meta, self.session_id) or "")
        # an agent run inside a tool call traced with this telemetry: its spans go under
        # that call's span (no span of its own, as the callback's nested runs)
        outer = _TOOL_SPAN.get()
        inside = outer[1] if outer is not None and outer[0] is telemetry else None
        dropped = []
        with self._lock:
            found = self._agent_runs.get(key[0])
            if found is not None and found[0] is key[1]:
                return found[1]
            telemetry.chain_start(run.key, inside, meta.get("lc_agent_name"), run.session,
                                  attributes_from_metadata(meta, self.guard.attribute_names))
            self._agent_runs[key[0]] = (key[1], run)
            while len(self._agent_runs) > _MAX_OPEN_AGENT_RUNS:
                dropped.append(self._agent_runs.popitem(last=False)[1][1])
        for old in dropped:  # runs that ended elsewhere (an error in another node)
            telemetry.chain_end(old.key)
        anchor = graph_run_executor(config)
        if anchor is not None:  # no hook runs when a stream is closed between steps
            with contextlib.suppress(TypeError):
                weakref.finalize(anchor, self._abandoned, key[0], run).atexit = False
        return run

    def _abandoned(self, key: tuple[int, str], run: _AgentRun) -> None:
        """LangGraph let go of ``run``'s graph run: its span, if still open, ends as
        abandoned. Called from a finalizer: at once when the run's last reference went
        (its stream closed), else (a garbage collection pass, which may run inside a
        lock the end takes) at the next run this middleware opens."""
        self._orphans.put((key, run))  # SimpleQueue: safe inside a finalizer
        if not _collecting:
            self._reap()

    def _reap(self) -> None:
        """End the spans of the runs :meth:`_abandoned` noted (each once: a run that
        ended by a hook is no longer listed)."""
        while True:
            try:
                key, run = self._orphans.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                found = self._agent_runs.get(key)
                if found is None or found[1] is not run:
                    continue
                del self._agent_runs[key]
            # a run whose span an error ended: only its anchor goes
            self.telemetry.chain_end(run.key, None,
                                     None if run.failed else AgentRunAbandoned())

    def _own_run(self, *, over: bool = False, failing: bool = False) -> _AgentRun | None:
        """The running agent run this middleware traces: forgotten (``over``), or marked
        failed (``failing``: None when its span ended already)."""
        key = _run_key() if self.telemetry is not None else None
        if key is None:
            return None
        with self._lock:
            found = self._agent_runs.get(key[0])
            if found is None or found[0] is not key[1]:
                return None
            run = found[1]
            if over:
                del self._agent_runs[key[0]]
            if failing:
                if run.failed:
                    return None
                run.failed = True
        return run

    def _fail_agent_run(self, error: BaseException) -> None:
        """An error left a hook: the run's span ends with it, as the callback's root run
        ends on its error (its spans after this one, if the run goes on, stay under it)."""
        run = self._own_run(failing=True)
        if run is not None:
            self.telemetry.chain_end(run.key, self.guard.usage(run.session), error,
                                     keep_anchor=True)

    async def _afail_agent_run(self, error: BaseException) -> None:
        run = self._own_run(failing=True)
        if run is not None:
            try:
                usage = await self.guard.ausage(run.session)
            except Exception:  # the span still ends (a ledger down, a cancelled task)
                usage = None
            self.telemetry.chain_end(run.key, usage, error, keep_anchor=True)

    def _end_agent_run(self, error: BaseException | None = None) -> None:
        """End the run's ``invoke_agent`` span with the session's usage, as the callback
        handler's telemetry ends it (at the end of the run, on a stop, at a pause)."""
        run = self._own_run(over=True)
        if run is not None:
            self.telemetry.chain_end(run.key, None if run.failed else self.guard.usage(
                run.session), error)

    async def _aend_agent_run(self, error: BaseException | None = None) -> None:
        run = self._own_run(over=True)
        if run is not None:
            self.telemetry.chain_end(run.key, None if run.failed else await self.guard.ausage(
                run.session), error)

    @contextlib.contextmanager
    def _stops_end_the_run(self) -> Iterator[None]:
        """A pause ends the run's span; an error leaving the hook (a refusal raised to
        the caller, a tool's or the model's error, a cancellation) ends it with that
        error."""
        try:
            yield
        except GraphInterrupt:
            self._end_agent_run()
            raise
        except BaseException as exc:
            self._fail_agent_run(exc)
            raise

    @contextlib.asynccontextmanager
    async def _astops_end_the_run(self) -> AsyncIterator[None]:
        try:
            yield
        except GraphInterrupt:
            await self._aend_agent_run()
            raise
        except BaseException as exc:
            await self._afail_agent_run(exc)
            raise

    def _span_parent(self) -> Any:
        """What a span of this middleware goes under: its agent run's span, else the
        LangChain run the current node runs in."""
        run = self._agent_run()
        return run.key if run is not None else _parent_run_id()

    def _refused_span(self, request: ModelRequest, call: ModelCall, exc: GuardError) -> None:
        """A refused call's ``chat`` span (the model never ran, so no callback saw it)."""
        telemetry = self.telemetry
        if telemetry is None:
            return
        run_id = uuid.uuid4()
        telemetry.chat_start(
            run_id, self._span_parent(), model=call.model, provider=call.provider,
            max_tokens=max_output(call.params, ls_params(request.model,
                                                         **request.model_settings)),
            session=call.session, attributes=call.attributes,
            messages=call.messages if telemetry.capture_content else None)
        telemetry.refused(run_id, exc)

    # -- model calls -------------------------------------------------------------------

    def _describe(self, request: ModelRequest, session: str) -> ModelCall:
        model = request.model
        settings = request.model_settings
        ls = ls_params(model, **settings)
        params = _request_params(model, settings)
        messages = ([request.system_message] if request.system_message else []) + list(
            request.messages)
        tools = [t if isinstance(t, dict) else convert_to_openai_tool(t)
                 for t in request.tools] or None
        if request.response_format is not None:
            params, tools = _with_structured_output(request, params, tools)
        name = model_name(params, ls)
        if name == "unknown":
            name = str(getattr(model, "model_name", None) or getattr(model, "model", None)
                       or "unknown")
        provider = ls.get("ls_provider")
        cap = max_output(params, ls)
        bounded = cap_place(model, settings) is not None
        if cap is None and not bounded:
            # no cap the request is sure to carry: the worst case is the model's own
            # max output (price book), and a lower cap could not be sent
            price = self.guard.prices.resolve(name, provider)
            cap = getattr(price, "max_output_tokens", None)
            bounded = cap is None  # unknown: the default, and max_tokens at call time
        # the requests its client may send (1 + its SDK's retries), as the callback reads
        # them from the serialized model
        tries = attempts({"id": [type(model).__name__],
                          "kwargs": {"max_retries": getattr(model, "max_retries", None)}})
        return ModelCall(
            session=session,
            model=name,
            provider=provider,
            attempts=tries,
            messages=messages,
            tools=tools,
            max_output_tokens=cap,
            node="model",
            can_shrink=self.shrink_to_fit and bounded,
            attributes=self._attributes(),
            params=params,
        )

    def _bounded(self, request: ModelRequest, admission: Admission) -> ModelRequest:
        """The request to send: when the model sets no output cap, or the budget covers
        only part of it, the cap reserved, per choice, in the field its provider's
        request really carries."""
        call = admission.call
        if call.max_output_tokens is not None and not admission.shrunk:
            return request
        per_choice = max(1, admission.max_output_tokens // choices(call.params))
        model, settings = with_output_cap(request.model, request.model_settings, per_choice)
        return request.override(model=model, model_settings=settings)

    def _refused(self, exc: GuardError, session: str) -> Any:
        """None to try again (caps raised), or the response that ends the run."""
        if self._retry_after(exc, session):
            return None
        return ModelResponse(result=[stop_message(exc)])

    async def _arefused(self, exc: GuardError, session: str) -> Any:
        if await self._aretry_after(exc, session):
            return None
        return ModelResponse(result=[stop_message(exc)])

    def _admit(self, request: ModelRequest, session: str
               ) -> tuple[Admission | None, ModelRequest, Any]:
        """(admission, request to send, or the response to return instead)."""
        while True:
            call = self._describe(request, session)
            try:
                admission = self.guard.before_model_call(call)
                break
            except GuardError as exc:
                self._refused_span(request, call, exc)
                instead = self._refused(exc, session)
                if instead is not None:
                    return None, request, instead
        return admission, self._bounded(request, admission), None

    async def _aadmit(self, request: ModelRequest, session: str
                      ) -> tuple[Admission | None, ModelRequest, Any]:
        while True:
            call = self._describe(request, session)
            try:
                admission = await self.guard.abefore_model_call(call)
                break
            except GuardError as exc:
                self._refused_span(request, call, exc)
                instead = await self._arefused(exc, session)
                if instead is not None:
                    return None, request, instead
        return admission, self._bounded(request, admission), None

    def _read(self, admission: Admission, response: Any) -> Answer:
        message = _answer(response)
        return read_answer([[message]] if message is not None else [], None,
                           admission.call.model, self.guard.tokens)

    def _settle(self, admission: Admission, response: Any) -> None:
        answer = self._read(admission, response)
        self.guard.after_model_call(admission, answer.usage, output_tokens=answer.counted,
                                    response_model=answer.model, cache_hit=answer.cache_hit)

    async def _asettle(self, admission: Admission, response: Any) -> None:
        answer = self._read(admission, response)
        await asyncio.shield(self.guard.aafter_model_call(  # see _AttemptGate._aon_llm_end
            admission, answer.usage, output_tokens=answer.counted,
            response_model=answer.model, cache_hit=answer.cache_hit))

    def wrap_model_call(self, request: ModelRequest,
                        handler: Callable[[ModelRequest], Any]) -> Any:
        if self.telemetry is None:
            return self._wrap_model_call(request, handler)
        with self._stops_end_the_run():
            return self._wrap_model_call(request, handler)

    async def awrap_model_call(self, request: ModelRequest,
                               handler: Callable[[ModelRequest], Awaitable[Any]]) -> Any:
        if self.telemetry is None:
            return await self._awrap_model_call(request, handler)
        async with self._astops_end_the_run():
            return await self._awrap_model_call(request, handler)

    def _wrap_model_call(self, request: ModelRequest,
                         handler: Callable[[ModelRequest], Any]) -> Any:
        session = current_session(self.session_id)
        admission, request, instead = self._admit(request, session)
        if admission is None:
            return instead
        gate = _AttemptGate(self, admission, {"thread_id": threading.get_ident(),
                                              "frame": sys._getframe()})
        try:  # (its hold renewed while the wrapped call runs: it may outrun its lease)
            with gate.installed(), _held(gate, self.guard, admission, **gate.running):
                response = handler(request)
        except BaseException as exc:
            gate.end_open(exc)
            if not admission.finished:
                self.guard.model_call_failed(admission, error=exc)
            raise
        gate.end_open(None)
        if not admission.finished:  # no attempt was seen (the gate saw no model run)
            self._settle(admission, response)
        return response

    async def _awrap_model_call(self, request: ModelRequest,
                                handler: Callable[[ModelRequest], Awaitable[Any]]) -> Any:
        session = current_session(self.session_id)
        admission, request, instead = await self._aadmit(request, session)
        if admission is None:
            return instead
        gate = _AttemptGate(self, admission, {"task": asyncio.current_task()})
        try:  # (its hold renewed while the wrapped call runs: it may outrun its lease)
            with gate.installed(), _held(gate, self.guard, admission, **gate.running):
                response = await handler(request)
        except BaseException as exc:
            if gate.open_attempts():
                await asyncio.to_thread(gate.end_open, exc)
            if not admission.finished:
                await asyncio.shield(self.guard.amodel_call_failed(admission, error=exc))
            raise
        if gate.open_attempts():
            await asyncio.to_thread(gate.end_open, None)
        if not admission.finished:
            await self._asettle(admission, response)
        return response

    # -- tool calls ---------------------------------------------------------------------

    def _tool_refused(self, exc: GuardError, request: ToolCallRequest, session: str,
                      started: bool = False) -> ToolMessage | None:
        """The ToolMessage to answer with; the action waits for ``before_model``. "Not
        run" only for a call refused before its tool was called; one refused after
        (a model call inside the tool, a retry of it) is "Stopped": the tool may have
        run, and done what it does."""
        with self._lock:
            self._stopped.setdefault(session, exc)  # before_model acts on it
        call = request.tool_call
        return ToolMessage(content=f"{'Stopped' if started else 'Not run'}: {exc}",
                           tool_call_id=call["id"] or "",
                           name=call["name"], status="error")

    def _cached(self, request: ToolCallRequest, span: uuid.UUID | None = None
                ) -> tuple[Any, ToolMessage | None, int]:
        """(lookup arguments, the cached answer or None, what the answer saved). A hit
        gets a tool span of its own unless the call has one open (``span``)."""
        call = request.tool_call
        ttl_class = self.cache_tools.get(call["name"])
        if self.cache is None or ttl_class is None:
            return None, None, 0
        try:
            tenant = self.cache.tenant_from(get_config())
        except RuntimeError:
            tenant = self.cache.tenant_from(None)
        where: dict[str, Any] = {"tenant": tenant, "ttl_class": ttl_class,
                 "public": call["name"] in self.public_tools}
        hit, saved = self.cache.lookup_tool(call["name"], call.get("args", {}), **where)
        if hit is MISS:
            return where, None, 0
        # what the cache holds is a ToolMessage's content (text, or a list of text and
        # content blocks); anything else is another writer's entry: a miss
        if not (isinstance(hit, str) or (isinstance(hit, list) and
                all(isinstance(part, str | dict) for part in hit))):
            self.cache.io.refused("not a tool message's content", "tool result")
            return where, None, 0
        answer = ToolMessage(content=hit, tool_call_id=call["id"] or "", name=call["name"])
        if self.telemetry is not None and span is None:
            self.telemetry.cached_tool_call(
                call["name"], call["id"], saved, self._span_parent(),
                arguments=call.get("args"),
                result=hit, session=current_session(self.session_id), attributes=self._attributes())
        return where, answer, saved

    def _caches(self, call: Mapping[str, Any]) -> bool:
        """Whether this tool's calls go through the result cache."""
        return self.cache is not None and call["name"] in self.cache_tools

    def _store(self, request: ToolCallRequest, where: Any, result: Any) -> None:
        if where is None or self.cache is None:
            return
        if isinstance(result, ToolMessage) and result.status != "error":
            call = request.tool_call
            self.cache.put_tool(call["name"], call.get("args", {}), result.content, **where)

    @contextlib.contextmanager
    def _owning(self, call: Mapping[str, Any], span: UUID | None = None) -> Iterator[None]:
        """While the tool runs: this middleware counted it (a callback handler on the same
        ledger that sees it does not count it again), and an agent run inside it traced
        with the same telemetry goes under its span."""
        token = OWNER.set(ToolOwner(self.guard, call.get("id")))
        inside = _TOOL_SPAN.set((self.telemetry, span)) if span is not None else None
        try:
            yield
        finally:
            if inside is not None:
                _TOOL_SPAN.reset(inside)
            OWNER.reset(token)

    def _attributes(self) -> dict[str, str]:
        """The run's scope values (team, user, feature...) from its config metadata."""
        return attributes_from_metadata(current_config().get("metadata"),
                                        self.guard.attribute_names)

    def _done_kwargs(self, request: ToolCallRequest, admission: ToolAdmission,
                     outcome: Outcome, hits: list[int] | None, result: Any
                     ) -> dict[str, Any]:
        """How the tool call ended, for ``tool_call_done``: a ``cached_tool`` that
        answered from its cache inside it (``hits``) makes it a cache hit with what that
        saved; a priced call is settled from its result."""
        saved = 0
        if hits and outcome == "ok":
            outcome, saved = "cache_hit", sum(hits)
        return {"outcome": outcome, "saved_nano": saved, "started_at": admission.started_at,
                "node": "tools", "attributes": admission.attributes, "admission": admission,
                "result": tool_result(result)}

    def _settled_in_run(self, request: ToolCallRequest, admission: ToolAdmission,
                        hits: list[int], span: UUID | None = None, **running: Any
                        ) -> ToolCallRequest:
        """The request with a tool whose own run settles it (see :class:`_ToolRunGate`):
        a priced tool, or an unpriced one when a run again inside the call must be counted
        (a tool-call cap reads the count) or traced (``span``); any other request as it
        is: the common unpriced, uncapped call pays for no gate. ``running``: what the
        lease keeper watches while the call runs (its thread and frame, or its task)."""
        tool = request.tool
        if tool is None or (admission.reservation is None and span is None
                            and not self.guard.tool_calls_capped):
            return request
        gate = _ToolRunGate(self, request, admission, hits, running, span)
        callbacks = tool.callbacks
        if isinstance(callbacks, BaseCallbackManager):
            callbacks = callbacks.copy()
            callbacks.add_handler(gate, inherit=False)
        else:
            callbacks = [*(callbacks or ()), gate]
        return request.override(tool=tool.model_copy(update={"callbacks": callbacks}))

    def _tool_done(self, request: ToolCallRequest, admission: ToolAdmission,
                   outcome: Outcome, hits: list[int] | None = None, result: Any = None
                   ) -> CallRecord:
        return self.guard.tool_call_done(admission.session, request.tool_call["name"],
                                         **self._done_kwargs(request, admission, outcome,
                                                             hits, result))

    async def _atool_done(self, request: ToolCallRequest, admission: ToolAdmission,
                          outcome: Outcome, hits: list[int] | None = None,
                          result: Any = None) -> CallRecord:
        return await self.guard.atool_call_done(
            admission.session, request.tool_call["name"],
            **self._done_kwargs(request, admission, outcome, hits, result))

    # -- tool spans, when this middleware traces the agent run ---------------------------

    def _tool_span(self, request: ToolCallRequest, session: str,
                   attributes: Mapping[str, str]) -> uuid.UUID | None:
        """Open the tool call's ``execute_tool`` span under the agent run's, as the
        callback handler does at ``on_tool_start``; None when this middleware does not
        trace the run."""
        run = self._agent_run() if self.telemetry is not None else None
        if run is None:
            return None
        call = request.tool_call
        span = uuid.uuid4()
        self.telemetry.tool_start(span, run.key, call["name"], call.get("id"),
                                  call.get("args", {}), session=session,
                                  attributes=attributes)
        return span

    def _tool_span_end(self, span: uuid.UUID | None, record: CallRecord | None,
                       result: Any = None, error: BaseException | None = None,
                       saved: int | None = None) -> None:
        if span is None:
            return
        if saved is not None:  # answered from the cache
            self.telemetry.tool_cache_hit(span, saved)
        self.telemetry.tool_end(span, error, result=result, record=record)

    def wrap_tool_call(self, request: ToolCallRequest,
                       handler: Callable[[ToolCallRequest], ToolMessage | Command]
                       ) -> ToolMessage | Command:
        if self.telemetry is None:
            return self._wrap_tool_call(request, handler)
        with self._stops_end_the_run():
            return self._wrap_tool_call(request, handler)

    async def awrap_tool_call(self, request: ToolCallRequest,
                              handler: Callable[[ToolCallRequest],
                                                Awaitable[ToolMessage | Command]]
                              ) -> ToolMessage | Command:
        if self.telemetry is None:
            return await self._awrap_tool_call(request, handler)
        async with self._astops_end_the_run():
            return await self._awrap_tool_call(request, handler)

    def _wrap_tool_call(self, request: ToolCallRequest,
                        handler: Callable[[ToolCallRequest], ToolMessage | Command]
                        ) -> ToolMessage | Command:
        session = current_session(self.session_id)
        attributes = self._attributes()
        call = request.tool_call
        while True:
            span = self._tool_span(request, session, attributes)
            started = False  # the handler was called: the tool may have run
            try:
                admission = self.guard.before_tool_call(
                    session, call["name"], call.get("args", {}), attributes=attributes,
                    price=declared_price(getattr(request.tool, "metadata", None),
                                         call["name"]))
                where, hit, saved = self._cached(request, span)
                if hit is not None:
                    record: CallRecord | None = self._tool_done(request, admission, "ok", [saved])
                    self._tool_span_end(span, record, hit, saved=saved)
                    return hit
                try:
                    running: dict[str, Any] = {"thread_id": threading.get_ident(),
                                               "frame": sys._getframe()}
                    with collecting_cache_hits() as hits, self._owning(call, span), _held(
                            self, self.guard, admission, **running):
                        started = True
                        result = handler(self._settled_in_run(request, admission, hits, span,
                                                              **running))
                except GraphInterrupt as exc:
                    # paused inside the tool (its run settled it: it may have spent), or
                    # before it ran (released): either way it runs again on resume
                    if not admission.finished:
                        self.guard.tool_call_not_run(admission)
                    self._tool_span_end(span, _run_record(admission), error=exc)
                    raise
                except BaseException as exc:
                    # it may have reached the paid API: charged its worst case
                    record = _run_record(admission) if admission.finished else \
                        self._tool_done(request, admission, "error")
                    self._tool_span_end(span, record, error=exc)
                    raise
                self._store(request, where, result)
                record = _run_record(admission) if admission.finished else \
                    self._tool_done(request, admission, _outcome(result), hits, result)
                self._tool_span_end(span, record, result)
                return result
            except GuardError as exc:
                if span is not None:
                    self.telemetry.refused(span, exc)
                answer = self._tool_refused(exc, request, session, started)
                if answer is not None:
                    return answer

    async def _awrap_tool_call(self, request: ToolCallRequest,
                               handler: Callable[[ToolCallRequest],
                                                 Awaitable[ToolMessage | Command]]
                               ) -> ToolMessage | Command:
        session = current_session(self.session_id)
        attributes = self._attributes()
        call = request.tool_call
        while True:
            span = self._tool_span(request, session, attributes)
            started = False  # the handler was called: the tool may have run
            try:
                admission = await self.guard.abefore_tool_call(
                    session, call["name"], call.get("args", {}), attributes=attributes,
                    price=declared_price(getattr(request.tool, "metadata", None),
                                         call["name"]))
                # the cache's I/O in a thread: a slow cache store never blocks the loop
                where, hit, saved = (await asyncio.to_thread(self._cached, request, span)
                                     if self._caches(call) else (None, None, 0))
                if hit is not None:
                    record: CallRecord | None = await self._atool_done(
                        request, admission, "ok", [saved])
                    self._tool_span_end(span, record, hit, saved=saved)
                    return hit
                try:
                    task = asyncio.current_task()
                    with collecting_cache_hits() as hits, self._owning(call, span), _held(
                            self, self.guard, admission, task=task):
                        started = True
                        result = await handler(self._settled_in_run(
                            request, admission, hits, span, task=task))
                except GraphInterrupt as exc:
                    if not admission.finished:
                        await self.guard.atool_call_not_run(admission)
                    self._tool_span_end(span, _run_record(admission), error=exc)
                    raise
                except BaseException as exc:
                    record = _run_record(admission) if admission.finished else \
                        await asyncio.shield(self._atool_done(request, admission, "error"))
                    self._tool_span_end(span, record, error=exc)
                    raise
                if where is not None:
                    await asyncio.to_thread(self._store, request, where, result)
                # shielded: a cancellation now still settles and records the call
                record = _run_record(admission) if admission.finished else \
                    await asyncio.shield(self._atool_done(request, admission,
                                                          _outcome(result), hits, result))
                self._tool_span_end(span, record, result)
                return result
            except GuardError as exc:
                if span is not None:
                    self.telemetry.refused(span, exc)
                answer = self._tool_refused(exc, request, session, started)
                if answer is not None:
                    return answer


class _ToolRunGate(BaseCallbackHandler):
    """Settles a priced tool call admitted by :class:`GuardMiddleware` at the end of
    the tool's own run, and writes what it cost on that run, where LangSmith reads it
    (``usage_metadata.total_cost`` of its metadata, :func:`note_tool_cost`). An unpriced
    call gets one only when a tool-call cap or the middleware's span needs its runs
    (see ``_settled_in_run``): each run counted and recorded, nothing to write on it.

    A handler of that one tool call (given to a copy of the tool, not inherited by the
    runs inside it): it moves itself before the run's other handlers when the run
    starts (:func:`go_first`), so the cost is on the run before LangChain's tracer sends
    it, on sync and async paths. A call whose arguments failed validation never ran:
    released (a priced one; an unpriced run stays counted and is recorded as failed,
    as under the callback). An interrupt is left to the middleware (it runs again on resume).

    Middleware inside ``GuardMiddleware`` may run the tool again within the one call
    (``ToolRetryMiddleware`` after a failure that was billed): each further run is
    admitted at the tool's price when it starts (its refusal raised before it runs) and
    settled at its own end, as the callback handler charges each run. When the
    middleware traces the call (``span``), each run has its ``execute_tool`` span, as
    under the callback: the first run ends the middleware's span with what that run cost
    (and its error), a further run opens its own beside it and ends it at its own end."""

    @property  # LangChain declares a plain attribute; a property reads the moment it is read
    def run_inline(self) -> bool:  # type: ignore[override]
        """False, but for the tool's end on async paths (in list order: see
        :mod:`.dispatch`). LangChain's async dispatch awaits the coroutine twins on the
        loop (the guard's async ledger operations): no executor thread."""
        return dispatching_async(_TOOL_ENDS)

    def __init__(self, middleware: GuardMiddleware, request: ToolCallRequest,
                 admission: ToolAdmission, hits: list[int], running: dict[str, Any],
                 span: UUID | None = None) -> None:
        super().__init__()
        self.middleware = middleware
        self.request = request
        self.admission = admission
        self.hits = hits
        self.running = running  # what the lease keeper watches (see _held)
        self.run_id: UUID | None = None  # the first run: settles the middleware's admission
        # run -> (its admission, its metadata, its handlers (its tracers))
        self.runs: dict[UUID, tuple[ToolAdmission, dict[str, Any] | None, Any]] = {}
        # the middleware's span of the call (the first run's), and run -> its span
        self.span = span
        self.spans: dict[UUID, UUID] = {}

    def _further(self, run_id: UUID) -> bool:
        """Whether ``run_id`` is another run of the tool in this call, to admit."""
        if self.run_id is None:
            self.run_id = run_id
            return False
        return run_id not in self.runs

    def _started(self, run_id: UUID, admission: ToolAdmission,
                 metadata: dict[str, Any] | None) -> None:
        self.runs[run_id] = (admission, metadata if isinstance(metadata, dict) else None,
                             go_first(self, run_id))
        if admission is not self.admission and admission.reservation is not None:
            # its hold is renewed while the call runs
            keeper.watch(self, self.middleware.guard, admission, **self.running)
        if self.span is None:
            return
        if admission is self.admission:
            self.spans[run_id] = self.span
            return
        run = self.middleware._agent_run()
        if run is not None:  # a further run: its own span beside the first's
            call = self.request.tool_call
            span = self.spans[run_id] = uuid.uuid4()
            telemetry = self.middleware.telemetry
            telemetry.tool_start(span, run.key, call["name"], call.get("id"),
                                 call.get("args", {}), session=admission.session,
                                 attributes=admission.attributes)
            # an agent run inside this run finds the call's span (_TOOL_SPAN): its
            # spans go under this run's
            telemetry.reanchor(self.span, span)

    def _span_end(self, run_id: UUID, record: CallRecord | None,
                  error: BaseException | None = None, result: Any = None) -> None:
        """End the run's ``execute_tool`` span with what the run cost."""
        span = self.spans.pop(run_id, None)
        if span is not None:  # the call's span keeps its anchor until the call ends
            self.middleware.telemetry.tool_end(span, error, result=result, record=record,
                                               keep_anchor=span == self.span)

    def _refused(self) -> None:
        self.raise_error = True  # the refusal reaches the run: the tool does not run

    def _admit(self) -> dict[str, Any]:
        call = self.request.tool_call
        return {"session": self.admission.session, "tool": call["name"],
                "args": call.get("args", {}), "attributes": self.admission.attributes,
                "price": self.admission.price}

    async def _aon_tool_start(self, serialized: dict[str, Any], input_str: str, *,
                              run_id: UUID, metadata: dict[str, Any] | None = None,
                              **kwargs: Any) -> None:
        admission = self.admission
        if self._further(run_id):
            try:
                admission = await self.middleware.guard.abefore_tool_call(**self._admit())
            except GuardError:
                self._refused()
                raise
        self._started(run_id, admission, metadata)

    @async_twin(_aon_tool_start)
    def on_tool_start(self, serialized: dict[str, Any], input_str: str, *, run_id: UUID,
                      metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        admission = self.admission
        if self._further(run_id):
            try:
                admission = self.middleware.guard.before_tool_call(**self._admit())
            except GuardError:
                self._refused()
                raise
        self._started(run_id, admission, metadata)

    def _ending(self, run_id: UUID, error: BaseException | None = None
                ) -> ToolAdmission | None:
        """The admission this end settles, if it is this gate's to settle. A tool that
        paused itself (``interrupt()`` in its body: a ``GraphInterrupt``) started, and
        may have called its paid API before pausing: settled as a failed call."""
        run = self.runs.get(run_id)
        if run is None or run[0].finished:
            return None
        if run[0] is not self.admission and run[0].reservation is not None:
            keeper.unwatch(self, run[0])
        return run[0]

    def _hits(self, admission: ToolAdmission) -> list[int] | None:
        return self.hits if admission is self.admission else None

    async def _aon_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        admission = self._ending(run_id)
        if admission is not None:
            self._noted(run_id, await self.middleware._atool_done(
                self.request, admission, _outcome(output), self._hits(admission), output),
                result=output)

    @async_twin(_aon_tool_end)
    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        admission = self._ending(run_id)
        if admission is not None:
            self._noted(run_id, self.middleware._tool_done(
                self.request, admission, _outcome(output), self._hits(admission), output),
                result=output)

    async def _aon_tool_error(self, error: BaseException, *, run_id: UUID,
                              **kwargs: Any) -> None:
        admission = self._ending(run_id, error)
        if admission is None:
            return
        if admission.reservation is not None and failed_before_running(error):
            await self.middleware.guard.atool_call_not_run(admission)
            self._span_end(run_id, None, error)
            return
        self._noted(run_id, await self.middleware._atool_done(self.request, admission,
                                                              "error"), error)

    @async_twin(_aon_tool_error)
    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        admission = self._ending(run_id, error)
        if admission is None:
            return
        # its arguments did not validate: never ran (released; an unpriced call's
        # count stays charged, as the callback leaves it: recorded as failed)
        if admission.reservation is not None and failed_before_running(error):
            self.middleware.guard.tool_call_not_run(admission)
            self._span_end(run_id, None, error)
            return
        self._noted(run_id, self.middleware._tool_done(self.request, admission, "error"),
                    error)

    def _noted(self, run_id: UUID, record: CallRecord, error: BaseException | None = None,
               result: Any = None) -> None:
        admission, metadata, handlers = self.runs[run_id]
        if admission.price is not None:  # an unpriced call has no cost to show
            note_tool_cost(metadata, record, run_id, handlers)
        self._span_end(run_id, record, error, result)


_TOOL_ENDS = frozenset({"on_tool_end", "on_tool_error"})


def _run_record(admission: ToolAdmission) -> CallRecord | None:
    """The record a priced call was settled with at the end of its own run
    (:class:`_ToolRunGate`); None when it was released there (it never ran)."""
    record = admission.state.record
    return None if record is _NOT_RUN else record


@contextlib.contextmanager
def _held(owner: object, guard: Guard, admission: Admission | ToolAdmission,
          **running: Any) -> Iterator[None]:
    """A model call's or a priced tool's hold is renewed by the lease keeper while the
    call runs (it may run longer than ``Limits.lease_seconds``: a slow model, a sandbox,
    a slow crawl)."""
    if admission.reservation is None:
        yield
        return
    keeper.watch(owner, guard, admission, **running)
    try:
        yield
    finally:
        keeper.unwatch(owner, admission)


def _with_structured_output(request: ModelRequest, params: dict[str, Any],
                            tools: list[Any] | None) -> tuple[dict[str, Any], list[Any] | None]:
    """(params, tools) with what the agent binds for ``request.response_format`` after
    the middleware (``create_agent``'s model node): the schema as a ``response_format``
    (provider strategy), or as a tool per schema (tool strategy). The provider bills it
    as prompt tokens: it is part of the call's worst case."""
    fmt: Any = request.response_format
    if not isinstance(fmt, ToolStrategy | ProviderStrategy | AutoStrategy):
        fmt = AutoStrategy(schema=fmt)
    if isinstance(fmt, AutoStrategy):
        fmt = (ProviderStrategy(schema=fmt.schema)
               if provider_strategy_for(request.model, request.tools)
               else ToolStrategy(schema=fmt.schema))
    if isinstance(fmt, ProviderStrategy):
        return {**fmt.to_model_kwargs(), **params}, tools
    schema_tools = [convert_to_openai_tool(OutputToolBinding.from_schema_spec(spec).tool)
                    for spec in fmt.schema_specs]
    return params, [*(tools or ()), *schema_tools]


def _request_params(model: Any, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The request's parameters as the provider gets them: the model's defaults
    (``service_tier``, ``response_format`` bound on it...) and this call's settings."""
    return {**(default_params(model) or {}), **settings}


_INLINE_EVENTS = frozenset({"on_llm_end", "on_llm_new_token"})


async def _thread_to_the_end(admit: Callable[[], None]) -> None:
    """Run ``admit`` in a worker thread (as ``asyncio.to_thread``) and wait for it even
    when the caller is cancelled meanwhile, then raise the cancellation. The thread
    cannot be stopped: a reservation it makes after its caller gave up would be
    registered after the wrapped call's cleanup ended the open attempts, and its hold
    would wait out its lease. The executor's future is not a task, so the sweep of
    ``asyncio.run`` (which cancels tasks) leaves it to be waited for."""
    loop = asyncio.get_running_loop()
    admitting = loop.run_in_executor(None, contextvars.copy_context().run, admit)
    cancelled: asyncio.CancelledError | None = None
    while not admitting.done():
        try:
            await asyncio.wait((admitting,))  # never cancels what it waits for
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        raise cancelled
    admitting.result()  # its refusal, if it refused


class _AttemptGate(BaseCallbackHandler):
    """Admits each model attempt made inside one ``wrap_model_call`` at its own price.

    Middleware inside ``GuardMiddleware`` (``ModelFallbackMiddleware``,
    ``ModelRetryMiddleware``) calls the model again, or another model, within the one
    request the middleware admitted. The gate is a callback handler on that call's
    config: the first attempt at the admitted model uses the middleware's admission;
    every other attempt is admitted at its own model's price (raising the refusal before
    it is sent) and settled from its own answer, with the reading the callback handler
    uses. On async paths LangChain's dispatch gets coroutines for ``on_chat_model_start``
    and ``on_llm_end`` (:class:`.dispatch.async_twin`): the usual attempt runs on the
    loop with the guard's async ledger operations, without an executor thread; another
    attempt is admitted in a thread. The ledger is never called sync on the loop."""

    raise_error: bool = True

    @property  # LangChain declares a plain attribute; a property reads the moment it is read
    def run_inline(self) -> bool:  # type: ignore[override]
        """False, but on async paths for ``on_llm_end`` (in list order, before a tracer
        reads the answer: see :mod:`.dispatch`) and ``on_llm_new_token`` (it only notes a
        time)."""
        return dispatching_async(_INLINE_EVENTS)

    def __init__(self, middleware: GuardMiddleware, admission: Admission,
                 running: dict[str, Any]) -> None:
        super().__init__()
        self.middleware = middleware
        self.guard = middleware.guard
        self.admission = admission
        # what the lease keeper watches while the wrapped call runs (see _held): each
        # attempt admitted here is held while it runs, as the middleware's admission is.
        # Forgotten when the call is over: the wrap's frame (or task) holds the gate, and
        # a cycle through it would keep what the frame refers to (the graph run LangGraph
        # lets go of when a stream is closed) until a garbage collection
        self.running = running
        self.first_used = False
        self.runs: dict[UUID, Admission] = {}
        self.refused: dict[UUID, GuardError] = {}
        # run -> [started, read timeout, first chunk] (time.monotonic()): how many of the
        # SDK's own retries the wait for the answer held (see call.retried)
        self.timing: dict[UUID, list[Any]] = {}
        self.lock = threading.Lock()
        self.admitting = threading.Lock()  # one decision per run (see admission_for)
        # the agent run's span the middleware traces, for the chat spans to go under
        run = middleware._agent_run() if middleware.telemetry is not None else None
        self.span_parent = run.key if run is not None else None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        config = var_child_runnable_config.get() or {}
        callbacks = config.get("callbacks")
        # first: it settles and writes the cost before a tracer reads the answer; and
        # inherited: a model run nested in a chain inside the call (an inner middleware's
        # with_structured_output) is one of its attempts too
        if isinstance(callbacks, BaseCallbackManager):
            manager: Any = callbacks.copy()
            manager.handlers.insert(0, self)
            manager.inheritable_handlers.insert(0, self)
        elif isinstance(callbacks, list):
            manager = [self, *callbacks]
        else:
            manager = [self]
        token = var_child_runnable_config.set({**config, "callbacks": manager})
        owner = OWNER.set(self)
        try:
            yield
        finally:
            OWNER.reset(owner)
            var_child_runnable_config.reset(token)
            self.running = {}  # (see __init__)

    def open_attempts(self) -> bool:
        return bool(self.runs)

    async def _aon_chat_model_start(self, serialized: dict[str, Any],
                                    messages: list[list[BaseMessage]], *, run_id: UUID,
                                    metadata: dict[str, Any] | None = None, **kwargs: Any
                                    ) -> None:
        """On async paths: the first attempt at the admitted model uses the admission (no
        ledger operation: it runs on the loop, no thread); another attempt is admitted
        at its own price in a thread."""
        params: Mapping[str, Any] = kwargs.get("invocation_params") or {}
        if run_id in self.runs or (not self.first_used and model_name(
                params, metadata or {}, serialized) == self.admission.call.model):
            self._on_chat_model_start(serialized, messages, run_id=run_id,
                                      metadata=metadata, **kwargs)
        else:
            await _thread_to_the_end(functools.partial(
                self._on_chat_model_start, serialized, messages, run_id=run_id,
                metadata=metadata, **kwargs))

    @async_twin(_aon_chat_model_start)
    def on_chat_model_start(self, serialized: dict[str, Any],
                            messages: list[list[BaseMessage]], *, run_id: UUID,
                            metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self._on_chat_model_start(serialized, messages, run_id=run_id, metadata=metadata,
                                  **kwargs)

    def _on_chat_model_start(self, serialized: dict[str, Any],
                             messages: list[list[BaseMessage]], *, run_id: UUID,
                             metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        params: Mapping[str, Any] = kwargs.get("invocation_params") or {}
        meta = metadata or {}
        flat = [m for prompt in messages for m in prompt]
        telemetry = self.middleware.telemetry
        if telemetry is not None:
            call = self.admission.call
            telemetry.chat_start(
                run_id, self.span_parent or kwargs.get("parent_run_id"),
                model=model_name(params, meta, serialized),
                provider=meta.get("ls_provider") or call.provider,
                max_tokens=max_output(params, meta) or self.admission.max_output_tokens,
                session=call.session, attributes=call.attributes,
                messages=flat if telemetry.capture_content else None)
        try:
            self.admission_for(run_id, serialized, flat, params, meta)
        except GuardError as exc:
            if telemetry is not None:
                telemetry.refused(run_id, exc)
            raise

    def admission_for(self, run_id: UUID, serialized: Mapping[str, Any] | None,
                      messages: list[Any], params: Mapping[str, Any],
                      meta: Mapping[str, Any]) -> Admission:
        """The admission of one model run inside the wrapped call (raising its refusal),
        decided once: for this gate's ``on_chat_model_start`` and for a
        :class:`GuardCallbackHandler` on the same ledger that sees the same run (it
        joins instead of charging the call again; on async paths the two run at once)."""
        with self.admitting:
            with self.lock:
                known = self.runs.get(run_id)
            if known is not None:
                return known
            refused = self.refused.get(run_id)
            if refused is not None:
                raise refused
            model = model_name(params, meta, serialized)
            call = self.admission.call
            first, self.first_used = not self.first_used, True
            if first and model == call.model:
                admission = self.admission
            else:
                if first:  # an inner middleware changed the model: the admission is not used
                    self.guard.model_call_failed(self.admission)
                attempt = replace(
                    call, model=model, provider=meta.get("ls_provider") or call.provider,
                    messages=messages, tools=params.get("tools") or None,
                    max_output_tokens=max_output(params, meta), can_shrink=False,
                    run_id=str(run_id), params=params)
                try:
                    admission = self.guard.before_model_call(attempt)  # a refusal raises
                except GuardError as exc:
                    self.refused[run_id] = exc
                    raise
                if admission.reservation is not None:  # it may outrun its lease too
                    keeper.watch(self, self.guard, admission, **self.running)
            with self.lock:
                self.runs[run_id] = admission
                self.timing[run_id] = [time.monotonic(), read_timeout(serialized), 0.0]
            return admission

    def on_llm_new_token(self, token: Any, *, run_id: UUID, **kwargs: Any) -> None:
        timing = self.timing.get(run_id)
        if timing is not None and not timing[2]:
            timing[2] = time.monotonic()

    def _ending(self, run_id: UUID, response: LLMResult
                ) -> tuple[Admission, dict[str, Any]] | None:
        """(the run's admission, how to settle it) or None when it is not this gate's to
        settle."""
        with self.lock:
            admission = self.runs.pop(run_id, None)
            timing = self.timing.pop(run_id, None)
        if admission is None or admission.finished:
            return None
        self._unwatch(admission)
        answer = read_answer(response.generations, response.llm_output,
                             admission.call.model, self.guard.tokens)
        return admission, {
            "usage": answer.usage, "output_tokens": answer.counted,
            "response_model": answer.model, "cache_hit": answer.cache_hit,
            "retried": 0 if timing is None else retried(
                timing[0], timing[2], timing[1], admission.call.attempts)}

    async def _aon_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any
                           ) -> None:
        """On async paths: settled with the guard's async operation, on the loop (inline,
        so in list order: before a tracer listed after the gate reads the answer)."""
        ending = self._ending(run_id, response)
        if ending is not None:
            # shielded: a run cancelled now (a sibling branch failed) still settles and
            # records what it was charged (the settle may have reached the ledger)
            record = await asyncio.shield(self.guard.aafter_model_call(ending[0],
                                                                       **ending[1]))
            self._ended(run_id, response, record)

    @async_twin(_aon_llm_end)
    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        ending = self._ending(run_id, response)
        if ending is not None:
            self._ended(run_id, response, self.guard.after_model_call(ending[0],
                                                                      **ending[1]))

    def _ended(self, run_id: UUID, response: LLMResult, record: CallRecord) -> None:
        """The settled run's span and its cost written where LangSmith reads it."""
        telemetry = self.middleware.telemetry
        generations = [g for prompt in response.generations for g in prompt]
        split = cost_breakdown(self.guard, record) if (
            self.middleware.annotate_runs or telemetry is not None) else None
        if telemetry is not None:
            telemetry.chat_end(
                run_id, record, _finish_reasons(response), split,
                output=[getattr(g, "message", None) or g.text for g in generations]
                if telemetry.capture_content else None)
        if self.middleware.annotate_runs:
            annotate(generations, self.guard, record, split)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        with self.lock:
            admission = self.runs.pop(run_id, None)
            self.timing.pop(run_id, None)
        if admission is not None and not admission.finished:
            self._unwatch(admission)
            record = self.guard.model_call_failed(admission, error=error)
            if self.middleware.telemetry is not None:
                self.middleware.telemetry.chat_end(run_id, record)

    def _unwatch(self, admission: Admission) -> None:
        """An attempt admitted here is ending: its hold is no longer renewed (the
        middleware's own admission is unwatched when the wrapped call ends)."""
        if admission is not self.admission and admission.reservation is not None:
            keeper.unwatch(self, admission)

    def end_open(self, error: BaseException | None) -> None:
        """The wrapped call is over: an attempt still open got no end callback
        (cancelled): ended with the call's error, else as abandoned."""
        with self.lock:
            open_ = list(self.runs.values())
            self.runs.clear()
        for admission in open_:
            if admission.finished or admission is self.admission:
                continue
            self._unwatch(admission)
            if error is None:
                self.guard.model_call_abandoned(admission)
            else:
                self.guard.model_call_failed(admission, error=error)
