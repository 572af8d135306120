"""agent-guard: FinOps guardrails for LangChain and LangGraph agents.

Hard caps per session (and per user, team, feature or globally, per window)
on dollars, tokens, model calls and tool calls, enforced before a call spends
anything, on a ledger shared across threads, processes and hosts.
"""

from .budgets import Budgets
from .errors import (
    BudgetExceeded,
    GuardError,
    LedgerUnavailable,
    LoopDetected,
    SessionRequired,
    StepLimitExceeded,
    UnknownModelPrice,
)
from .finops import (
    CallbackAlert,
    LogAlert,
    UsageStore,
    WebhookAlert,
    export_focus,
    report,
    validate_focus,
)
from .guard import Admission, Guard, ModelCall, ThresholdEvent
from .langchain.callback import GuardCallbackHandler, OutputCapExceeded
from .langchain.middleware import GuardMiddleware
from .langgraph.graph import GuardedStateGraph, budget_gate, guarded_graph
from .ledger import Ledger, from_url
from .limits import Limits
from .pricing import CostBreakdown, ModelPrice, PriceBook
from .records import CallRecord, SessionUsage
from .routing import (
    ModelRouter,
    RouteDecision,
    Rule,
    has_tools,
    mentions,
    prompt_tokens_above,
    when,
)
from .tokens import TokenCounter
from .usage import MalformedUsage, Usage

__version__ = "0.1.0"

__all__ = [
    "Admission",
    "BudgetExceeded",
    "Budgets",
    "CallRecord",
    "CallbackAlert",
    "CostBreakdown",
    "Guard",
    "GuardCallbackHandler",
    "GuardError",
    "GuardMiddleware",
    "GuardedStateGraph",
    "Ledger",
    "LedgerUnavailable",
    "Limits",
    "LogAlert",
    "LoopDetected",
    "MalformedUsage",
    "ModelCall",
    "ModelPrice",
    "ModelRouter",
    "OutputCapExceeded",
    "PriceBook",
    "RouteDecision",
    "Rule",
    "SessionRequired",
    "SessionUsage",
    "StepLimitExceeded",
    "ThresholdEvent",
    "TokenCounter",
    "UnknownModelPrice",
    "Usage",
    "UsageStore",
    "WebhookAlert",
    "__version__",
    "budget_gate",
    "export_focus",
    "from_url",
    "guarded_graph",
    "has_tools",
    "mentions",
    "prompt_tokens_above",
    "report",
    "validate_focus",
    "when",
]
