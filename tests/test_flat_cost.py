"""Per-call work that follows what is new (issue 19): counting a prompt costs the messages
not seen before in the conversation, the text memo forgets gradually, and scope refs are
built once per window period. Work is counted (calls, constructions), never timed."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from agent_guard import tokens
from agent_guard.tokens import TokenCounter, request_features

COUNTER = TokenCounter()


def _messages(n: int, tag: str = "") -> list[Any]:
    out: list[Any] = [SystemMessage(f"You are terse {tag}.")]
    for i in range(1, n):
        out.append(HumanMessage(f"question {tag}{i}") if i % 2 else AIMessage(f"answer {tag}{i}"))
    return out


class _Counted:
    """Counts the messages counted: by tokens._message_tokens, or by
    tokens._plain_message_tokens (a LangChain message of text)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        inner = tokens._message_tokens
        plain = tokens._plain_message_tokens

        def counting(*args: Any, **kwargs: Any) -> int:
            self.n += 1
            return inner(*args, **kwargs)

        def counting_plain(*args: Any, **kwargs: Any) -> int | None:
            n = plain(*args, **kwargs)
            self.n += n is not None
            return n

        monkeypatch.setattr(tokens, "_message_tokens", counting)
        monkeypatch.setattr(tokens, "_plain_message_tokens", counting_plain)


def _exact(messages: list[Any], model: str = "gpt-4o",
           tools: Any = None) -> tuple[int, bool, Any]:
    return (COUNTER.count_messages(messages, model, tools=tools), True,
            request_features(messages, tools))


def test_a_growing_conversation_counts_only_its_new_messages(monkeypatch):
    counted = _Counted(monkeypatch)
    history = _messages(200, "grow")
    assert COUNTER.estimate_prompt(history, conversation="s-grow") == _exact(history)
    counted.n = 0
    for i in range(5):
        history = [*history, AIMessage(f"new answer {i}"), HumanMessage(f"new question {i}")]
        assert COUNTER.estimate_prompt(history, conversation="s-grow") == _exact(history)
    # _exact counts every message each time; estimate_prompt only the 2 new ones
    assert counted.n == 5 * 2 + sum(200 + 2 * i for i in range(1, 6))


def test_without_a_conversation_every_message_is_counted(monkeypatch):
    counted = _Counted(monkeypatch)
    history = _messages(50, "none")
    COUNTER.estimate_prompt(history)
    COUNTER.estimate_prompt(history)
    assert counted.n == 100


def test_a_trimmed_history_reuses_the_common_start(monkeypatch):
    counted = _Counted(monkeypatch)
    history = _messages(100, "trim")
    COUNTER.estimate_prompt(history, conversation="s-trim")
    counted.n = 0
    trimmed = [*history[:40], HumanMessage("summary of the rest")]
    assert COUNTER.estimate_prompt(trimmed, conversation="s-trim")[0] == \
        COUNTER.count_messages(trimmed)
    assert counted.n == 1 + len(trimmed)  # the new message, then _exact's full count


def test_equal_but_new_message_objects_are_not_recounted(monkeypatch):
    """Dict messages become new BaseMessage objects on every call: equal ones match."""
    counted = _Counted(monkeypatch)
    COUNTER.estimate_prompt(_messages(30, "eq"), conversation="s-eq")
    counted.n = 0
    COUNTER.estimate_prompt([*_messages(30, "eq"), HumanMessage("more")], conversation="s-eq")
    assert counted.n == 1


@pytest.mark.parametrize("kept", [8, 10])  # trimmed and rebuilt / rebuilt whole
def test_a_rebuilt_history_is_matched_by_identity_from_then_on(kept):
    """Equal new message objects are taken as counted once; the conversation then holds
    them, so the next prompt made of them needs no __eq__ per message."""
    eqs = []

    class Compared(HumanMessage):
        def __eq__(self, other: object) -> bool:
            eqs.append(1)
            return super().__eq__(other)

        __hash__ = HumanMessage.__hash__

    key = object()
    first = [Compared(f"rebuilt {i}") for i in range(10)]
    COUNTER.estimate_prompt(first, conversation=key)
    rebuilt = [*(Compared(f"rebuilt {i}") for i in range(kept)), HumanMessage("next")]
    assert COUNTER.estimate_prompt(rebuilt, conversation=key) == _exact(rebuilt)
    assert eqs
    eqs.clear()
    grown = [*rebuilt, AIMessage("answer")]
    assert COUNTER.estimate_prompt(grown, conversation=key) == _exact(grown)
    assert not eqs


def test_conversations_are_apart_by_key_and_model():
    a = _messages(10, "a")
    assert COUNTER.estimate_prompt(a, "gpt-4o", conversation="k")[0] == \
        COUNTER.count_messages(a, "gpt-4o")
    assert COUNTER.estimate_prompt(a, "gpt-4", conversation="k")[0] == \
        COUNTER.count_messages(a, "gpt-4")
    b = _messages(10, "b")
    assert COUNTER.estimate_prompt(b, "gpt-4o", conversation="k")[0] == \
        COUNTER.count_messages(b, "gpt-4o")


def test_a_long_text_is_a_bound_until_counted_then_exact(monkeypatch):
    long = "word " * 400  # over BOUND_MIN_CHARS: sized by its UTF-8 length while new
    history = [SystemMessage("sys"), HumanMessage(long + " unique-long-1")]
    n, exact, _ = COUNTER.estimate_prompt(history, conversation="s-long")
    assert not exact and n >= COUNTER.count_messages(history)
    COUNTER.count_messages(history)  # the guard counts exactly near a cap / at settle
    grown = [*history, AIMessage("ok")]
    assert COUNTER.estimate_prompt(grown, conversation="s-long") == _exact(grown)


def test_conversations_are_bounded(monkeypatch):
    monkeypatch.setattr(tokens, "_CONVERSATIONS_MAX", 3)
    monkeypatch.setattr(tokens, "_CONVERSATION_MESSAGES_MAX", 25)
    memo = tokens._Conversations()
    monkeypatch.setattr(tokens, "_conversations", memo)
    for i in range(5):
        COUNTER.estimate_prompt(_messages(10, f"b{i}"), conversation=f"bounded-{i}")
    assert len(memo._items) == 2 and memo._held == 20  # 25 messages at most
    assert list(memo._items) == [("bounded-3", "gpt-4o"), ("bounded-4", "gpt-4o")]


def test_the_text_memo_never_forgets_what_was_just_used(monkeypatch):
    monkeypatch.setattr(tokens, "_MEMO_ENTRIES", 100)
    counts = tokens._TextCounts("o200k_base")
    counts("kept")
    for i in range(1000):
        counts(f"filler {i}")
        counts("kept")  # used in every generation
        assert counts.get("kept") is not None
    assert len(counts) <= 200


_texts = st.text(alphabet="abc xyz\u00e9\u4e2d", min_size=0, max_size=30)
_message = st.one_of(
    _texts.map(HumanMessage), _texts.map(AIMessage), _texts.map(SystemMessage),
    _texts.map(lambda t: ToolMessage(t, tool_call_id="call_1")),
    _texts.map(lambda t: {"role": "user", "content": t}),
    _texts.map(lambda t: HumanMessage([{"type": "text", "text": t,
                                        "cache_control": {"type": "ephemeral"}}])),
    _texts.map(lambda t: HumanMessage([{"type": "image_url",
                                        "image_url": {"url": "https://x/" + t}}])),
)
_step = st.one_of(
    st.tuples(st.just("append"), st.lists(_message, max_size=4)),
    st.tuples(st.just("trim"), st.integers(0, 30)),
    st.tuples(st.just("replace"), st.integers(0, 30), _message),
    st.tuples(st.just("copy"), st.integers(0, 30)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_message, max_size=10), st.lists(_step, max_size=8),
       st.sampled_from(["gpt-4o", "gpt-4", "claude-3-5-sonnet"]))
def test_estimate_prompt_equals_a_full_count_whatever_the_history_does(start, steps, model):
    key = object()
    history = list(start)
    assert COUNTER.estimate_prompt(history, model, conversation=key) == _exact(history, model)
    for step in steps:
        if step[0] == "append":
            history = history + step[1]
        elif step[0] == "trim":
            history = history[:step[1]]
        elif step[0] == "copy":  # equal but new objects from a point on (rebuilt history)
            history = [*history[:step[1]], *map(copy.copy, history[step[1]:])]
        elif history:
            history = list(history)
            history[step[1] % len(history)] = step[2]
        assert COUNTER.estimate_prompt(history, model, conversation=key) == \
            _exact(history, model)


_long_texts = st.builds(lambda t, k: (t + " ") * k, _texts, st.integers(1, 60))
_call = st.builds(lambda name, args: {"name": name, "args": {"q": args}, "id": "call_1"},
                  _texts, _texts)
_lc_message = st.one_of(
    st.builds(HumanMessage, st.one_of(_texts, _long_texts), name=st.none() | _texts),
    st.builds(SystemMessage, _texts),
    st.builds(lambda t, calls: AIMessage(t, tool_calls=calls), _texts,
              st.lists(_call, max_size=2)),
    st.builds(lambda t: AIMessage(t, invalid_tool_calls=[
        {"name": "f", "args": "{bad", "id": "c", "error": None, "type": "invalid_tool_call"}]),
        _texts),
    st.builds(AIMessageChunk, _texts),
    st.builds(lambda t, i: ToolMessage(t, tool_call_id=i), _texts, _texts),
    st.builds(lambda t, r: ChatMessage(t, role=r), _texts, st.sampled_from(["user", "critic"])),
    st.builds(lambda t: HumanMessage(t, additional_kwargs={"cache_control": {"ttl": "1h"}}),
              _texts),
    st.builds(lambda t: HumanMessage([{"type": "text", "text": t}]), _texts),
)


class _Human(HumanMessage):
    """Not one of LangChain's own classes: read the general way."""


@settings(max_examples=300, deadline=None)
@given(_lc_message, st.sampled_from(["o200k_base", "cl100k_base", tokens.CLAUDE_COUNTS]))
def test_a_langchain_message_of_text_is_read_as_the_general_reader_reads_it(message, name):
    counts = tokens._TEXT_COUNTS[name]
    fast, general = tokens._Estimate(counts), tokens._Estimate(counts)
    n = tokens._plain_message_tokens(message, fast)
    expected = tokens.TOKENS_PER_MESSAGE + tokens._message_tokens(message, general)
    if n is None:  # left to the general reader: other content or a cache-write marker
        assert (type(message.content) is not str
                or "cache_control" in message.additional_kwargs)
    else:
        assert (n, fast.exact) == (expected, general.exact)
        assert tokens._message_features(message) == (None, False, False)
        assert tokens._is_system(message) is (message.type == "system")
    assert tokens._plain_message_tokens(_Human("hi"), fast) is None


# -- rolling windows on the memory ledger: earlier buckets summed once, kept exact -----------

_BUCKETS = [f"team:t@3h:{i}" for i in range(6)]
_ops = st.lists(st.one_of(
    st.tuples(st.just("reserve"), st.integers(2, 5), st.integers(0, 400), st.booleans()),
    st.tuples(st.just("settle"), st.integers(0, 30), st.integers(0, 400)),
    st.tuples(st.just("release"), st.integers(0, 30)),
    st.tuples(st.just("charge"), st.integers(2, 5), st.integers(0, 400)),
), max_size=60)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_memory_ledger_rolling_windows_decide_as_the_full_sum(ops):
    """Every reply of the memory ledger (which keeps the earlier buckets' sums) is the
    rule applied to every bucket's totals read afresh; settles and releases of holds in
    buckets that are past by now are seen."""
    from agent_guard.ledger import MemoryLedger, Reservation, ScopeCaps
    from agent_guard.ledger.base import first_denial

    ledger = MemoryLedger()
    held: list[Reservation] = []
    caps = {"usd_nano": 1000, "model_calls": 6}

    def scopes(current: int) -> list[ScopeCaps]:
        history = tuple(_BUCKETS[i] for i in range(current - 1, max(-1, current - 3), -1))
        return [ScopeCaps("session:s", {"usd_nano": 1500}),
                ScopeCaps(_BUCKETS[current], caps, history)]

    def expected(sc: list[ScopeCaps], amounts: dict[str, int]) -> Any:
        names = {s.scope for s in sc} | {h for s in sc for h in s.history}
        return first_denial(sc, amounts, {n: ledger.totals(n) for n in names})

    for op in ops:
        if op[0] in ("reserve", "charge"):
            sc = scopes(op[1])
            amounts = {"usd_nano": op[2], "model_calls": 1}
            want = expected(sc, amounts)
            if op[0] == "reserve":
                got = ledger.reserve(sc, amounts, lease_seconds=60)
                if isinstance(got, Reservation):
                    assert want is None
                    held.append(got)
                else:
                    assert got == want
            else:
                assert ledger.charge(sc, amounts) == want
        elif held:
            res = held.pop(op[1] % len(held))
            if op[0] == "settle":
                ledger.settle(res, {"usd_nano": op[2], "model_calls": 1})
            else:
                ledger.release(res)


# -- integer pricing: the same nano-USD as the Decimal sums ----------------------------------

def _prices() -> list[Any]:
    from agent_guard.pricing import PriceBook

    book = PriceBook.default()
    return [book._prices[m] for m in sorted(book._prices)]


@st.composite
def _usages(draw: Any) -> Any:
    from agent_guard.engine.usage import Usage

    n = st.integers(0, 3_000_000)
    i, o = draw(n), draw(n)
    cr = draw(st.integers(0, i))
    cw = draw(st.integers(0, i - cr))
    ai = draw(st.integers(0, i))
    ii = draw(st.integers(0, i - ai))
    r = draw(st.integers(0, o))
    ao = draw(st.integers(0, o - r))
    io = draw(st.integers(0, o - r - ao))
    return Usage(input_tokens=i, output_tokens=o, cache_read_tokens=cr,
                 cache_creation_tokens=cw, cache_creation_1h_tokens=draw(st.integers(0, cw)),
                 reasoning_tokens=r, audio_input_tokens=ai, image_input_tokens=ii,
                 audio_output_tokens=ao, image_output_tokens=io,
                 service_tier=draw(st.sampled_from([None, "priority", "flex"])))


@settings(max_examples=300, deadline=None)
@given(st.data(), _usages(), st.integers(0, 3_000_000), st.integers(0, 200_000))
def test_integer_pricing_charges_what_the_decimal_sums_charge(data, usage, prompt, output):
    price = data.draw(st.sampled_from(_prices()))
    assert price.cost_nano(usage) == price.decimal_cost_nano(usage)
    cost = price.cost(usage)
    assert price.prompt_completion_usd(usage) == (float(cost.prompt_usd),
                                                  float(cost.completion_usd))
    r = price.rates(prompt)
    from decimal import ROUND_CEILING, Decimal
    worst = (prompt * r.input + output * max(r.output, r.reasoning)) * Decimal(10**9)
    if "output_cost_per_image_token" not in price.fields:
        assert price.worst_cost_nano(prompt, output) == int(
            worst.to_integral_value(rounding=ROUND_CEILING))


def test_a_bound_is_looked_at_again_only_after_a_text_was_counted(monkeypatch):
    """A long text sized by its bound is not re-examined on every call: only once some
    text was counted since; and once its own text is counted, the estimate is exact."""
    long_text = "A careful support agent checks every order. " * 40  # > BOUND_MIN_CHARS
    prompt = [SystemMessage(long_text + "unique-bound-text"), HumanMessage("hi")]
    model = "gpt-4o-mini"
    first = COUNTER.estimate_prompt(prompt, model, conversation="bound-look")
    assert first[1] is False  # sized by the bound
    counted = _Counted(monkeypatch)
    for _ in range(5):
        again = COUNTER.estimate_prompt(prompt, model, conversation="bound-look")
        assert again[:2] == first[:2]
    assert counted.n <= 1  # looked at once at most, not on every call
    COUNTER.count_text(long_text + "unique-bound-text", model)  # counted exactly now
    exact = COUNTER.estimate_prompt(prompt, model, conversation="bound-look")
    assert exact[1] is True
    assert exact[0] == COUNTER.estimate_prompt(prompt, model)[0] < first[0]
