"""LangSmith: a tool run's cost and cache outcome where LangSmith reads them.

LangSmith takes the cost of a run that is not a model call from the run's
``extra.metadata.usage_metadata`` (``total_cost``; shown as "Other" cost and rolled
up to the trace and project). Called from inside a running tool, :func:`note_tool_run`
writes there, on the run LangChain's tracer made for that tool (the one
``langsmith.run_helpers.get_current_run_tree()`` names while the tool runs), with
agent-guard's cache outcome beside it in ``metadata["agent_guard"]``. Without
``langsmith``, or outside a traced run, it does nothing; it never fails the tool.
"""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

__all__ = ["note_tool_cost", "note_tool_run"]

logger = logging.getLogger("agent_guard")


def note_tool_run(*, cost_usd: Decimal | str | float | None, cache_hit: bool,
                  saved_nano: int = 0) -> None:
    """Record on the current tool's LangSmith run what it cost (``cost_usd``; ``0`` for
    an answer from the cache, ``None`` when unknown) and what a cache hit saved."""
    try:
        from langsmith.run_helpers import get_current_run_tree
    except ImportError:
        return
    try:
        run: Any = get_current_run_tree()
        if run is None or getattr(run, "run_type", None) != "tool":
            return
        extra = run.extra if isinstance(run.extra, dict) else {}
        # a new dict: LangChain hands one metadata dict to every handler of a run
        metadata = dict(extra.get("metadata") or {})
        if cost_usd is not None:
            metadata["usage_metadata"] = {"total_cost": float(Decimal(str(cost_usd)))}
        metadata["agent_guard"] = {"cache_hit": cache_hit,
                                   "saved_usd": float(saved_nano) / 1e9}
        extra["metadata"] = metadata
        run.extra = extra
    except Exception:  # telemetry never fails the call it describes
        logger.warning("agent-guard: could not note a tool's cost on its LangSmith run",
                       exc_info=True)


def note_tool_cost(metadata: dict[str, Any] | None, record: Any, run_id: Any = None,
                   handlers: Any = None) -> None:
    """Put a priced tool call's cost where LangSmith reads it
    (``usage_metadata.total_cost`` of the run's metadata): in the metadata dict LangChain
    handed the handlers of that run when it started, and in the metadata of the run
    each tracer among ``handlers`` (the run's handler list) keeps for ``run_id``
    (``run_map``; LangChain's tracer may keep a copy of the dict). The tracer sends its
    run when the run ends: called from the tool's end, by a handler the end reaches
    first (:func:`agent_guard.langchain.dispatch.go_first`)."""
    try:
        prior = (metadata or {}).get("agent_guard")
        noted = {"usage_metadata": {"total_cost": float(record.cost_nano) / 1e9},
                 "agent_guard": {
                     **(prior if isinstance(prior, dict) else {}),
                     "cost_usd": str(record.cost_usd),
                     "reserved_usd": f"{record.reserved_nano / 1e9:f}",
                     "estimated": record.usage_estimated}}
        if metadata is not None:
            metadata.update(noted)
        for handler in handlers or ():
            run_map = getattr(handler, "run_map", None)
            run = run_map.get(str(run_id)) if isinstance(run_map, dict) else None
            extra = getattr(run, "extra", None)
            if isinstance(extra, dict):
                kept = extra.get("metadata")
                if isinstance(kept, dict):
                    kept.update(noted)
                else:
                    extra["metadata"] = dict(noted)
    except Exception:  # telemetry never fails the call it describes
        logger.warning("agent-guard: could not note a tool's cost on its run", exc_info=True)
