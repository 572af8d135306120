"""Each internal of LangChain, LangGraph or tiktoken that agent-guard relies on
(``agent_guard/compat.py``) is still there and still behaves as used. A failure here
after an upgrade names the entry to fix; the versions last checked are in
``compat.CHECKED``."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
from pathlib import Path

import langchain_core
import pytest
from langchain_core.callbacks import manager as callback_manager
from langchain_core.language_models import BaseChatModel
from langgraph.graph import StateGraph

from agent_guard import compat
from agent_guard.testing import ScriptedChatModel


def test_checked_versions_are_recorded_for_every_library():
    assert set(compat.CHECKED) >= {"langchain-core", "langchain", "langgraph", "tiktoken"}


def test_langgraph_runnable_callable_wraps_sync_and_async_functions():
    def f(x):
        return x + 1

    async def af(x):
        return x + 2

    node = compat.RunnableCallable(f, af, name="n", trace=False)
    assert node.invoke(1) == 2


def test_langgraph_branch_spec_has_the_fields_guarded_graph_rewrites():
    fields = {f.name for f in dataclasses.fields(compat.BranchSpec)} \
        if dataclasses.is_dataclass(compat.BranchSpec) else set(compat.BranchSpec._fields)
    assert {"path", "ends", "input_schema"} <= fields


def test_langgraph_builder_attributes_guarded_graph_copies():
    builder = StateGraph(dict)
    builder.add_node("a", lambda s: s)
    builder.add_edge("__start__", "a")
    for name in ("nodes", "edges", "branches", "waiting_edges", "compiled", "state_schema"):
        assert hasattr(builder, name), f"StateGraph.{name} is gone"
    spec = builder.nodes["a"]
    assert hasattr(spec, "runnable") and hasattr(spec, "is_error_handler")


def test_chat_model_ls_params():
    params = compat.ls_params(ScriptedChatModel(model_name="gpt-4o"), max_tokens=7)
    assert params["ls_model_name"] == "gpt-4o" and params["ls_max_tokens"] == 7


def test_openai_default_params():
    openai = pytest.importorskip("langchain_openai")
    model = openai.ChatOpenAI(model="gpt-4o", api_key="sk-test", max_tokens=5,
                              service_tier="flex")
    defaults = compat.default_params(model)
    assert defaults is not None and defaults["service_tier"] == "flex"


def test_model_code_directory_holds_the_chat_model_code():
    where = inspect.getsourcefile(BaseChatModel)
    assert where is not None and compat.LANGCHAIN_MODEL_CODE_DIR in where
    assert (Path(langchain_core.__file__).parent / "language_models" / "chat_models.py").is_file()


def test_callback_dispatch_coroutines_exist():
    for name in compat.LANGCHAIN_DISPATCH_CORO_NAMES:
        assert inspect.iscoroutinefunction(getattr(callback_manager, name)), name


def test_callback_error_warning_has_the_filtered_format(caplog):
    class Boom(Exception):
        pass

    from langchain_core.callbacks import BaseCallbackHandler

    class Raising(BaseCallbackHandler):
        raise_error = True

        def on_text(self, *args, **kwargs):
            raise Boom("x")

    with caplog.at_level(logging.WARNING), pytest.raises(Boom):
        callback_manager.handle_event([Raising()], "on_text", None, "t")
    assert [r for r in caplog.records if r.msg == compat.LANGCHAIN_CALLBACK_ERROR]


@pytest.mark.parametrize("method", ["_generate_with_cache", "_agenerate_with_cache"])
def test_the_cache_lookup_runs_where_run_manager_is_a_local(method):
    fn = getattr(BaseChatModel, method)
    assert compat.LANGCHAIN_RUN_MANAGER_LOCAL in inspect.signature(fn).parameters
    assert "lookup(" in inspect.getsource(fn)


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_tiktoken_constructors_load_ranks_with_load_tiktoken_bpe(name):
    constructor = compat.tiktoken_constructor(name)
    assert "load_tiktoken_bpe" in constructor.__globals__


PRIVATE = re.compile(
    r"^\s*(?:from|import)\s+(?:langgraph|langchain\w*|tiktoken\w*)(?:\.\w+)*\._\w*"
    r"|^\s*from\s+tiktoken_ext\b"
    r"|\.(?:_get_ls_params|_default_params)\b"
    r"|[\"']_default_params[\"']", re.M)


def test_no_other_module_reaches_into_those_internals():
    """The habit that keeps compat.py the one place: a new reach-in elsewhere fails here."""
    package = Path(compat.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "compat.py":
            continue
        text = path.read_text(encoding="utf-8")
        code = "\n".join(line for line in text.splitlines()
                         if not line.lstrip().startswith("#"))
        found += [f"{path.relative_to(package)}: {m.group(0).strip()}"
                  for m in PRIVATE.finditer(code)]
    assert not found, "move these into agent_guard/compat.py: " + "; ".join(found)


def test_tool_runs_validate_their_arguments_in_the_named_method():
    from langchain_core.tools import BaseTool

    for method in (BaseTool.run, BaseTool.arun):
        assert method.__code__ in compat.LANGCHAIN_TOOL_RUN_CODES
        assert f"self.{compat.LANGCHAIN_TOOL_ARGS_METHOD}(" in inspect.getsource(method)


@pytest.mark.parametrize("name", ["handle_event", "ahandle_event"])
def test_callback_dispatch_takes_the_handler_list_as_named(name):
    fn = getattr(callback_manager, name)
    assert compat.LANGCHAIN_DISPATCH_HANDLERS_LOCAL in inspect.signature(fn).parameters
    source = inspect.getsource(callback_manager.CallbackManager.on_tool_start)
    assert "handle_event(\n            self.handlers," in source
    assert "handlers=self.handlers," in source
