"""agent-guard: FinOps guardrails for LangChain and LangGraph agents.

Hard caps per session (and per user, team, feature or globally, per window)
on dollars, tokens, model calls and tool calls, enforced before a call spends
anything, on a ledger shared across threads, processes and hosts.

The names below are the public API: the guard and its caps, the three ways to add
it to an agent, the price book, the records it emits, and the errors. The rest lives
in the subpackages: ``agent_guard.finops`` (usage store, reports, FOCUS, alerts),
``agent_guard.routing``, ``agent_guard.cache``, ``agent_guard.telemetry``,
``agent_guard.ledger``, ``agent_guard.pricing``, ``agent_guard.testing``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from .engine.budgets import Budgets
from .engine.guard import Guard
from .engine.limits import Limits
from .engine.records import CallRecord
from .errors import (
    BudgetExceeded,
    GuardError,
    GuardStop,
    LedgerUnavailable,
    LoopDetected,
    OutputCapExceeded,
    SessionRequired,
    StepLimitExceeded,
    UnknownModelPrice,
)
from .pricing import PriceBook

if TYPE_CHECKING:
    from .finops import UsageStore
    from .langchain.callback import GuardCallbackHandler
    from .langchain.middleware import GuardMiddleware
    from .langgraph.graph import budget_gate, guarded_graph
    from .routing import ModelRouter

#: the public names that live in the adapters: imported on first use, so that
#: ``import agent_guard.engine`` or ``agent_guard.ledger`` (a worker, the CLI) does not
#: load LangChain and LangGraph
_ADAPTERS = {
    "GuardCallbackHandler": "agent_guard.langchain.callback",
    "GuardMiddleware": "agent_guard.langchain.middleware",
    "ModelRouter": "agent_guard.routing",
    "UsageStore": "agent_guard.finops",
    "budget_gate": "agent_guard.langgraph.graph",
    "guarded_graph": "agent_guard.langgraph.graph",
}

__version__ = "0.1.0"

__all__ = [
    "BudgetExceeded",
    "Budgets",
    "CallRecord",
    "Guard",
    "GuardCallbackHandler",
    "GuardError",
    "GuardMiddleware",
    "GuardStop",
    "LedgerUnavailable",
    "Limits",
    "LoopDetected",
    "ModelRouter",
    "OutputCapExceeded",
    "PriceBook",
    "SessionRequired",
    "StepLimitExceeded",
    "UnknownModelPrice",
    "UsageStore",
    "__version__",
    "budget_gate",
    "guarded_graph",
]

#: names that were importable from ``agent_guard`` before the public API was cut to
#: ``__all__``: still importable from here (with a DeprecationWarning), and from their
#: module for good
MOVED = {
    "Admission": "agent_guard.engine.admission",
    "CallbackAlert": "agent_guard.finops",
    "CostBreakdown": "agent_guard.pricing",
    "GuardedStateGraph": "agent_guard.langgraph",
    "Ledger": "agent_guard.ledger",
    "LogAlert": "agent_guard.finops",
    "MalformedUsage": "agent_guard.engine.usage",
    "ModelCall": "agent_guard.engine.admission",
    "ModelPrice": "agent_guard.pricing",
    "RouteDecision": "agent_guard.routing",
    "Rule": "agent_guard.routing",
    "SessionUsage": "agent_guard.engine.records",
    "ThresholdEvent": "agent_guard.engine.thresholds",
    "TokenCounter": "agent_guard.tokens",
    "Usage": "agent_guard.engine.usage",
    "WebhookAlert": "agent_guard.finops",
    "export_focus": "agent_guard.finops",
    "from_url": "agent_guard.ledger",
    "has_tools": "agent_guard.routing",
    "mentions": "agent_guard.routing",
    "prompt_tokens_above": "agent_guard.routing",
    "report": "agent_guard.finops",
    "validate_focus": "agent_guard.finops",
    "when": "agent_guard.routing",
}


def __getattr__(name: str) -> Any:
    adapter = _ADAPTERS.get(name)
    if adapter is not None:
        value = getattr(importlib.import_module(adapter), name)
        globals()[name] = value  # once: later lookups do not come here
        return value
    module = MOVED.get(name)
    if module is None:
        raise AttributeError(f"module 'agent_guard' has no attribute {name!r}")
    warnings.warn(f"agent_guard.{name} moved: import it from {module} "
                  f"(from {module} import {name})", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_ADAPTERS, *MOVED})
