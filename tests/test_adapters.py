"""One adapter core (issue 14): GuardMiddleware bounds every call in the field the
provider's request really carries, admits each attempt at its own price, and uses the
async ledger on async paths; callback and middleware read answers the same way.

Every test drives the real ``ChatOpenAI`` against ``FakeOpenAIServer`` and reads what
was sent (``server.requests``) and billed (``server.billed``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI

from agent_guard import Guard, GuardMiddleware, Limits
from agent_guard.guard import Admission
from agent_guard.ledger import Ledger, MemoryLedger
from agent_guard.records import CallRecord
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


def run_agent(model: Any, mw: GuardMiddleware, mode: str, *, extra: list[Any] = ()
              ) -> dict[str, Any]:
    agent = create_agent(model, tools=[], middleware=[mw, *extra])
    inputs = {"messages": [HumanMessage("What is the capital of France?")]}
    config = {"configurable": {"thread_id": SESSION}}
    if mode == "sync":
        return agent.invoke(inputs, config)
    return asyncio.run(agent.ainvoke(inputs, config))


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
