"""An answer of one prompt and one choice is read as the general reader reads it (the
one-choice path returns early): usage, response model, cache hit, counted output."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration

from agent_guard.langchain.call import read_answer
from agent_guard.tokens import TokenCounter

COUNTER = TokenCounter()
counts = st.one_of(st.integers(0, 10**6), st.just(-1), st.just(2.5))
names = st.one_of(st.none(), st.just(""), st.just("gpt-4o-mini"))


@st.composite
def answers(draw: Any) -> tuple[Any, Any]:
    um: Any = None
    if draw(st.booleans()):
        i, o = draw(counts), draw(counts)
        um = {"input_tokens": i, "output_tokens": o,
              "total_tokens": (i + o) if isinstance(i + o, int) else 0}
        if draw(st.booleans()):
            um["total_cost"] = draw(st.sampled_from([0, 0.5]))
        if draw(st.booleans()):
            um["output_token_details"] = {"reasoning": draw(st.integers(0, 5))}
    meta: dict[str, Any] = {}
    for key in ("model_name", "model"):
        value = draw(names)
        if value is not None:
            meta[key] = value
    message = AIMessage.model_construct(content=draw(st.sampled_from(["", "an answer"])),
                                        usage_metadata=um, response_metadata=meta,
                                        tool_calls=[], invalid_tool_calls=[])
    item = draw(st.sampled_from(["generation", "message"]))
    choice = ChatGeneration(message=message) if item == "generation" else message
    llm_output = draw(st.sampled_from([None, {}, {"model_name": "from-output"},
                                       {"token_usage": {"prompt_tokens": 3,
                                                        "completion_tokens": 4}}]))
    return [[choice]], llm_output


@settings(max_examples=400, deadline=None)
@given(answers(), st.integers(0, 3))
def test_one_choice_reads_as_the_general_reader(answer: Any, streamed: int) -> None:
    prompts, llm_output = answer
    fast = read_answer(prompts, llm_output, "gpt-4o-mini", COUNTER, streamed)
    general = read_answer(tuple(prompts), llm_output, "gpt-4o-mini", COUNTER, streamed)
    assert fast.as_tuple() == general.as_tuple()
