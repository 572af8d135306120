"""The upper bound the guard may reserve with instead of tokenising long new texts.

1. The bound (a text's UTF-8 length) is never below tiktoken's count, on any text,
   for both bundled encodings; an estimate of a prompt is never below its exact count.
2. The guard uses the bound only while a cap is far, counts exactly near a cap (a call
   that fits exactly is admitted), retries a denied bound with the exact count, and
   settles a call without usage from the exact count, never from the bound.
"""

from __future__ import annotations

import math
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from agent_guard import Guard, Limits
from agent_guard.engine.admission import ModelCall
from agent_guard.ledger.memory import MemoryLedger
from agent_guard.tokens import BOUND_MIN_CHARS, TokenCounter, get_encoding, utf8_upper_bound

# any code point, lone surrogates included (Python strings may carry them; tiktoken
# replaces them with U+FFFD)
any_char = st.characters(min_codepoint=0, max_codepoint=0x10FFFF,
                         categories=None, exclude_categories=())
texts = st.text(alphabet=any_char, max_size=400) | st.text(max_size=2000) | st.from_regex(
    r"[ \t\n!-~]{0,600}", fullmatch=True) | st.lists(
    st.sampled_from(["  ", "\n\n", "ab", "123", "😀", "é", "日本", " the", "\r\n", "\u200b"]),
    max_size=300).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts)
def test_utf8_length_is_never_below_the_token_count(text: str) -> None:
    bound = utf8_upper_bound(text)
    for name in ("o200k_base", "cl100k_base"):
        assert len(get_encoding(name).encode_ordinary(text)) <= bound


def fresh(n: int, alphabet: str = "lorem ipsum dolor sit amet ") -> str:
    """A long text no memo has seen."""
    tag = uuid.uuid4().hex
    return (tag + " " + alphabet * (n // len(alphabet) + 1))[:n]


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 3 * BOUND_MIN_CHARS), min_size=1, max_size=5),
       model=st.sampled_from(["gpt-4o", "gpt-4", "claude-sonnet-4-5"]),
       unicode=st.booleans())
def test_an_estimate_is_never_below_the_exact_count(sizes: list[int], model: str,
                                                     unicode: bool) -> None:
    counter = TokenCounter()
    alphabet = "größe 日本語 😀 " if unicode else "lorem ipsum dolor "
    messages = [SystemMessage(fresh(sizes[0], alphabet))] + [
        HumanMessage(fresh(n, alphabet)) for n in sizes[1:]]
    estimate, exact = counter.estimate_messages(messages, model)
    counted = counter.count_messages(messages, model)
    assert estimate >= counted
    if exact:
        assert estimate == counted
    # once counted, the same texts are estimated exactly (they are memoised)
    assert counter.estimate_messages(messages, model) == (counted, True)


def call(messages, **kw) -> ModelCall:
    return ModelCall(session="s", model="gpt-4o", messages=messages, max_output_tokens=100,
                     **kw)


def test_far_from_the_caps_a_long_new_text_is_reserved_by_its_bound() -> None:
    guard = Guard(Limits(max_tokens=10**9, max_cost_usd=10**6))
    text = fresh(20_000)
    admission = guard.before_model_call(call([HumanMessage(text)]))
    assert admission.input_is_bound
    exact = guard.tokens.count_messages([HumanMessage(text)], "gpt-4o")
    assert admission.estimated_input_tokens >= exact
    assert admission.estimated_input_tokens > 2 * exact  # English: ~4 bytes a token
    # a provider that reports no usage: settled from the exact count, not the bound
    record = guard.after_model_call(admission, None, output_tokens=7)
    assert record.usage_estimated and record.usage.input_tokens == exact
    used = guard.usage("s")
    assert (used.input_tokens, used.output_tokens, used.reserved_tokens) == (exact, 7, 0)


def test_near_a_cap_the_prompt_is_counted_and_an_exact_fit_is_admitted() -> None:
    text = fresh(20_000)
    messages = [SystemMessage("be brief"), HumanMessage(text), AIMessage("ok"),
                ToolMessage(fresh(3000), tool_call_id="c1")]
    exact = TokenCounter().count_messages(messages, "gpt-4o")
    margin = Limits().input_margin
    needed = math.ceil(exact * (1 + margin)) + 100  # the reservation with the exact count
    guard = Guard(Limits(max_tokens=needed))
    admission = guard.before_model_call(call(messages))
    assert not admission.input_is_bound
    assert admission.estimated_input_tokens == exact
    assert admission.reservation.amounts["tokens"] == needed  # exactly the cap
    guard.after_model_call(admission, None, output_tokens=0)


def test_a_denied_bound_is_retried_with_the_exact_count() -> None:
    """Another guard on the same ledger spent most of the budget, so this guard's hint
    is stale: its bound is denied, the exact count fits."""
    ledger = MemoryLedger()
    limits = Limits(max_tokens=1_000_000)
    other, guard = Guard(limits, ledger), Guard(limits, ledger)
    spender = other.before_model_call(ModelCall(session="s", model="gpt-4o",
                                                input_tokens=10, max_output_tokens=10))
    other.after_model_call(spender, None, output_tokens=980_000)
    text = fresh(40_000)
    exact = guard.tokens.count_messages([HumanMessage(text)], "gpt-4o")
    assert utf8_upper_bound(text) > 20_000 > 2 * exact
    admission = guard.before_model_call(call([HumanMessage(text)]))
    assert not admission.input_is_bound and admission.estimated_input_tokens == exact


def test_the_hint_from_settlements_makes_the_guard_count_exactly_near_the_cap() -> None:
    guard = Guard(Limits(max_tokens=1_000_000))
    first = guard.before_model_call(ModelCall(session="s", model="gpt-4o", input_tokens=10,
                                              max_output_tokens=10))
    guard.after_model_call(first, None, output_tokens=900_000)
    admission = guard.before_model_call(call([HumanMessage(fresh(60_000))]))
    assert not admission.input_is_bound  # 60k bytes > 10% of the ~100k left


def test_estimate_model_call_counts_exactly() -> None:
    guard = Guard(Limits(max_cost_usd=10**6))
    text = fresh(20_000)
    estimate = guard.estimate_model_call(call([HumanMessage(text)]))
    exact = guard.tokens.count_messages([HumanMessage(text)], "gpt-4o")
    assert estimate == Guard(Limits(max_cost_usd=10**6)).estimate_model_call(
        ModelCall(session="s", model="gpt-4o", input_tokens=exact, max_output_tokens=100))
