"""When LangChain's async callback dispatch runs a guard handler's ``on_llm_end``.

The guard's handlers are sync handlers with ``run_inline=False``: on async paths
LangChain runs them in an executor thread, so their ledger operations never block the
event loop. But its async dispatch (``ahandle_event``) runs every *inline* handler
first, and LangSmith's ``LangChainTracer`` is inline: it read a model run's answer
before the guard had written the cost on it, so async runs reached LangSmith without
agent-guard's cost (sync dispatch goes in list order, and the guard's handler comes
first there).

:func:`ends_inline` fixes the order for ``on_llm_end`` only: while LangChain's async
dispatch handles that event, the handler says it is inline (so it runs in list order,
before a tracer listed after it) and hands LangChain a coroutine that runs the sync
method in a worker thread (so the loop is still never blocked). Every other event, and
every sync path, is dispatched as before. Both are read from LangChain's own dispatch
functions by identity (``ahandle_event``, ``_ahandle_event_for_handler``); when a
LangChain release renames them, the handler is simply dispatched as before (the cost
then reaches LangSmith on sync runs only), never run on the loop.

A tool run's end goes to its handlers in the order they were listed, and LangChain's
tracer sends the run as it has it then: a handler that writes a tool's cost on the run
(the callback handler, ``GuardMiddleware``'s per-call handler) calls :func:`go_first`
from its ``on_tool_start``, which moves it to the front of that tool run's handler list
(a list LangChain makes for that one tool call), so its ``on_tool_end`` comes before the
tracer's whatever the order the callbacks were given in. With :class:`ends_inline` on
``on_tool_end`` / ``on_tool_error`` it does on async paths too.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Callable
from contextvars import ContextVar
from types import FrameType, MethodType
from typing import Any

from ..compat import (
    LANGCHAIN_AHANDLE_EVENT_CODE,
    LANGCHAIN_AHANDLE_EVENT_FOR_HANDLER_CODE,
    LANGCHAIN_ASYNC_MODEL_START_CODES,
    LANGCHAIN_ASYNC_MODEL_START_LOCALS,
    LANGCHAIN_DISPATCH_HANDLERS_LOCAL,
    LANGCHAIN_HANDLE_EVENT_CODE,
)

__all__ = ["async_twin", "close_unstarted_starts", "dispatching_async", "dispatching_async_end",
           "ends_inline", "go_first"]

_HANDLE = LANGCHAIN_HANDLE_EVENT_CODE
_AHANDLE = LANGCHAIN_AHANDLE_EVENT_CODE
_AHANDLE_FOR_HANDLER = LANGCHAIN_AHANDLE_EVENT_FOR_HANDLER_CODE
_ENABLED = _AHANDLE is not None and _AHANDLE_FOR_HANDLER is not None
# the code that reads an ends_inline method on LangChain's async dispatch (a code object
# no frame runs when the dispatch is not recognised)
_AHANDLE_END_READER = _AHANDLE_FOR_HANDLER if _ENABLED else compile("", "<none>", "exec")


def dispatching_async_end() -> bool:
    """Whether the caller's caller is LangChain's async dispatch of a model's or a
    tool's end (``on_llm_end``, ``on_tool_end``, ``on_tool_error``; call it from a
    handler's ``run_inline``)."""
    return _dispatching(sys._getframe(2), _END)


def dispatching_async(events: frozenset[str]) -> bool:
    """Whether the caller's caller is LangChain's async dispatch of one of ``events``
    (a handler's ``run_inline``: an event cheap enough to run on the loop, e.g. noting
    the time of a streamed token, besides ``on_llm_end``, which :class:`ends_inline`
    moves to a thread)."""
    return _dispatching(sys._getframe(2), events)


_END = frozenset({"on_llm_end", "on_tool_end", "on_tool_error"})
#: (run id, handler list) of the tool start LangChain's async dispatch is handling, noted
#: in the dispatching task's context (the executor running a handler copies it)
_TOOL_START: ContextVar[tuple[Any, Any] | None] = ContextVar("agent_guard_tool_start",
                                                             default=None)


def _dispatching(frame: Any, events: frozenset[str]) -> bool:
    if not _ENABLED:
        return False
    # the dispatch reads run_inline in a comprehension (its own frame before Python
    # 3.12), a generator expression or _ahandle_event_for_handler: ahandle_event is at
    # most two frames up
    for _ in range(3):
        if frame is None:
            return False
        if frame.f_code is _AHANDLE:
            local = frame.f_locals
            event = local.get("event_name")
            if event == "on_tool_start":
                _TOOL_START.set(((local.get("kwargs") or {}).get("run_id"),
                                 local.get(LANGCHAIN_DISPATCH_HANDLERS_LOCAL)))
            return event in events
        frame = frame.f_back
    return False


def go_first(handler: Any, run_id: Any) -> list[Any] | None:
    """Called from ``handler.on_tool_start``: the tool run's later events (its end,
    its error) go to ``handler`` before the other handlers, a tracer listed before it
    included. Sync dispatch hands the handler list to ``on_tool_start`` from a frame
    or two up; async dispatch noted it when it read ``run_inline``. Moving the handler
    from where the dispatch loop stands to the front keeps the loop's next handler
    the same. Returns the list (the run's end goes to it), or None when neither is
    found (the handler stays where it was)."""
    handlers = None
    frame: FrameType | None = sys._getframe(1)
    for _ in range(4):
        if frame is None:
            break
        if frame.f_code is _HANDLE:
            local = frame.f_locals
            if local.get("event_name") == "on_tool_start" and \
                    (local.get("kwargs") or {}).get("run_id") == run_id:
                handlers = local.get(LANGCHAIN_DISPATCH_HANDLERS_LOCAL)
            break
        frame = frame.f_back
    if handlers is None:
        noted = _TOOL_START.get()
        if noted is not None and noted[0] == run_id:
            handlers = noted[1]
    if not isinstance(handlers, list):
        return None
    for i, h in enumerate(handlers):
        if h is handler:
            if i:
                del handlers[i]
                handlers.insert(0, handler)
            break
    return handlers


def close_unstarted_starts() -> None:
    """Called by an inline handler (``raise_error=True``) just before it raises from a
    model's start: on LangChain's async dispatch, the start events of the handlers after
    it were already made as coroutines that will now never run; close them, so Python
    does not report them as never awaited when they are collected (they would not have
    run either way). Anywhere else (sync dispatch, or a LangChain release that renamed
    the dispatch) it does nothing."""
    frame: FrameType | None = sys._getframe(1)
    for _ in range(8):  # the handler, _ahandle_event_for_handler, ahandle_event, the manager
        if frame is None:
            return
        if frame.f_code in LANGCHAIN_ASYNC_MODEL_START_CODES:
            local = frame.f_locals
            for name in LANGCHAIN_ASYNC_MODEL_START_LOCALS:
                for coro in local.get(name) or ():
                    if inspect.iscoroutine(coro) and \
                            inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
                        coro.close()
            return
        frame = frame.f_back


class ends_inline:
    """Decorates a sync handler's ``on_llm_end``: read by LangChain's async dispatch, it
    is a coroutine function that runs the method in a worker thread; read anywhere else
    it is the method itself."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.__doc__ = func.__doc__
        self.__name__ = getattr(func, "__name__", "on_llm_end")

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self.func
        # (read on every sync dispatch too: one test of the caller, then the method)
        if sys._getframe(1).f_code is not _AHANDLE_END_READER:
            return MethodType(self.func, obj)
        bound = MethodType(self.func, obj)

        async def in_a_thread(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(bound, *args, **kwargs)
        return in_a_thread


class async_twin:
    """Decorates a sync handler method with a coroutine twin: read by LangChain's async
    dispatch, the twin (a coroutine function, which LangChain awaits on the loop: no
    executor thread; it must use the guard's async ledger operations, or hand a sync one
    to a thread itself); read anywhere else, the method itself. ``@async_twin(_aon_x)``
    on ``on_x``."""

    def __init__(self, twin: Callable[..., Any]) -> None:
        self.twin = twin
        self.func: Callable[..., Any] | None = None

    def __call__(self, func: Callable[..., Any]) -> async_twin:
        self.func = func
        self.__doc__ = func.__doc__
        return self

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        assert self.func is not None
        if obj is None:
            return self.func
        if _ENABLED and sys._getframe(1).f_code is _AHANDLE_FOR_HANDLER:
            return self.twin.__get__(obj, objtype)
        return self.func.__get__(obj, objtype)
