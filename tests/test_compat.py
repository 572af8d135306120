"""Each internal of LangChain, LangGraph or tiktoken that agent-guard relies on
(``agent_guard/compat.py``) is still there and still behaves as used. A failure here
after an upgrade names the entry to fix; the versions last checked are in
``compat.CHECKED``."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import logging
import re
import sys
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


def test_the_shielded_end_events_run_in_tasks_of_their_own():
    """Each name is an async run manager's end event wrapped by ``shielded`` (its own
    task), and every shielded method is named."""
    shielded = {name for cls in vars(callback_manager).values() if isinstance(cls, type)
                and cls.__module__ == callback_manager.__name__
                for name, func in vars(cls).items()
                if getattr(getattr(func, "__code__", None), "co_qualname", None)
                == "shielded.<locals>.wrapped"}
    assert shielded == compat.LANGCHAIN_SHIELDED_CORO_NAMES


def test_runnable_parallel_steps_its_streams_in_get_next_chunk_tasks():
    from langchain_core.runnables import RunnableParallel

    code = RunnableParallel._atransform.__code__
    names = {c.co_name for c in code.co_consts if inspect.iscode(c)}
    assert compat.STREAM_STEP_CORO_NAMES & names == {"get_next_chunk"}


def test_a_legacy_models_async_starts_are_gathered_in_tasks_of_their_own():
    """``BaseLLM.agenerate`` runs each ``AsyncCallbackManager.on_llm_start`` through
    ``asyncio.gather`` (a task each): that coroutine's name is the one skipped."""
    from langchain_core.language_models.llms import BaseLLM

    names: set[str] = set()
    codes = [BaseLLM.agenerate.__code__]
    while codes:  # (the starts are made in a comprehension: a code of its own)
        code = codes.pop()
        names.update(code.co_names)
        codes += [c for c in code.co_consts if inspect.iscode(c)]
    assert {"gather", "on_llm_start"} <= names
    start = callback_manager.AsyncCallbackManager.on_llm_start
    assert inspect.iscoroutinefunction(start)
    assert {start.__name__} == compat.LANGCHAIN_GATHERED_START_CORO_NAMES


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


def test_dumpd_serialises_dict_values_in_the_function_costed_usage_answers():
    """CostedUsage.items() gives its costs to LangChain's serialiser only, told apart by
    the code of ``_serialize_value``: dumpd (what LangSmith's tracer sends) sees them."""
    from langchain_core.load import dumpd
    from langchain_core.messages import AIMessage

    from agent_guard.langchain.call import CostedUsage

    assert compat.LANGCHAIN_SERIALIZE_VALUE_CODE is not None
    usage = CostedUsage({"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
                        {"total_cost": 0.25})
    message = AIMessage(content="hi")
    message.usage_metadata = usage  # type: ignore[assignment]  # as the handler sets it
    assert dumpd(message)["kwargs"]["usage_metadata"]["total_cost"] == 0.25
    assert "total_cost" not in dict(usage.items())  # any other reader: the counts only


def test_async_dispatch_functions_are_where_ends_inline_looks_for_them():
    """``ahandle_event`` (with its local ``event_name``) hands each handler to
    ``_ahandle_event_for_handler``, which reads the handler's event method."""
    handle = compat.LANGCHAIN_AHANDLE_EVENT_CODE
    for_handler = compat.LANGCHAIN_AHANDLE_EVENT_FOR_HANDLER_CODE
    assert handle is callback_manager.ahandle_event.__code__
    assert compat.LANGCHAIN_HANDLE_EVENT_CODE is callback_manager.handle_event.__code__
    assert for_handler is callback_manager._ahandle_event_for_handler.__code__
    assert "event_name" in handle.co_varnames
    assert "_ahandle_event_for_handler" in handle.co_names
    assert "getattr" in for_handler.co_names


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


def _foreign(module: str) -> bool:
    top = module.split(".")[0]
    return bool(top) and top != "agent_guard" and top not in sys.stdlib_module_names


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_reach_ins(source: str) -> list[str]:
    """Private names of third-party libraries a module touches: a private module or name
    imported (``from langchain_core.load import _validation``), an underscore attribute
    of something imported from one (``_manager._ahandle_event_for_handler``), or one read
    with ``getattr``/``hasattr`` and a constant name."""
    tree = ast.parse(source)
    bound: set[str] = set()
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _foreign(alias.name):
                    bound.add((alias.asname or alias.name).split(".")[0])
                    if any(_private(part) for part in alias.name.split(".")):
                        found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module \
                and _foreign(node.module):
            if any(_private(part) for part in node.module.split(".")):
                found.append(f"{node.lineno}: from {node.module} import ...")
            for alias in node.names:
                bound.add(alias.asname or alias.name)
                if _private(alias.name):
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")

    def foreign_base(expr: ast.expr) -> bool:
        while isinstance(expr, ast.Attribute):
            expr = expr.value
        return isinstance(expr, ast.Name) and expr.id in bound

    def reads_private(node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute):
            return _private(node.attr) and foreign_base(node.value)
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str) and _private(node.args[1].value)
                and foreign_base(node.args[0]))

    for node in ast.walk(tree):
        if reads_private(node):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_scan_sees_each_kind_of_reach_in():
    """What the scan below catches, on the reach-ins call.py and dispatch.py had."""
    seen = private_reach_ins(
        "from langchain_core.load import _validation as _lc_validation\n"
        "from langchain_core.callbacks import manager as _manager\n"
        "import langgraph._internal._runnable\n"
        "import sys\n"
        "_SERIALIZE = getattr(getattr(_lc_validation, '_serialize_value', None), '__code__')\n"
        "_FOR_HANDLER = _manager._ahandle_event_for_handler\n"
        "frame = sys._getframe(1)\n"  # the standard library's own: not a reach-in
        "ok = _manager.ahandle_event.__code__\n")
    assert seen == ["1: from langchain_core.load import _validation",
                    "3: import langgraph._internal._runnable",
                    "6: _manager._ahandle_event_for_handler",
                    "5: getattr(_lc_validation, '_serialize_value', None)"]


def test_no_other_module_touches_private_names_of_other_libraries():
    """The AST half of the habit: imports of private modules or names, and underscore
    attributes of what was imported from another library, only in compat.py."""
    package = Path(compat.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "compat.py" and path.parent == package:
            continue
        found += [f"{path.relative_to(package)}:{hit}"
                  for hit in private_reach_ins(path.read_text(encoding="utf-8"))]
    assert not found, "move these into agent_guard/compat.py: " + "; ".join(found)


def test_a_graph_task_reaches_its_runs_executor_which_is_freed_when_the_stream_closes():
    import gc
    import weakref
    from typing import TypedDict

    from langchain_core.runnables import RunnableConfig
    from langgraph.graph import END, START, StateGraph

    from agent_guard.compat import graph_run_executor

    class State(TypedDict):
        n: int

    seen: list[weakref.ref[object]] = []

    def step(state: State, config: RunnableConfig) -> State:
        executor = graph_run_executor(config)
        assert executor is not None, "LangGraph no longer hands tasks its run's executor"
        seen.append(weakref.ref(executor))
        return {"n": state["n"] + 1}

    builder = StateGraph(State)
    builder.add_node("a", step)
    builder.add_node("b", step)
    builder.add_edge(START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("b", END)
    stream = builder.compile().stream({"n": 0})
    next(stream)  # "a" ran; the run is paused between two steps
    assert len(seen) == 1 and seen[0]() is not None
    stream.close()
    gc.collect()
    assert seen[0]() is None, "the executor outlives the closed stream"


def test_pydantic_memoises_the_field_setattr_handler_the_callback_uses():
    """A plain field set on a message: pydantic memoises PYDANTIC_FIELD_SETATTR for it,
    which stores the value in __dict__ and marks the field set (what annotate_message
    does itself)."""
    from langchain_core.messages import AIMessage

    handler = compat.PYDANTIC_FIELD_SETATTR
    assert handler is not None
    message = AIMessage(content="a")
    message.usage_metadata = {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}
    assert AIMessage.__pydantic_setattr_handlers__.get("usage_metadata") is handler
    other = AIMessage(content="a")
    handler(other, "usage_metadata", message.usage_metadata)
    assert other.__dict__ == message.__dict__
    assert other.model_fields_set == message.model_fields_set


def test_create_agent_picks_the_structured_output_strategy_with_the_named_function():
    """The middleware reserves a bare schema as create_agent binds it: the provider's
    structured output or a tool (``langchain.agents.factory._supports_provider_strategy``)."""
    from langchain.agents import factory

    assert callable(getattr(factory, "_supports_provider_strategy", None)), (
        "langchain.agents.factory._supports_provider_strategy is gone")
    openai = pytest.importorskip("langchain_openai")
    assert compat.provider_strategy_for(openai.ChatOpenAI(model="gpt-4o", api_key="sk-test"),
                                        [])
    assert not compat.provider_strategy_for(ScriptedChatModel(model_name="local-model"), [])


def test_async_model_starts_make_the_handlers_coroutines_in_the_named_locals():
    """``AsyncCallbackManager.on_chat_model_start`` / ``on_llm_start`` make the handlers'
    ``ahandle_event`` coroutines into the locals the graph's run gate closes when it
    refuses (``agent_guard.langchain.dispatch.close_unstarted_starts``)."""
    manager = callback_manager.AsyncCallbackManager
    codes = {manager.on_chat_model_start.__code__, manager.on_llm_start.__code__}
    assert codes == set(compat.LANGCHAIN_ASYNC_MODEL_START_CODES)
    for code in codes:
        assert set(compat.LANGCHAIN_ASYNC_MODEL_START_LOCALS) <= set(code.co_varnames)
        assert "ahandle_event" in code.co_names
