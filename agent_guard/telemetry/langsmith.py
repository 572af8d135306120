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


def note_tool_cost(metadata: dict[str, Any], record: Any) -> None:
    """Put a priced tool call's cost where LangSmith reads it
    (``usage_metadata.total_cost`` of the run's metadata), in the metadata dict LangChain
    handed the handlers of that run when it started: LangChain's tracer keeps that dict
    as its run's ``extra["metadata"]`` and sends it when the run ends, so a handler
    listed before the tracer has its cost on the run. Called from the tool's end."""
    try:
        metadata["usage_metadata"] = {"total_cost": float(record.cost_nano) / 1e9}
        prior = metadata.get("agent_guard")
        metadata["agent_guard"] = {
            **(prior if isinstance(prior, dict) else {}),
            "cost_usd": str(record.cost_usd), "reserved_usd": f"{record.reserved_nano / 1e9:f}",
            "estimated": record.usage_estimated}
    except Exception:  # telemetry never fails the call it describes
        logger.warning("agent-guard: could not note a tool's cost on its run", exc_info=True)
