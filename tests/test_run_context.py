"""One run-context module: the session, scope attributes and tenant of a run are
decided in agent_guard.context, and every adapter asks it (imported normally)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from langchain_core.runnables import RunnableLambda

import agent_guard
from agent_guard.errors import SessionRequired

PACKAGE = Path(agent_guard.__file__).parent
CONTEXT_NAMES = {"session_of", "session_from_metadata", "named_session", "current_session",
                 "current_config", "tenant_of", "llm_run_metadata"}


def test_session_thread_id_wins_then_session_id_then_the_adapters_default() -> None:
    from agent_guard.context import session_from_metadata, session_of

    both = {"metadata": {"session_id": "meta"}, "configurable": {"thread_id": "thread"}}
    assert session_of(both) == "thread"
    assert session_of({"metadata": {"session_id": "meta"}}, "pool") == "meta"
    assert session_of({"metadata": {"session_id": ""}}, "pool") == "pool"
    assert session_from_metadata({"thread_id": 7}, None) == "7"
    with pytest.raises(SessionRequired):
        session_of({}, None)
    with pytest.raises(SessionRequired):
        session_of(None, "")


def test_the_tenant_of_a_run_is_its_metadata_key_else_the_default() -> None:
    from agent_guard.context import DEFAULT_TENANT, tenant_of

    assert tenant_of({"tenant": "acme"}, "tenant") == "acme"
    assert tenant_of({"org": 42}, "org") == "42"
    assert tenant_of({"tenant": ""}, "tenant") == DEFAULT_TENANT == "_default"
    assert tenant_of(None, "tenant") == "_default"


def test_current_session_reads_the_runnable_config_of_the_running_step() -> None:
    from agent_guard.context import current_config, current_session

    assert current_config() == {}  # outside any runnable
    with pytest.raises(SessionRequired):
        current_session(None)
    seen = RunnableLambda(lambda _: current_session(None)).invoke(
        1, {"metadata": {"session_id": "inside"}})
    assert seen == "inside"


def test_every_adapter_uses_the_context_module_s_functions() -> None:
    from agent_guard import context, langchain, langgraph
    from agent_guard.cache.result import ResultCache

    assert langgraph.session_of is context.session_of
    assert langchain.session_from_metadata is context.session_from_metadata
    assert ResultCache(store="memory://").tenant_from(
        {"metadata": {"tenant": "acme"}}) == "acme"


def test_no_module_defines_or_lazily_imports_the_run_context_elsewhere() -> None:
    """Nothing decides a run's session or tenant outside agent_guard/context.py, and no
    module imports it inside a function to dodge an import cycle."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.name.lstrip("_") in CONTEXT_NAMES and rel != "agent_guard/context.py":
                    found.append(f"{rel}: defines {node.name}")
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and any(
                            a.name in CONTEXT_NAMES for a in inner.names):
                        found.append(f"{rel}:{inner.lineno}: imports "
                                     f"{[a.name for a in inner.names]} in {node.name}()")
    assert found == []
