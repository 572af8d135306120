"""The callback layer's shortcuts on the hot path (issue 19) give what the general code
gives: the dollar text, the costed usage, the client's retries per serialized model,
the output cap, and the cost breakdown from the price the guard planned with."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.outputs import ChatGeneration

from agent_guard import Guard, Limits
from agent_guard.engine.admission import ModelCall
from agent_guard.engine.usage import Usage, nano_to_usd
from agent_guard.langchain.call import (
    CostedUsage,
    _message,
    _positive_int,
    annotate_message,
    attempts,
    client_retries,
    cost_breakdown,
    max_output,
    read_answer,
    read_timeout,
)
from agent_guard.tokens import TokenCounter


class _Record:
    """The fields of a CallRecord annotate_message reads."""

    def __init__(self, cost_nano: int) -> None:
        self.cost_nano = cost_nano
        self.session, self.tier, self.route, self.usage_estimated = "s", "t", "r", False


_GUARD = Guard(limits=Limits(max_cost_usd="5"))


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.integers(-10**12, 10**6), st.integers(0, 10**30),
                 st.integers(0, 10**6).map(lambda n: n * 10**9),
                 st.integers(1, 10**8).map(lambda n: n * 10**5), st.integers(10**3, 10**9)))
def test_the_annotated_cost_text_is_the_records_cost_usd_text(nano: int) -> None:
    message = AIMessage(content="a")
    annotate_message(message, _GUARD, _Record(nano), None)
    assert message.response_metadata["agent_guard"]["cost_usd"] == str(nano_to_usd(nano))


def test_the_annotated_cap_text_is_the_caps_str() -> None:
    """The cap's text, reused while the cap is the same object, is str(cap)."""
    for cap in ("5", None, "5", 0.1, "0.1", 10**6, 10**6):
        for guard in (Guard(limits=Limits(max_cost_usd=cap)),) * 2:
            message = AIMessage(content="a")
            annotate_message(message, guard, _Record(1), None)
            expected = guard.limits.max_cost_usd
            assert message.response_metadata["agent_guard"]["cap_usd"] == \
                (None if expected is None else str(expected))


usages = st.dictionaries(
    st.sampled_from(["input_tokens", "output_tokens", "total_tokens", "input_cost",
                     "total_cost", "input_token_details"]),
    st.one_of(st.integers(0, 100), st.floats(0, 1), st.just({"cache_read": 1})))
costs = st.fixed_dictionaries({"input_cost": st.floats(0, 1), "output_cost": st.floats(0, 1),
                               "total_cost": st.floats(0, 2)})


@settings(max_examples=300, deadline=None)
@given(usages, costs, st.booleans(), st.integers(0, 10**12))
def test_the_annotated_usage_is_the_costed_usage_constructor(usage: dict[str, Any],
                                                              cost: dict[str, float],
                                                              costed_input: bool,
                                                              cost_nano: int) -> None:
    """annotate_message builds its CostedUsage without the constructor: the same."""
    given_usage: Any = CostedUsage(usage, {"total_cost": 9.0}) if costed_input else usage
    message = AIMessage(content="a")
    message.__dict__["usage_metadata"] = given_usage  # any mapping, unvalidated
    annotate_message(message, Guard(limits=Limits(max_cost_usd="5")), _Record(cost_nano),
                     (cost["input_cost"], cost["output_cost"]))
    fast: Any = message.usage_metadata
    general = CostedUsage(given_usage, {"input_cost": cost["input_cost"],
                                        "output_cost": cost["output_cost"],
                                        "total_cost": cost_nano / 1_000_000_000})
    assert type(fast) is CostedUsage
    assert dict(dict.items(fast)) == dict(dict.items(general))
    assert fast.costs == general.costs
    assert {k: fast.get(k) for k in (*usage, *cost)} == \
        {k: general.get(k) for k in (*usage, *cost)}
    assert message.response_metadata["agent_guard"]["cost_usd"] == \
        str(nano_to_usd(cost_nano))


serialized_models = st.one_of(
    st.none(), st.just({}),
    st.fixed_dictionaries({
        "id": st.one_of(st.just(["langchain_openai", "ChatOpenAI"]),
                        st.just(["x", "ChatAnthropic"]), st.just(["x", "Other"]),
                        st.just("ChatOpenAI"), st.just([])),
        "kwargs": st.one_of(st.none(), st.dictionaries(
            st.sampled_from(["max_retries", "timeout", "request_timeout"]),
            st.one_of(st.none(), st.integers(-1, 5), st.booleans(), st.floats(0, 10),
                      st.just([3, 7]), st.just("x")))),
    }))


@settings(max_examples=300, deadline=None)
@given(serialized_models)
def test_client_retries_reads_the_serialized_model_as_attempts_and_read_timeout(
        serialized: Any) -> None:
    expected = attempts(serialized), read_timeout(serialized)
    assert client_retries(serialized) == expected
    assert client_retries(serialized) == expected  # remembered for the same dict


def _max_output_reference(params: Any, meta: Any) -> int | None:
    """max_output as written before its inline int test."""
    n = _positive_int(params.get("n")) or 1
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens", "num_predict",
                "maxOutputTokens", "max_new_tokens"):
        value = _positive_int(params.get(key))
        if value is not None:
            return value * n
    value = _positive_int(meta.get("ls_max_tokens"))
    return None if value is None else value * n


class _Int(int):
    pass


odd_values = st.one_of(st.none(), st.integers(-2, 300), st.booleans(), st.floats(0, 5),
                       st.integers(1, 9).map(_Int), st.just("12"))


@settings(max_examples=1000, deadline=None)
@given(st.dictionaries(st.sampled_from(["n", "max_tokens", "max_completion_tokens",
                                        "num_predict", "max_new_tokens"]), odd_values),
       st.dictionaries(st.just("ls_max_tokens"), odd_values))
def test_max_output_is_the_general_reading(params: dict[str, Any],
                                           meta: dict[str, Any]) -> None:
    assert max_output(params, meta) == _max_output_reference(params, meta)


def _attempts_reference(serialized: Any) -> int:
    """attempts as written before its reordering."""
    kwargs = (serialized or {}).get("kwargs")
    retries = kwargs.get("max_retries") if kwargs and isinstance(kwargs, dict) else None
    if isinstance(retries, int) and not isinstance(retries, bool) and retries >= 0:
        return 1 + retries
    ident = (serialized or {}).get("id") or ()
    if retries is None and ident and isinstance(ident, list | tuple):
        return 1 + {"ChatOpenAI": 2, "ChatAnthropic": 2}.get(str(ident[-1]), 0)
    return 1


@settings(max_examples=300, deadline=None)
@given(serialized_models)
def test_attempts_is_the_general_reading(serialized: Any) -> None:
    assert attempts(serialized) == _attempts_reference(serialized)


@pytest.mark.parametrize("unknown_price", ["allow", "stated"])
@pytest.mark.parametrize("model", ["gpt-4o-mini", "no-such-model"])
@pytest.mark.parametrize("response_model", [None, "same", "gpt-4o", "other-unpriced"])
def test_the_breakdown_from_the_planned_price_is_the_looked_up_one(
        unknown_price: str, model: str, response_model: str | None) -> None:
    limits = Limits(unknown_price="allow") if unknown_price == "allow" else Limits(
        max_cost_usd=100, unknown_price={"input_cost_per_token": 1e-05,
                                         "output_cost_per_token": 4e-05})
    guard = Guard(limits, "memory://")
    call = ModelCall(session="s", model=model, messages=["hello there"],
                     max_output_tokens=50)
    admission = guard.before_model_call(call)
    record = guard.after_model_call(
        admission, Usage(120, 30),
        response_model=model if response_model == "same" else response_model)
    split = cost_breakdown(guard, record, admission)
    assert split == cost_breakdown(guard, record)
    assert (split is not None) == (record.model in ("gpt-4o-mini", "gpt-4o"))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3), st.integers(1, 2), st.booleans(), st.booleans())
def test_the_answer_read_names_the_message_annotate_writes_to(
        prompts: int, choices: int, usage: bool, generation: bool) -> None:
    """The callback annotates read_answer's message when it has one: the first answer,
    the one annotate(generations) picks."""
    def answer(i: int) -> Any:
        message = AIMessage(content=f"a{i}", usage_metadata={
            "input_tokens": 3, "output_tokens": 2, "total_tokens": 5} if usage else None)
        return ChatGeneration(message=message) if generation else message

    groups = [[answer(p * 10 + c) for c in range(choices)] for p in range(prompts)]
    found = read_answer(groups, None, "gpt-4o-mini", TokenCounter()).message
    if found is not None:
        assert found is _message(groups[0][0])
    assert (found is not None) == (prompts == choices == 1 and usage)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=5), st.sampled_from([None, "openai"]),
       st.one_of(st.none(), st.integers(1, 500)), st.lists(st.text(max_size=3), max_size=2),
       st.dictionaries(st.sampled_from(["team", "user"]), st.text(max_size=3)),
       st.integers(1, 4))
def test_the_handlers_model_call_is_the_dataclass_built_by_keyword(
        model: str, provider: str | None, cap: int | None, tags: list[str],
        attributes: dict[str, str], tries: int) -> None:
    from agent_guard.langchain.callback import _MODEL_CALL_FIELDS, _new_call

    values = dict(session="s", model=model, provider=provider, messages=("hi",), tools=None,
                  max_output_tokens=cap, input_tokens=None, run_id="r", node=None,
                  tags=tuple(tags), can_shrink=False, tier=None, route="cheap",
                  attributes=attributes, params={"model": model}, attempts=tries)
    made = _new_call(*(values[name] for name in _MODEL_CALL_FIELDS))
    assert type(made) is ModelCall
    assert made == ModelCall(**values)  # type: ignore[arg-type]


class _OwnSetattr(AIMessage):
    """A message class with its own __setattr__: annotated through it."""

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)


@pytest.mark.parametrize("cls", [AIMessage, AIMessageChunk, _OwnSetattr])
@pytest.mark.parametrize("set_before", [False, True])
def test_annotating_an_answer_sets_its_usage_as_pydantic_does(
        cls: type[AIMessage], set_before: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """annotate_message stores the costed usage itself where pydantic's memoised
    handler would (a plain field): the message is the one setattr gives."""
    import agent_guard.langchain.call as call_module

    guard = Guard(limits=Limits(max_cost_usd="5"))
    admission = guard.before_model_call(ModelCall(session="s", model="gpt-4o-mini",
                                                  max_output_tokens=10, run_id="r1"))
    record = guard.after_model_call(admission, Usage(input_tokens=3, output_tokens=2))
    split = cost_breakdown(guard, record, admission)

    def annotated(fast: bool) -> AIMessage:
        usage = {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}
        message = cls(content="a", usage_metadata=usage)
        if set_before:  # a field set once already (pydantic memoised its handler)
            message.usage_metadata = dict(usage)  # type: ignore[assignment]
        if not fast:
            monkeypatch.setattr(call_module, "PYDANTIC_FIELD_SETATTR", None)
        annotate_message(message, guard, record, split)
        monkeypatch.undo()
        return message

    fast, general = annotated(True), annotated(False)
    assert fast.__dict__ == general.__dict__
    assert fast.model_fields_set == general.model_fields_set
    assert type(fast.usage_metadata) is type(general.usage_metadata) is CostedUsage
    assert fast.usage_metadata.costs == general.usage_metadata.costs  # type: ignore[union-attr]
    assert fast.model_dump() == general.model_dump()


class _OwnText(UUID):
    def __str__(self) -> str:
        return "own"


@settings(max_examples=500, deadline=None)
@given(st.uuids(), st.integers(0, 2**128 - 1))
def test_a_run_ids_text_is_its_str(run_id: UUID, n: int) -> None:
    from agent_guard.langchain import callback
    from agent_guard.langchain.callback import _run_id_text

    for value in (run_id, UUID(int=n), _OwnText(int=n)):
        assert _run_id_text(value) == str(value)
    # the fallback without uuid-utils formats the same text
    rust, callback._uuid_text = callback._uuid_text, None
    try:
        for value in (run_id, UUID(int=n), _OwnText(int=n)):
            assert _run_id_text(value) == str(value)
    finally:
        callback._uuid_text = rust


class _Described(Exception):
    """Raised by a spy guard with the ModelCall the handler described."""


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["thread_id", "session_id", "other"]),
                       st.one_of(st.none(), st.just(""), st.sampled_from(["t", "s"]),
                                 st.integers(0, 3))),
       st.one_of(st.none(), st.just(""), st.just("d")))
def test_the_handlers_session_is_session_from_metadata(meta: dict[str, Any],
                                                      default: str | None) -> None:
    from uuid import uuid4

    from agent_guard.context import session_from_metadata
    from agent_guard.errors import SessionRequired
    from agent_guard.langchain.callback import GuardCallbackHandler

    try:
        expected: Any = session_from_metadata(meta, default)
    except SessionRequired:
        expected = SessionRequired
    handler = GuardCallbackHandler(limits=Limits(max_cost_usd="5"), session_id=default)

    def spy(call: ModelCall) -> Any:
        raise _Described(call)

    handler.guard.before_model_call = spy  # type: ignore[method-assign]
    try:
        handler.on_chat_model_start({}, [[]], run_id=uuid4(), metadata=meta,
                                    invocation_params={"model": "gpt-4o-mini"})
    except SessionRequired:
        got: Any = SessionRequired
    except _Described as described:
        got = described.args[0].session
    assert got == expected


@pytest.mark.parametrize("kind", ["uuid", "str", "int"])
def test_a_run_id_that_is_no_uuid_keys_its_run_as_a_uuid_does(kind: str) -> None:
    """Open runs are keyed by a UUID run id's int; any other hashable run id (LangChain
    passes UUIDs; other callers may not) is its own key: the run starts, streams, ends,
    errors and is stopped by the keeper the same way."""
    from uuid import uuid4

    from langchain_core.messages import HumanMessage
    from langchain_core.outputs import LLMResult

    from agent_guard.langchain.callback import GuardCallbackHandler, _run_key

    def make_id() -> Any:
        u = uuid4()
        return {"uuid": u, "str": str(u), "int": u.int}[kind]

    handler = GuardCallbackHandler(limits=Limits(max_cost_usd="5"), session_id="s")
    params = {"model": "gpt-4o-mini", "max_tokens": 20}

    def start(run_id: Any) -> None:
        handler.on_chat_model_start({}, [[HumanMessage("hi")]], run_id=run_id,
                                    invocation_params=params)
        assert handler.open_runs == 1

    ended = make_id()
    start(ended)
    handler.on_llm_new_token("ab", run_id=ended)
    answer = AIMessage(content="ok", usage_metadata={"input_tokens": 3, "output_tokens": 2,
                                                     "total_tokens": 5})
    record = handler.on_llm_end(LLMResult(generations=[[ChatGeneration(message=answer)]]),
                                run_id=ended)
    assert record is not None and record.outcome == "ok" and handler.open_runs == 0
    assert record.run_id == str(ended)
    failed = make_id()
    start(failed)
    handler.on_llm_error(RuntimeError("down"), run_id=failed)
    assert handler.open_runs == 0
    stopped = make_id()
    start(stopped)
    handler._stopped(stopped)
    assert handler.open_runs == 0
    assert _run_key(stopped) == (stopped.int if kind == "uuid" else stopped)


def test_an_open_run_sets_every_field_of_the_keepers_watch_as_watch_does() -> None:
    """``_Run.__init__`` fills the lease keeper's ``Watch`` fields itself (a call of
    ``Watch.__init__`` per guarded call costs a frame): it must set each of them, to what
    ``Watch.__init__`` sets, or a field added to ``Watch`` would be unset on open runs."""
    from agent_guard.engine.keeper import Watch
    from agent_guard.langchain.callback import GuardCallbackHandler, _Run

    guard = Guard(Limits(max_cost_usd=1), "memory://")
    handler = GuardCallbackHandler(guard, session_id="s")
    admission = guard.before_model_call(ModelCall(session="s", model="gpt-4o-mini",
                                                  input_tokens=10, max_output_tokens=10))
    run = _Run(handler, UUID(int=1), admission, None, None, 100.0, None, True, [])
    watch = Watch(guard, admission, None)
    for name in Watch.__slots__:
        if name == "on_stop":  # the run's own stopped() tells its handler
            assert run.on_stop is None
            continue
        if name == "renew_at":  # a first renewal a third of the lease after the start
            assert run.renew_at == 100.0 + guard.limits.lease_seconds / 3
            continue
        assert getattr(run, name) == getattr(watch, name), name
