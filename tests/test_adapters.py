"""One adapter core (issue 14): GuardMiddleware bounds every call in the field the
provider's request really carries, admits each attempt at its own price, and uses the
async ledger on async paths; callback and middleware read answers the same way.

Every test drives the real ``ChatOpenAI`` against ``FakeOpenAIServer`` and reads what
was sent (``server.requests``) and billed (``server.billed``)."""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Any, ClassVar

import pytest
from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_openai import ChatOpenAI
from pydantic import Field

from agent_guard import Guard, GuardCallbackHandler, GuardMiddleware, Limits
from agent_guard.engine.admission import Admission
from agent_guard.engine.records import CallRecord
from agent_guard.errors import StepLimitExceeded
from agent_guard.ledger import Ledger, MemoryLedger
from agent_guard.testing import FakeOpenAIServer, FakeReply

SESSION = "adapters"
CAP_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


class Spy:
    """A guard whose admissions and records a test can read."""

    def __init__(self, limits: Limits, ledger: Ledger | None = None) -> None:
        self.records: list[CallRecord] = []
        self.guard = Guard(limits, ledger=ledger or MemoryLedger(),
                           on_record=[self.records.append])
        self.admissions: list[Admission] = []
        sync, async_ = self.guard.before_model_call, self.guard.abefore_model_call

        def before(call: Any) -> Admission:
            admission = sync(call)
            self.admissions.append(admission)
            return admission

        async def abefore(call: Any) -> Admission:
            admission = await async_(call)
            self.admissions.append(admission)
            return admission

        self.guard.before_model_call = before  # type: ignore[method-assign]
        self.guard.abefore_model_call = abefore  # type: ignore[method-assign]

    def models(self) -> list[CallRecord]:
        return [r for r in self.records if r.kind == "model"]


def drive(agent: Any, question: str, mode: str, config: Any = None) -> dict[str, Any]:
    """Invoke (sync) or await (async) ``agent`` on ``question`` in the test's session."""
    inputs = {"messages": [HumanMessage(question)]}
    config = {"configurable": {"thread_id": SESSION}, **(config or {})}
    if mode == "sync":
        return agent.invoke(inputs, config)
    return asyncio.run(agent.ainvoke(inputs, config))


def run_agent(model: Any, mw: GuardMiddleware, mode: str, *, extra: list[Any] = ()
              ) -> dict[str, Any]:
    agent = create_agent(model, tools=[], middleware=[mw, *extra])
    return drive(agent, "What is the capital of France?", mode)


def sent_caps(request: dict[str, Any]) -> dict[str, Any]:
    return {k: request[k] for k in CAP_KEYS if k in request}


def cap_field(responses: bool) -> str:
    return "max_output_tokens" if responses else "max_completion_tokens"


# -- 1. the middleware bounds every call ------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("responses", [False, True], ids=["chat", "responses"])
def test_a_model_without_a_cap_is_sent_the_reserved_cap(mode: str, responses: bool) -> None:
    spy = Spy(Limits(max_cost_usd=1, default_max_output_tokens=300))
    with FakeOpenAIServer([FakeReply("Paris.", completion_tokens=5)]) as server:
        model = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="x",
                           max_retries=0, use_responses_api=responses)
        run_agent(model, GuardMiddleware(spy.guard), mode)
        (request,) = server.requests
    (admission,) = spy.admissions
    assert admission.max_output_tokens == 300
    assert sent_caps(request) == {cap_field(responses): 300}


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("responses", [False, True], ids=["chat", "responses"])
@pytest.mark.parametrize("where", ["field", "model_kwargs"])
def test_shrink_to_fit_is_what_the_request_carries(mode: str, responses: bool,
                                                   where: str) -> None:
    # $0.02 covers about 2,000 gpt-4o output tokens, not the model's 8,000
    spy = Spy(Limits(max_cost_usd="0.02"))
    own = ({"max_tokens": 8000} if where == "field"
           else {"model_kwargs": {cap_field(responses): 8000}})
    with FakeOpenAIServer([FakeReply("Paris.", completion_tokens=5)]) as server:
        model = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="x",
                           max_retries=0, use_responses_api=responses, **own)
        run_agent(model, GuardMiddleware(spy.guard), mode)
        (request,) = server.requests
    (admission,) = spy.admissions
    assert admission.shrunk and 1000 < admission.max_output_tokens < 8000
    assert sent_caps(request) == {cap_field(responses): admission.max_output_tokens}


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("own_cap", [100, None])
def test_n_choices_are_reserved_and_bounded_per_choice(mode: str, own_cap: int | None
                                                      ) -> None:
    spy = Spy(Limits(max_cost_usd=1, default_max_output_tokens=300))
    with FakeOpenAIServer([FakeReply("Paris.", completion_tokens=50)]) as server:
        model = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="x",
                           max_retries=0, n=3, max_tokens=own_cap)
        run_agent(model, GuardMiddleware(spy.guard), mode)
        (request,) = server.requests
    (admission,) = spy.admissions
    per_choice = own_cap or 100  # the default 300 covers three choices of 100
    assert admission.max_output_tokens == 3 * per_choice
    assert sent_caps(request) == {"max_completion_tokens": per_choice}
    (record,) = spy.models()
    assert record.usage.output_tokens == 150  # three choices billed, three charged
    assert record.cost_nano <= admission.reserved_nano


# -- 1b. other providers' cap fields; a model with none ---------------------------------


class _FieldCapped(BaseChatModel):
    """A chat model of another provider: it reads its output cap only from its own field
    (``CAP``: ChatAnthropic's ``max_tokens``, Google's ``max_output_tokens``, Ollama's
    ``num_predict``), or from nowhere (``CAP = None``), ignoring call-time kwargs, and
    generates ``answer_tokens`` unless the cap stops it. ``seen`` records each request's
    cap and call kwargs (shared by the copies the middleware makes)."""

    CAP: ClassVar[str | None] = None
    model: str = "claude-sonnet-4-5"
    answer_tokens: int = 3000
    seen: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "field-capped"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "anthropic"
        return params

    def _generate(self, messages: list[Any], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        cap = getattr(self, self.CAP) if self.CAP else None
        self.seen.append({"cap": cap, "kwargs": dict(kwargs)})
        out = self.answer_tokens if cap is None else min(cap, self.answer_tokens)
        message = AIMessage("word " * 10, usage_metadata={
            "input_tokens": 5, "output_tokens": out, "total_tokens": 5 + out})
        return ChatResult(generations=[ChatGeneration(message=message)])


class _AnthropicStyle(_FieldCapped):
    CAP: ClassVar[str | None] = "max_tokens"
    max_tokens: int | None = None


class _GoogleStyle(_FieldCapped):
    CAP: ClassVar[str | None] = "max_output_tokens"
    max_output_tokens: int | None = None


class _OllamaStyle(_FieldCapped):
    CAP: ClassVar[str | None] = "num_predict"
    num_predict: int | None = None


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("case", ["no_cap", "shrink"])
@pytest.mark.parametrize("kind", [_AnthropicStyle, _GoogleStyle, _OllamaStyle],
                         ids=["max_tokens", "max_output_tokens", "num_predict"])
def test_another_providers_cap_field_carries_the_reserved_cap(kind: type[_FieldCapped],
                                                              case: str, mode: str) -> None:
    """The cap the middleware reserved is set in the field the model's request reads,
    whatever its name; the model stops there, and the charge stays within the hold."""
    # $0.03 covers about 2,000 output tokens of claude-sonnet-4-5 ($15/M), not 8,000
    limits = (Limits(max_cost_usd=1, default_max_output_tokens=300) if case == "no_cap"
              else Limits(max_cost_usd="0.03"))
    spy = Spy(limits)
    model = kind(**({} if case == "no_cap" else {kind.CAP: 8000}))
    run_agent(model, GuardMiddleware(spy.guard), mode)
    (admission,) = spy.admissions
    if case == "no_cap":
        assert admission.max_output_tokens == 300
    else:
        assert admission.shrunk and 1000 < admission.max_output_tokens < 8000
    (request,) = model.seen
    assert request["cap"] == admission.max_output_tokens
    (record,) = spy.models()
    assert record.usage.output_tokens == admission.max_output_tokens
    assert record.cost_nano <= admission.reserved_nano
    assert spy.guard.usage(SESSION).reserved_nano == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_model_without_a_cap_field_is_reserved_its_max_output(mode: str) -> None:
    """A model with no output cap the middleware can set (no field, and call-time kwargs
    ignored): the request cannot be bounded, so its worst case is the model's own max
    output (the price book's: 64,000 for claude-sonnet-4-5), not the 300 default; the
    call is not shrunk (a lower cap could not be sent)."""
    spy = Spy(Limits(max_cost_usd=2, default_max_output_tokens=300))
    model = _FieldCapped(answer_tokens=6000)
    run_agent(model, GuardMiddleware(spy.guard), mode)
    (admission,) = spy.admissions
    assert admission.max_output_tokens == 64000 and not admission.shrunk
    (record,) = spy.models()
    assert record.usage.output_tokens == 6000
    assert record.cost_nano <= admission.reserved_nano
    # $0.5 does not cover 64,000 output tokens ($0.96): refused before the model runs
    spy = Spy(Limits(max_cost_usd="0.5", default_max_output_tokens=300))
    model = _FieldCapped(answer_tokens=6000)
    from agent_guard import BudgetExceeded
    with pytest.raises(BudgetExceeded):
        run_agent(model, GuardMiddleware(spy.guard), mode)
    assert model.seen == []


# -- 3. async paths use the async ledger operations ---------------------------------------

_IN_ASYNC_OP: ContextVar[bool] = ContextVar("in_async_op", default=False)
_SYNC_OPS = ("reserve", "settle", "release", "charge", "charge_read", "extend", "totals",
             "totals_many", "renew")


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class LoopStrictLedger(MemoryLedger):
    """Raises when a sync operation runs on a running event loop outside an async one
    (a Redis or SQLite ledger would block the loop there)."""

    blocked: list[str]

    def __init__(self) -> None:
        super().__init__()
        self.blocked = []

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name in _SYNC_OPS and _loop_running() and not _IN_ASYNC_OP.get():
            super().__getattribute__("blocked").append(name)
            raise AssertionError(f"sync ledger op {name!r} on a running event loop")
        if name.startswith("a") and name[1:] in _SYNC_OPS:
            async def wrapped(*args: Any, **kwargs: Any) -> Any:
                token = _IN_ASYNC_OP.set(True)
                try:
                    return await attr(*args, **kwargs)
                finally:
                    _IN_ASYNC_OP.reset(token)
            return wrapped
        return attr


def test_the_strict_ledger_catches_a_sync_op_on_the_loop() -> None:
    ledger = LoopStrictLedger()

    async def sync_on_loop() -> None:
        ledger.totals("x")

    with pytest.raises(AssertionError):
        asyncio.run(sync_on_loop())
    asyncio.run(ledger.atotals("x"))  # the async op is fine
    ledger.totals("x")  # and the sync op off the loop


@pytest.mark.parametrize("extra", ["none", "telemetry", "fallback", "refused"])
def test_the_async_agent_uses_async_ledger_ops_only(extra: str) -> None:
    """Also with telemetry (the agent span ends with the session's usage), with an inner
    ModelFallbackMiddleware whose fallback is admitted at its own price, and with a
    refusal raised to the caller (it ends the agent span)."""
    from langchain.agents.middleware import ModelFallbackMiddleware
    from langchain_core.tools import tool

    @tool
    def lookup(city: str) -> str:
        """Look a city up."""
        return f"{city}: 2M people"

    ledger = LoopStrictLedger()
    guard = Guard(Limits(max_cost_usd=1, max_tool_calls=5,
                         max_model_calls=1 if extra == "refused" else None), ledger=ledger)
    replies = [FakeReply(tool_calls=[{"name": "lookup", "arguments": {"city": "Paris"}}]),
               FakeReply("Paris has 2M people.")]
    if extra == "fallback":
        replies = [FakeReply(status=500), *replies[:1], FakeReply(status=500), replies[1]]
    with FakeOpenAIServer(replies) as server:
        def model(name: str) -> ChatOpenAI:
            return ChatOpenAI(model=name, base_url=server.base_url, api_key="x",
                              max_retries=0, max_tokens=100)

        options: dict[str, Any] = {}
        if extra in ("telemetry", "refused"):
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.trace import TracerProvider

            from agent_guard.telemetry import GuardTelemetry

            options["telemetry"] = GuardTelemetry(TracerProvider(), MeterProvider())
        inner = [ModelFallbackMiddleware(model("gpt-4o-mini"))] if extra == "fallback" else []
        agent = create_agent(model("gpt-4o"), tools=[lookup], middleware=[
            GuardMiddleware(guard, **options), *inner])
        run = agent.ainvoke({"messages": [HumanMessage("Paris?")]},
                            {"configurable": {"thread_id": SESSION}})
        if extra == "refused":
            with pytest.raises(StepLimitExceeded):
                asyncio.run(run)
        else:
            asyncio.run(run)
        assert len(server.requests) == {"fallback": 4, "refused": 1}.get(extra, 2)
    assert ledger.blocked == []
    usage = guard.usage(SESSION)
    assert usage.model_calls == (1 if extra == "refused" else 2)
    assert usage.tool_calls == 1 and usage.reserved_nano == 0
    if "telemetry" in options:
        assert options["telemetry"].open_spans() == 0


def test_the_router_ainvoke_uses_async_ledger_ops_only() -> None:
    from agent_guard.routing import ModelRouter

    ledger = LoopStrictLedger()
    guard = Guard(Limits(max_cost_usd=1), ledger=ledger)
    with FakeOpenAIServer(["Paris."]) as server:
        tiers = {name: ChatOpenAI(model=name, base_url=server.base_url, api_key="x",
                                  max_retries=0, max_tokens=100)
                 for name in ("gpt-4o-mini", "gpt-4o")}
        router = ModelRouter(tiers=tiers, guard=guard, session_id=SESSION)

        async def both() -> tuple[Any, list[Any]]:
            answer = await router.ainvoke("Capital of France?")
            return answer, [c async for c in router.astream("Capital of France?")]

        answer, chunks = asyncio.run(both())
    assert answer.content == "Paris." and chunks
    assert ledger.blocked == []


# -- 6. router copies keep its guard; guarded_graph exposes it ------------------------------


@pytest.mark.parametrize("copy", ["bind_tools", "with_structured_output", "with_config"])
def test_a_router_copy_made_before_guarded_graph_gets_the_guard(copy: str) -> None:
    from langchain_core.tools import tool
    from langgraph.graph import START, MessagesState, StateGraph
    from pydantic import BaseModel

    from agent_guard import guarded_graph
    from agent_guard.routing import ModelRouter

    @tool
    def lookup(city: str) -> str:
        """Look a city up."""
        return city

    class City(BaseModel):
        name: str

    reply = FakeReply(tool_calls=[{"name": "City", "arguments": {"name": "Paris"}}])
    with FakeOpenAIServer([reply]) as server:
        tiers = {name: ChatOpenAI(model=name, base_url=server.base_url, api_key="x",
                                  max_retries=0, max_tokens=1000)
                 for name in ("gpt-4o-mini", "gpt-4o")}
        router = ModelRouter(tiers=tiers)
        bound: Any = {"bind_tools": lambda: router.bind_tools([lookup]),
                      "with_structured_output": lambda: router.with_structured_output(City),
                      "with_config": lambda: router.with_config(tags=["x"])}[copy]()

        def node(state: MessagesState) -> dict[str, Any]:
            out = bound.invoke(state["messages"])
            return {"messages": [out if not isinstance(out, City) else ("ai", out.name)]}

        builder = StateGraph(MessagesState)
        builder.add_node("answer", node)
        builder.add_edge(START, "answer")
        # $0.006 left: gpt-4o's 1,000-token worst case ($0.01) does not fit; the mini does
        app = guarded_graph(builder, limits=Limits(max_cost_usd="0.006"), router=router)
        assert app.guard is router.guard
        app.invoke({"messages": [("user", "Capital of France?")]},
                   {"configurable": {"thread_id": SESSION}})
        assert [r["model"] for r in server.requests] == ["gpt-4o-mini"]
        assert app.guard.usage(SESSION).model_calls == 1


# -- 5. LangSmith's costs never break LangChain's usage arithmetic --------------------------


def _annotated_answers(server: FakeOpenAIServer, n: int, how: str) -> list[Any]:
    guard = Guard(Limits(max_cost_usd=1))
    model = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="x", max_retries=0,
                       max_tokens=100, stream_usage=True)
    config: Any = {"callbacks": [GuardCallbackHandler(guard, session_id=SESSION)]}
    if how == "invoke":
        return [model.invoke("Capital of France?", config) for _ in range(n)]
    if how == "ainvoke":
        async def go() -> list[Any]:
            return [await model.ainvoke("Capital of France?", config) for _ in range(n)]
        return asyncio.run(go())
    answers = []
    for _ in range(n):  # stream: the answer LangChain hands the handler, summed chunks
        total = None
        for chunk in model.stream("Capital of France?", config):
            total = chunk if total is None else total + chunk
        answers.append(total)
    return answers


@pytest.mark.parametrize("how", ["invoke", "ainvoke"])
def test_costs_are_on_the_answer_and_add_usage_keeps_ints(how: str) -> None:
    from langchain_core.messages.ai import add_usage

    with FakeOpenAIServer([FakeReply("Paris.", completion_tokens=7)]) as server:
        answers = _annotated_answers(server, 3, how)
        billed = server.billed
    for answer in answers:  # where LangSmith reads a model run's cost
        assert answer.usage_metadata["total_cost"] > 0
        assert answer.usage_metadata["input_cost"] + answer.usage_metadata["output_cost"] \
            == pytest.approx(answer.usage_metadata["total_cost"])
    total = None
    for answer in answers:
        total = add_usage(total, answer.usage_metadata)
    assert total is not None
    assert total["output_tokens"] == 21 == sum(b.completion_tokens for b in billed)
    assert all(isinstance(v, int) for v in total.values() if not isinstance(v, dict))


def test_annotated_chunks_still_add_up() -> None:
    from langchain_core.messages import AIMessageChunk

    with FakeOpenAIServer([FakeReply("Paris.", completion_tokens=7)]) as server:
        answers = _annotated_answers(server, 2, "invoke")
    chunks = []
    for answer in answers:
        chunk = AIMessageChunk(content=answer.content)
        chunk.usage_metadata = answer.usage_metadata  # as the handler left it
        chunks.append(chunk)
    summed = chunks[0] + chunks[1]
    assert summed.usage_metadata is not None
    assert summed.usage_metadata["output_tokens"] == 14


@pytest.mark.parametrize("how", ["invoke", "ainvoke", "stream"])
def test_get_usage_metadata_callback_counts_every_call(how: str) -> None:
    from langchain_core.callbacks import get_usage_metadata_callback

    with FakeOpenAIServer([FakeReply("Paris.", completion_tokens=7)]) as server:
        with get_usage_metadata_callback() as cb:
            _annotated_answers(server, 3, how)
        billed = server.billed
    (usage,) = cb.usage_metadata.values()
    assert usage["output_tokens"] == 21 == sum(b.completion_tokens for b in billed)
    assert usage["input_tokens"] == sum(b.prompt_tokens for b in billed)


# -- 2. each attempt under the middleware is admitted at its own price ----------------------


def _fallback_agent(server: FakeOpenAIServer, spy: Spy, kind: str) -> Any:
    from langchain.agents.middleware import ModelFallbackMiddleware, ModelRetryMiddleware

    def model(name: str) -> ChatOpenAI:
        return ChatOpenAI(model=name, base_url=server.base_url, api_key="x", max_retries=0,
                          max_tokens=100)

    inner = (ModelFallbackMiddleware(model("gpt-4o")) if kind == "fallback"
             else ModelRetryMiddleware(max_retries=1, initial_delay=0, jitter=False))
    return create_agent(model("gpt-4o-mini"), tools=[],
                        middleware=[GuardMiddleware(spy.guard), inner])


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("kind", ["fallback", "retry"])
def test_each_attempt_is_admitted_at_its_own_price(mode: str, kind: str) -> None:
    spy = Spy(Limits(max_cost_usd=1))
    # the first attempt fails at the provider (not billed), the second answers
    replies = [FakeReply(status=500), FakeReply("Paris.", completion_tokens=7)]
    with FakeOpenAIServer(replies) as server:
        agent = _fallback_agent(server, spy, kind)
        inputs = {"messages": [HumanMessage("Capital of France?")]}
        config = {"configurable": {"thread_id": SESSION}}
        if mode == "sync":
            agent.invoke(inputs, config)
        else:
            asyncio.run(agent.ainvoke(inputs, config))
        sent = [r["model"] for r in server.requests]
        billed = server.billed_nano(spy.guard.prices)
    second = "gpt-4o" if kind == "fallback" else "gpt-4o-mini"
    assert sent == ["gpt-4o-mini", second]
    assert [a.call.model for a in spy.admissions] == sent
    usage = spy.guard.usage(SESSION)
    # the failed attempt was not billed: released, not counted; the answer is charged
    assert usage.reserved_nano == 0 and usage.model_calls == 1
    assert usage.cost_nano >= billed > 0
    records = spy.models()
    assert [r.outcome for r in records] == ["error", "ok"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_fallback_that_does_not_fit_is_refused(mode: str) -> None:
    # $0.0008: gpt-4o-mini's 100-token worst case fits; gpt-4o's ($0.001+) does not
    spy = Spy(Limits(max_cost_usd="0.0008"))
    replies = [FakeReply(status=500), FakeReply("Paris.", completion_tokens=7)]
    with FakeOpenAIServer(replies) as server:
        agent = _fallback_agent(server, spy, "fallback")
        inputs = {"messages": [HumanMessage("Capital of France?")]}
        config = {"configurable": {"thread_id": SESSION}}
        from agent_guard import BudgetExceeded
        with pytest.raises(BudgetExceeded):
            if mode == "sync":
                agent.invoke(inputs, config)
            else:
                asyncio.run(agent.ainvoke(inputs, config))
        assert [r["model"] for r in server.requests] == ["gpt-4o-mini"]
    usage = spy.guard.usage(SESSION)
    assert usage.reserved_nano == 0 and usage.cost_nano <= spy.guard.limits.max_cost_nano


# -- 4. parity: the callback and the middleware reach the same truth ------------------------


def _conversation(adapter: str, mode: str, responses: bool) -> tuple[list[Any], Any, int]:
    from .tool_turn import QUESTION, lookup, replies

    records: list[CallRecord] = []
    guard = Guard(Limits(max_cost_usd=1, max_tool_calls=5), on_record=[records.append])
    # a fixed tool call id: a random one tokenises to a different prompt each run
    with FakeOpenAIServer(replies(call_tokens=None, call_id="call_1")) as server:
        model = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="x",
                           max_retries=0, max_tokens=200, use_responses_api=responses)
        config: Any = {}
        if adapter == "callback":
            agent = create_agent(model, tools=[lookup])
            config["callbacks"] = [GuardCallbackHandler(guard)]
        else:
            agent = create_agent(model, tools=[lookup], middleware=[GuardMiddleware(guard)])
        drive(agent, QUESTION, mode, config)
        billed = server.billed_nano(guard.prices)
    rows = [(r.kind, r.model, r.tool, r.outcome, r.usage, r.cost_nano, r.reserved_nano,
             r.usage_estimated, r.session) for r in records]
    return rows, guard.usage(SESSION), billed


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("responses", [False, True], ids=["chat", "responses"])
def test_callback_and_middleware_charge_and_record_the_same(mode: str, responses: bool
                                                            ) -> None:
    by_callback, usage_cb, billed_cb = _conversation("callback", mode, responses)
    by_middleware, usage_mw, billed_mw = _conversation("middleware", mode, responses)
    assert [(r[0], r[1][:6], r[2]) for r in by_callback] == [
        ("model", "gpt-4o", None), ("tool", "", "lookup"), ("model", "gpt-4o", None)]
    for usage, billed in ((usage_cb, billed_cb), (usage_mw, billed_mw)):
        assert usage.reserved_nano == 0 and usage.cost_nano >= billed > 0
    if responses:
        # the Responses API echoes random item ids back in the history, so the two runs'
        # prompts differ by a few tokens: everything but the amounts must match
        def shape(rows: list[Any]) -> list[Any]:
            return [(r[0], r[1], r[2], r[3], r[7], r[8]) for r in rows]

        assert shape(by_middleware) == shape(by_callback)
        return
    assert billed_cb == billed_mw
    assert by_middleware == by_callback
    assert (usage_mw.cost_nano, usage_mw.model_calls, usage_mw.tool_calls) == \
        (usage_cb.cost_nano, usage_cb.model_calls, usage_cb.tool_calls)


# -- 7. the middleware alone emits the callback's model spans ----------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_middleware_chat_spans_match_the_callbacks(mode: str) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from agent_guard.telemetry import GuardTelemetry

    def spans(adapter: str) -> list[tuple[str, dict[str, Any]]]:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        telemetry = GuardTelemetry(provider,
                                   MeterProvider(metric_readers=[InMemoryMetricReader()]),
                                   capture_content=False)
        guard = Guard(Limits(max_cost_usd=1))
        with FakeOpenAIServer([FakeReply("Paris.", completion_tokens=7)]) as server:
            model = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="x",
                               max_retries=0, max_tokens=100)
            config: Any = {"configurable": {"thread_id": SESSION}}
            if adapter == "callback":
                agent = create_agent(model, tools=[])
                config["callbacks"] = [GuardCallbackHandler(guard, telemetry=telemetry)]
            else:
                agent = create_agent(model, tools=[], middleware=[
                    GuardMiddleware(guard, telemetry=telemetry)])
            inputs = {"messages": [HumanMessage("Capital of France?")]}
            if mode == "sync":
                agent.invoke(inputs, config)
            else:
                asyncio.run(agent.ainvoke(inputs, config))
        provider.force_flush()
        keep = ("gen_ai.", "agent_guard.cost", "agent_guard.session", "agent_guard.usage")
        return [(s.name, {k: v for k, v in (s.attributes or {}).items()
                          if k.startswith(keep) and "response.id" not in k})
                for s in exporter.get_finished_spans() if s.name.startswith("chat")]

    by_callback = spans("callback")
    assert [name for name, _ in by_callback] == ["chat gpt-4o"]
    assert spans("middleware") == by_callback


# -- the middleware's answers carry LangSmith's costs and keep LangChain's arithmetic ------


@pytest.mark.parametrize("how", ["invoke", "ainvoke", "stream"])
def test_middleware_answers_keep_int_usage_through_rebuilds(how: str) -> None:
    """GuardMiddleware writes each answer's cost beside its token counts (as the callback
    does). The answers in the agent's state, and copies of them as middleware rebuild
    messages (``model_copy(update=...)``: PII, human-in-the-loop, fallback), keep the
    int-only view: ``add_usage``, ``AIMessageChunk`` addition and
    ``get_usage_metadata_callback`` add token counts, never the float costs."""
    from langchain_core.callbacks import get_usage_metadata_callback
    from langchain_core.messages import AIMessage, AIMessageChunk
    from langchain_core.messages.ai import add_usage

    from .tool_turn import QUESTION, lookup, replies

    records: list[CallRecord] = []
    guard = Guard(Limits(max_cost_usd=1, max_tool_calls=5), on_record=[records.append])
    with FakeOpenAIServer(replies()) as server:
        model = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="x",
                           max_retries=0, max_tokens=100, stream_usage=True)
        agent = create_agent(model, tools=[lookup], middleware=[GuardMiddleware(guard)])
        inputs = {"messages": [HumanMessage(QUESTION)]}
        config = {"configurable": {"thread_id": SESSION}}
        with get_usage_metadata_callback() as cb:
            if how == "invoke":
                state = agent.invoke(inputs, config)
            elif how == "ainvoke":
                state = asyncio.run(agent.ainvoke(inputs, config))
            else:
                state = list(agent.stream(inputs, config, stream_mode="values"))[-1]
        billed = server.billed
    assert state is not None
    answers = [m for m in state["messages"] if isinstance(m, AIMessage)]
    charged = [r for r in records if r.kind == "model"]
    assert len(answers) == len(charged) == 2
    for answer, record in zip(answers, charged, strict=True):
        usage = answer.usage_metadata
        assert usage is not None
        assert usage["total_cost"] == pytest.approx(float(record.cost_usd))
        assert answer.response_metadata["agent_guard"]["cost_usd"] == str(record.cost_usd)
        rebuilt = answer.model_copy(update={"content": "[redacted]"})
        assert rebuilt.usage_metadata == usage
        assert rebuilt.usage_metadata["total_cost"] == usage["total_cost"]
    # rebuilt from its fields (a checkpoint reloaded, a middleware building a new
    # message): the token counts, ints; the costs do not become plain keys
    rebuilt_answers = [a.model_copy(update={"content": "x"}) for a in answers] + [
        AIMessage(**a.model_dump()) for a in answers]
    for answer in rebuilt_answers[2:]:
        assert answer.usage_metadata == {k: v for k, v in answer.usage_metadata.items()
                                         if not k.endswith("_cost")}
    total = None
    for answer in [*answers, *rebuilt_answers]:
        total = add_usage(total, answer.usage_metadata)
    assert total is not None
    want_out = sum(b.completion_tokens for b in billed)
    assert total["output_tokens"] == 3 * want_out == 60
    assert all(isinstance(v, int) for v in total.values() if not isinstance(v, dict))
    chunks = [AIMessageChunk(content="", usage_metadata=a.usage_metadata)
              for a in rebuilt_answers]
    summed = chunks[0] + chunks[1] + chunks[2] + chunks[3]
    assert summed.usage_metadata is not None
    assert summed.usage_metadata["output_tokens"] == 2 * want_out
    (seen,) = cb.usage_metadata.values()
    assert seen["output_tokens"] == want_out
    assert seen["input_tokens"] == sum(b.prompt_tokens for b in billed)


# -- the middleware and the callback on one agent: each call charged once ----------------


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("guards", ["one_guard", "two_guards_one_ledger"])
def test_middleware_and_callback_together_charge_each_call_once(mode: str,
                                                                guards: str) -> None:
    """GuardMiddleware owns the calls it admits; a GuardCallbackHandler on the same agent
    (for its spans, or added by a platform) with a guard on the same ledger joins the
    middleware's admission and its tool counts instead of charging them again."""
    from .tool_turn import QUESTION, lookup, replies

    ledger = MemoryLedger()
    records: list[CallRecord] = []
    guard = Guard(Limits(max_cost_usd=1, max_tool_calls=5), ledger=ledger,
                  on_record=[records.append])
    other = guard if guards == "one_guard" else Guard(
        Limits(max_cost_usd=1, max_tool_calls=5), ledger=ledger, on_record=[records.append])
    with FakeOpenAIServer(replies()) as server:
        model = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="x",
                           max_retries=0)  # no cap: the middleware sends the one it reserved
        agent = create_agent(model, tools=[lookup], middleware=[GuardMiddleware(guard)])
        drive(agent, QUESTION, mode, {"callbacks": [GuardCallbackHandler(other)]})
        billed = server.billed_nano(guard.prices)
        assert all(sent_caps(r) for r in server.requests)
    usage = guard.usage(SESSION)
    assert (usage.model_calls, usage.tool_calls) == (2, 1)
    assert usage.reserved_nano == 0 and usage.cost_nano == billed > 0
    assert [(r.kind, r.outcome) for r in records] == [
        ("model", "ok"), ("tool", "ok"), ("model", "ok")]
