"""The run context: which session, scope attributes and tenant a run belongs to.

Every adapter (the callback handler, the agent middleware, the graph wrapper, the
router, the caches) asks this module, so they agree on one answer:

- the **session**: LangGraph's ``thread_id``, else ``metadata["session_id"]``, else the
  adapter's own ``session_id`` (an explicit choice to pool runs without one); none at
  all is :class:`~agent_guard.errors.SessionRequired`, never a silent shared pool;
- the **attributes** that select budget scopes (``team``, ``user_id``...):
  :func:`~agent_guard.engine.budgets.attributes_from_metadata`;
- the **tenant** that keeps cached answers apart: a metadata key, else ``"_default"``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from types import FrameType
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.runnables import RunnableConfig
from langgraph.config import get_config

from .compat import LANGCHAIN_RUN_MANAGER_LOCAL
from .engine.budgets import attributes_from_metadata
from .errors import SessionRequired

__all__ = ["DEFAULT_TENANT", "attributes_from_metadata", "current_config", "current_session",
           "llm_run_metadata", "named_session", "session_from_metadata", "session_of",
           "tenant_of"]

#: the tenant of a run whose metadata names none
DEFAULT_TENANT = "_default"
# how far up the stack llm_run_metadata looks: lookup -> (Semantic) -> _key/_group ->
# _prefix -> _tenant -> here
_FRAMES_UP = 12


def named_session(metadata: Mapping[str, Any] | None, default: str | None) -> str | None:
    """The session a run's metadata names (``thread_id``, else ``session_id``), else
    ``default``; None when there is none."""
    if metadata:
        for key in ("thread_id", "session_id"):
            value = metadata.get(key)
            if value not in (None, ""):
                return str(value)
    return default if default not in (None, "") else None


def session_from_metadata(metadata: Mapping[str, Any] | None, default: str | None) -> str:
    """The session of a run: LangGraph's ``thread_id``, else ``metadata["session_id"]``,
    else the adapter's ``session_id`` (an explicit choice to pool runs without one).

    Raises :class:`~agent_guard.errors.SessionRequired` when there is none: a run is
    never pooled into a session it did not name."""
    session = named_session(metadata, default)
    if session is None:
        raise SessionRequired()
    return session


def session_of(config: RunnableConfig | Mapping[str, Any] | None,
               default: str | None = None) -> str:
    """The session of a graph run: ``thread_id``, else ``metadata["session_id"]``."""
    config = config or {}
    meta = dict(config.get("metadata") or {})
    thread = (config.get("configurable") or {}).get("thread_id")
    if thread is not None:
        meta["thread_id"] = thread
    return session_from_metadata(meta, default)


def current_config() -> RunnableConfig:
    """The config of the runnable (graph node, middleware hook) running now, or ``{}``."""
    try:
        return get_config()
    except RuntimeError:
        return {}


def current_session(default: str | None) -> str:
    """The session of the runnable running now (:func:`session_of` its config)."""
    return session_of(current_config(), default)


def tenant_of(metadata: Mapping[str, Any] | None, key: str) -> str:
    """The tenant a run's metadata names under ``key``, else :data:`DEFAULT_TENANT`."""
    value = (metadata or {}).get(key)
    return str(value) if value not in (None, "") else DEFAULT_TENANT


def llm_run_metadata() -> Mapping[str, Any] | None:
    """The metadata of the LLM run whose cache lookup or update is on the stack (call it
    from the cache's own method), or None.

    LangChain calls ``cache.lookup(prompt, llm_string)`` from
    ``BaseChatModel._generate_with_cache(..., run_manager=...)`` with nothing else; the
    run manager there holds the call's metadata (its own config's and inherited)."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(_FRAMES_UP):
        if frame is None:
            return None
        manager = frame.f_locals.get(LANGCHAIN_RUN_MANAGER_LOCAL) \
            if LANGCHAIN_RUN_MANAGER_LOCAL in frame.f_code.co_varnames else None
        if isinstance(manager, CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun):
            return manager.metadata or {}
        frame = frame.f_back
    return None
