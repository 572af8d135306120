"""The package layout: the engine in agent_guard.engine, the old module paths still
importable (the very module, with a DeprecationWarning)."""

from __future__ import annotations

import subprocess
import sys

import pytest

MOVED_MODULES = ["budgets", "guard", "keeper", "limits", "records", "usage"]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_an_old_module_path_is_the_engine_module_and_warns() -> None:
    done = _run(
        "import sys, warnings\n"
        f"for name in {MOVED_MODULES!r}:\n"
        "    new = __import__(f'agent_guard.engine.{name}', fromlist=['_'])\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        old = __import__(f'agent_guard.{name}', fromlist=['_'])\n"
        "    print(name, old is new and sys.modules[f'agent_guard.{name}'] is new,\n"
        "          [str(w.message) for w in caught if w.category is DeprecationWarning])\n"
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(MOVED_MODULES)
    for name, line in zip(MOVED_MODULES, lines, strict=True):
        assert line == (f"{name} True ['agent_guard.{name} moved to agent_guard.engine."
                        f"{name}: import it from there']"), line


def test_old_paths_keep_private_names_for_code_that_reached_in() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from agent_guard.guard import Guard, ModelCall, _Plan  # noqa: F401
        from agent_guard.usage import usd_to_nano
    from agent_guard.engine.guard import Guard as EngineGuard

    assert Guard is EngineGuard
    assert usd_to_nano("0.000000001") == 1


ENGINE_MODULES = ["agent_guard.engine.guard", "agent_guard.engine.admission",
                  "agent_guard.engine.plan", "agent_guard.engine.thresholds",
                  "agent_guard.engine.backlog", "agent_guard.engine.limits",
                  "agent_guard.engine.budgets", "agent_guard.engine.usage",
                  "agent_guard.engine.records", "agent_guard.engine.keeper",
                  "agent_guard.engine.tools", "agent_guard.engine.recording",
                  "agent_guard.engine.reads", "agent_guard.engine.checks",
                  "agent_guard.ledger", "agent_guard.errors", "agent_guard.pricing"]


@pytest.mark.parametrize("module", ["agent_guard.engine", "agent_guard.ledger",
                                    "agent_guard"])
def test_the_engine_and_the_ledger_load_no_framework(module: str) -> None:
    """A process that only keeps a ledger or a guard (a worker, the CLI) does not pay
    for importing LangChain and LangGraph (about 1.5 s of CPU each)."""
    imports = "\n".join(f"import {m}" for m in ENGINE_MODULES) if module == \
        "agent_guard.engine" else f"import {module}"
    done = _run(
        f"{imports}\n"
        "import sys\n"
        "loaded = sorted(m for m in sys.modules\n"
        "                if m.split('.')[0] in ('langchain', 'langchain_core', 'langgraph'))\n"
        "print(loaded[:5])\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.slow  # three interpreters that load LangGraph
def test_a_guard_error_is_a_graph_bubble_up_once_langgraph_is_loaded() -> None:
    """The engine does not import LangGraph, yet a refusal stays a hard stop for it: a
    GuardError is a GraphBubbleUp (not retried, not turned into a tool message) whether
    LangGraph was loaded before agent-guard, after it, or only by the adapters."""
    orders = {
        "langgraph first": "import langgraph.errors\nimport agent_guard.errors as e\n",
        "adapter": "import agent_guard.errors as e\nimport agent_guard.langgraph\n",
        "langgraph after": "import agent_guard.errors as e\nimport langgraph.errors\n"
                           "e.BudgetExceeded(session='s', scope='session:s', dimension='usd_nano',"
                           " cap=1, spent=1, reserved=0, requested=1)\n",
    }
    for order, code in orders.items():
        done = _run(
            code +
            "from langgraph.errors import GraphBubbleUp\n"
            "stops = [e.GuardError, e.GuardStop, e.BudgetExceeded, e.LoopDetected,\n"
            "         e.SessionRequired, e.LedgerUnavailable, e.UnknownModelPrice]\n"
            "print(all(issubclass(c, GraphBubbleUp) for c in stops))\n"
            "try:\n"
            "    raise e.SessionRequired()\n"
            "except GraphBubbleUp:\n"
            "    print('caught as GraphBubbleUp')\n")
        assert done.returncode == 0, (order, done.stderr)
        assert done.stdout.split() == ["True", "caught", "as", "GraphBubbleUp"], order
