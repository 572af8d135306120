"""Every touch of another library's internals, in one place.

agent-guard relies on a few things LangChain, LangGraph and tiktoken do not promise:
private modules, underscore methods, the names of their internal functions and locals.
Each is reached here and nowhere else, with what it is for and the versions it was
checked against (:data:`CHECKED`). ``tests/test_compat.py`` has one test per entry that
fails, naming the entry, when an upgrade removes or changes it; fix the entry here (and
its users) and update :data:`CHECKED`.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Mapping
from types import CodeType
from typing import Any

from langchain_core.callbacks import manager as _lc_callback_manager
from langchain_core.load import _validation as _lc_validation

# RunnableCallable: LangGraph's node/edge callable (sync + async functions, config
# injection, trace=False); guarded_graph wraps every node and edge path in one.
from langgraph._internal._runnable import RunnableCallable

# BranchSpec: a conditional edge of a StateGraph builder (path, ends, input_schema);
# guarded_graph rewrites each so that a stopped run routes to its final node.
from langgraph.graph._branch import BranchSpec
from pydantic import main as _pydantic_main

__all__ = [
    "CHECKED",
    "LANGCHAIN_AHANDLE_EVENT_CODE",
    "LANGCHAIN_AHANDLE_EVENT_FOR_HANDLER_CODE",
    "LANGCHAIN_ASYNC_MODEL_START_CODES",
    "LANGCHAIN_ASYNC_MODEL_START_LOCALS",
    "LANGCHAIN_CALLBACK_ERROR",
    "LANGCHAIN_DISPATCH_CORO_NAMES",
    "LANGCHAIN_DISPATCH_HANDLERS_LOCAL",
    "LANGCHAIN_GATHERED_START_CORO_NAMES",
    "LANGCHAIN_HANDLE_EVENT_CODE",
    "LANGCHAIN_MODEL_CODE_DIR",
    "LANGCHAIN_RUN_MANAGER_LOCAL",
    "LANGCHAIN_SERIALIZE_VALUE_CODE",
    "LANGCHAIN_SHIELDED_CORO_NAMES",
    "LANGCHAIN_TOOL_ARGS_METHOD",
    "LANGCHAIN_TOOL_RUN_CODES",
    "LANGGRAPH_CALL_KEY",
    "PYDANTIC_FIELD_SETATTR",
    "STREAM_STEP_CORO_NAMES",
    "BranchSpec",
    "RunnableCallable",
    "default_params",
    "graph_run_executor",
    "ls_params",
    "tiktoken_constructor",
]

#: the versions every entry below was checked against
CHECKED = {
    "langchain-core": "1.8.3",
    "langchain": "1.5.2",
    "langgraph": "1.2.24",
    "langchain-openai": "1.7.4",
    "langchain-anthropic": "1.7.10",
    "tiktoken": "0.14.0",
    "pydantic": "2.14.4",
}

#: langchain-core: the directory of ``BaseChatModel`` / ``BaseLLM``'s code. A synchronous
#: model call runs in a frame from a file in it; the callback handler finds that frame to
#: tell the lease keeper the call is still running.
LANGCHAIN_MODEL_CODE_DIR = os.sep + os.path.join("langchain_core", "language_models") + os.sep

#: langchain-core (``callbacks/manager.py``): the coroutines that dispatch a callback
#: event to async handlers; the task running one of them is not the model call's task.
LANGCHAIN_DISPATCH_CORO_NAMES = frozenset({"ahandle_event", "_ahandle_event_for_handler"})

#: langchain-core (``callbacks/manager.py``): the async run managers' end events that
#: LangChain runs in a task of their own (``@shielded``: ``create_task`` with a copy of
#: the caller's context, then ``shield``); that task is not the model call's task either.
LANGCHAIN_SHIELDED_CORO_NAMES = frozenset({"on_llm_end", "on_llm_error", "on_chain_end",
                                           "on_chain_error", "on_retriever_end",
                                           "on_retriever_error"})

#: what a task runs that steps an async stream once: langchain-core's
#: ``RunnableParallel`` reads each branch's stream a chunk at a time in a task running
#: ``get_next_chunk`` (``runnables/base.py``); ``wait_for(stream.__anext__())`` (Python
#: 3.11) and ``create_task(anext(stream))`` run the generator's own step object (no
#: ``__name__``: its type's name). The stream goes on in the next such task: the one that
#: started it is not the model call's task either.
STREAM_STEP_CORO_NAMES = frozenset({"get_next_chunk", "async_generator_asend",
                                    "anext_awaitable"})

#: langchain-core (``language_models/llms.py``): ``BaseLLM.agenerate`` starts each
#: prompt's run in a task of its own (``asyncio.gather`` over
#: ``AsyncCallbackManager.on_llm_start``), over once the start is dispatched; the call
#: runs in the task awaiting that gather.
LANGCHAIN_GATHERED_START_CORO_NAMES = frozenset({"on_llm_start"})

#: langchain-core (``callbacks/manager.py``, ``handle_event``): the warning logged for
#: every exception a callback handler raises, even with ``raise_error=True``; a refusal
#: is filtered out of it (:mod:`agent_guard.actions`).
LANGCHAIN_CALLBACK_ERROR = "Error in %s.%s callback: %s"

#: langchain-core: the local of ``BaseChatModel._generate_with_cache`` (and the async
#: twin) that holds the run's callback manager when it calls ``cache.lookup`` /
#: ``cache.update``; the LLM caches read the run's metadata (its tenant) from it.
LANGCHAIN_RUN_MANAGER_LOCAL = "run_manager"


#: langchain-core (``callbacks/manager.py``): the local of ``handle_event`` /
#: ``ahandle_event`` holding the list of handlers an event goes to. For a tool run it is
#: the list its run manager dispatches the run's end from (``CallbackManager
#: .on_tool_start`` hands ``self.handlers`` to both), made by ``CallbackManager
#: .configure`` for that one tool call; a handler that writes a tool's cost moves
#: itself to its front (:func:`agent_guard.langchain.dispatch.go_first`).
LANGCHAIN_DISPATCH_HANDLERS_LOCAL = "handlers"

#: langchain-core ``BaseTool``: the method ``run`` / ``arun`` call to validate a call's
#: arguments before the tool runs (``Tool`` overrides it and calls it). An error whose
#: traceback goes from ``run`` / ``arun`` into it was raised before the tool ran.
LANGCHAIN_TOOL_ARGS_METHOD = "_to_args_and_kwargs"


def _tool_run_codes() -> frozenset[Any]:
    from langchain_core.tools import BaseTool

    return frozenset({BaseTool.run.__code__, BaseTool.arun.__code__})


#: langchain-core ``BaseTool.run`` / ``BaseTool.arun``: the frames a tool call runs in
#: (the lease keeper watches a priced tool's ``run`` frame while it executes).
LANGCHAIN_TOOL_RUN_CODES = _tool_run_codes()


def _code_of(module: Any, name: str) -> CodeType | None:
    return getattr(getattr(module, name, None), "__code__", None)


#: langchain-core (``load/_validation.py``): the code of ``_serialize_value``, the
#: serialiser of dict values behind ``dumpd`` (what LangSmith's tracer sends). It is the
#: one reader of ``CostedUsage.items()`` that gets agent-guard's costs
#: (:mod:`agent_guard.langchain.call`); None when a release moves it (then none does).
LANGCHAIN_SERIALIZE_VALUE_CODE = _code_of(_lc_validation, "_serialize_value")

#: langchain-core (``callbacks/manager.py``): the code of the sync and async dispatch of
#: one event (``handle_event``, ``ahandle_event``, a local ``event_name``) and of one handler
#: (``_ahandle_event_for_handler``, which reads the handler's ``on_llm_end``);
#: :mod:`agent_guard.langchain.dispatch` tells LangChain's async dispatch of
#: ``on_llm_end`` apart by them. None when a release renames them (then the handler is
#: dispatched as any other).
LANGCHAIN_HANDLE_EVENT_CODE = _code_of(_lc_callback_manager, "handle_event")
LANGCHAIN_AHANDLE_EVENT_CODE = _code_of(_lc_callback_manager, "ahandle_event")
LANGCHAIN_AHANDLE_EVENT_FOR_HANDLER_CODE = _code_of(_lc_callback_manager,
                                                    "_ahandle_event_for_handler")


def _async_model_start_codes() -> frozenset[CodeType]:
    manager = _lc_callback_manager.AsyncCallbackManager
    return frozenset(code for code in (_code_of(manager, "on_chat_model_start"),
                                       _code_of(manager, "on_llm_start")) if code is not None)


#: langchain-core (``callbacks/manager.py``): ``AsyncCallbackManager.on_chat_model_start``
#: / ``on_llm_start`` make one ``ahandle_event`` coroutine per handler (per prompt) into
#: the locals named here, then await the inline ones one by one and gather the others.
#: When an inline handler raises, the coroutines not yet awaited are dropped unstarted
#: (Python warns "coroutine 'ahandle_event' was never awaited"); the graph's run gate
#: closes them before it raises (:func:`agent_guard.langchain.dispatch
#: .close_unstarted_starts`). Empty when a release renames them (then nothing is closed).
LANGCHAIN_ASYNC_MODEL_START_CODES = _async_model_start_codes()
LANGCHAIN_ASYNC_MODEL_START_LOCALS = ("inline_tasks", "non_inline_tasks")


#: pydantic (``main.py``): the handler ``BaseModel.__setattr__`` memoises (in the class's
#: ``__pydantic_setattr_handlers__``) for a plain field of a model without assignment
#: validation: it stores the value in ``__dict__`` and adds the name to
#: ``__pydantic_fields_set__``. Where a class's memoised handler is this one, the
#: callback handler does the same two steps itself when it writes an answer's usage
#: (``agent_guard.langchain.call``); None when a release renames it (then it sets the
#: attribute as usual).
PYDANTIC_FIELD_SETATTR = getattr(_pydantic_main, "_model_field_setattr_handler", None)


#: langgraph: the ``configurable`` key under which each task of a graph run gets a
#: ``functools.partial`` whose ``submit`` keyword is a weak method of the run loop's
#: background executor. That executor is the one per-run object LangGraph lets go of when
#: the run's ``stream()`` ends however it ends (finished, failed, closed between steps);
#: the middleware ends an agent span that no hook ended when it is collected.
LANGGRAPH_CALL_KEY = "__pregel_call"


def graph_run_executor(config: Mapping[str, Any]) -> Any:
    """The running graph's background executor (see :data:`LANGGRAPH_CALL_KEY`), or None
    when LangGraph's internals differ (the caller then falls back to evicting old runs)."""
    call = (config.get("configurable") or {}).get(LANGGRAPH_CALL_KEY)
    submit = (getattr(call, "keywords", None) or {}).get("submit")
    if isinstance(submit, weakref.WeakMethod):
        submit = submit()
    return getattr(submit, "__self__", None)


def provider_strategy_for(model: Any, tools: Any) -> bool:
    """langchain ``create_agent``'s choice for a bare schema as ``response_format``
    (``factory._supports_provider_strategy``): True when the model is asked for the
    provider's structured output, False when for a tool call. True when that function is
    gone: the schema is counted as a ``response_format``, the larger of the two forms."""
    try:
        from langchain.agents.factory import _supports_provider_strategy
    except ImportError:
        return True
    try:
        return bool(_supports_provider_strategy(model, tools=list(tools or ())))
    except Exception:  # another provider's model profile that cannot be read
        return True


def ls_params(model: Any, **settings: Any) -> dict[str, Any]:
    """langchain-core ``BaseChatModel._get_ls_params``: the model's name, provider, type,
    temperature and max tokens as LangSmith reads them, for this call's settings."""
    return dict(model._get_ls_params(**settings))


def default_params(model: Any) -> Mapping[str, Any] | None:
    """langchain-openai (and most providers) ``_default_params``: the request parameters
    a model sends by default (``max_tokens``, ``service_tier``...), or None.

    langchain-anthropic's ``ChatAnthropic`` has no ``_default_params``: its
    ``_get_invocation_params()`` (what the callback reads) holds its request defaults
    (thinking, betas...)."""
    try:
        defaults = getattr(model, "_default_params", None)
        if defaults is None and hasattr(model, "_get_invocation_params"):
            defaults = model._get_invocation_params()
    except Exception:  # a property of another provider's model that cannot be read
        return None
    return defaults if isinstance(defaults, Mapping) else None


def tiktoken_constructor(name: str) -> Callable[[], dict[str, Any]]:
    """tiktoken ``tiktoken_ext.openai_public.<name>``: the function that builds an
    encoding's constructor arguments, loading its ranks with ``load_tiktoken_bpe`` (a
    global of the function, which :mod:`agent_guard.tokens` replaces with a reader of
    the bundled file)."""
    import tiktoken
    from tiktoken_ext import openai_public

    constructor: Callable[[], dict[str, Any]] = getattr(openai_public, name)
    if "load_tiktoken_bpe" not in constructor.__code__.co_names:
        raise RuntimeError(
            f"tiktoken {tiktoken.__version__} builds {name} without load_tiktoken_bpe; "
            "agent_guard.tokens cannot feed it the bundled file (upgrade agent-guard)"
        )
    return constructor
