"""Hostile and malformed input at the public entry points: a clear error or a safe default,
and the ledger stays consistent. A fixed budget of examples, so CI time is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_guard import Guard, GuardError, Limits, PriceBook
from agent_guard.engine.admission import ModelCall
from agent_guard.engine.usage import MalformedUsage, Usage
from agent_guard.ledger import from_url

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

junk = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                      st.integers(), max_size=2))
usage_like = st.dictionaries(
    st.sampled_from(["input_tokens", "output_tokens", "total_tokens", "input_token_details",
                     "output_token_details", "total_cost"]),
    st.one_of(junk, st.dictionaries(st.sampled_from(["cache_read", "cache_creation",
                                                     "reasoning", "audio"]), junk, max_size=3)),
    max_size=6)


@FUZZ
@given(raw=usage_like)
def test_usage_metadata_is_read_or_refused_with_a_clear_error(raw) -> None:
    try:
        usage = Usage.from_usage_metadata(raw)
    except MalformedUsage as exc:
        assert str(exc)
        return
    assert usage.input_tokens >= usage.cache_read_tokens + usage.cache_creation_tokens >= 0
    assert usage.output_tokens >= usage.reasoning_tokens >= 0


@FUZZ
@given(model=st.text(max_size=60), provider=st.one_of(st.none(), st.text(max_size=12)))
def test_any_model_name_resolves_or_not_without_crashing(model, provider) -> None:
    price = PriceBook.bundled().resolve(model, provider)
    assert price is None or price.input >= 0


@FUZZ
@given(cap=junk, tokens=junk, calls=junk)
def test_limits_accept_good_numbers_and_explain_bad_ones(cap, tokens, calls) -> None:
    try:
        limits = Limits(max_cost_usd=cap, max_tokens=tokens, max_model_calls=calls)
    except (ValueError, TypeError) as exc:
        assert "Limits." in str(exc)
        return
    caps = limits.caps()
    assert all(isinstance(v, int) and v >= 0 for v in caps.values())
    if isinstance(cap, float):
        assert math.isfinite(cap)


@FUZZ
@given(url=st.text(max_size=40))
def test_bad_ledger_urls_say_what_is_expected(url) -> None:
    if url.startswith(("memory://", "sqlite:", "redis", "rediss", "unix")):
        return  # valid schemes are exercised elsewhere
    try:
        from_url(url)
    except ValueError as exc:
        assert "memory://" in str(exc) or "scheme" in str(exc)


@FUZZ
@given(session=st.text(min_size=0, max_size=40), tool=st.text(min_size=1, max_size=20),
       args=st.dictionaries(st.text(max_size=5), junk, max_size=3),
       prompt=st.integers(0, 10**7), max_out=st.one_of(st.none(), st.integers(-5, 10**6)))
def test_odd_sessions_tools_and_sizes_keep_the_ledger_consistent(session, tool, args, prompt,
                                                                max_out) -> None:
    guard = Guard(Limits(max_cost_usd=1, max_tool_calls=3, max_repeats=1))
    try:
        adm = guard.before_model_call(ModelCall(session=session, model="gpt-4o",
                                                input_tokens=prompt, max_output_tokens=max_out))
    except GuardError:
        adm = None
    if adm is not None:
        guard.after_model_call(adm, Usage(prompt, min(adm.max_output_tokens, 10)))
    for _ in range(2):
        with contextlib.suppress(GuardError):
            guard.before_tool_call(session, tool, args)
    u = guard.usage(session)
    assert u.reserved_nano == 0 and 0 <= u.cost_nano <= 10**9
    assert u.tool_calls == 1  # the identical second call was refused as a repeat
    assert guard.usage(session + "\x00other").cost_nano == 0  # no bleed between names


any_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF),
                   max_size=300)


@FUZZ
@given(turns=st.lists(any_text, min_size=1, max_size=4),
       repeat=st.sampled_from([1, 1, 1000, 20_000]), use_async=st.booleans())
def test_any_unicode_prompt_through_a_real_chat_model_is_charged_or_refused(
        turns: list[str], repeat: int, use_async: bool) -> None:
    """Arbitrary code points (lone surrogates, NUL, private use, astral) and prompts up
    to a few MB, through GuardCallbackHandler on a LangChain chat model: the call is
    charged and settled, or refused before it runs; nothing stays reserved."""
    from langchain_core.messages import HumanMessage

    from agent_guard import BudgetExceeded, GuardCallbackHandler
    from agent_guard.testing import ScriptedChatModel

    guard = Guard(Limits(max_cost_usd="0.05", max_tokens=400_000))
    handler = GuardCallbackHandler(guard, session_id="fuzz")
    model = ScriptedChatModel(model_name="gpt-4o", max_tokens=50)
    messages = [HumanMessage(t * repeat) for t in turns]
    config: Any = {"callbacks": [handler]}
    try:
        if use_async:
            asyncio.run(model.ainvoke(messages, config=config))
        else:
            model.invoke(messages, config=config)
    except BudgetExceeded as exc:
        assert exc.dimension in ("usd_nano", "tokens") and exc.requested > 0
        assert guard.usage("fuzz").model_calls == 0  # refused before it ran
    else:
        u = guard.usage("fuzz")
        assert u.model_calls == 1 and u.cost_nano > 0
        assert u.cost_nano <= 50_000_000  # the caps held
        assert u.input_tokens + u.output_tokens <= 400_000
    after = guard.usage("fuzz")
    assert after.reserved_nano == 0 and after.reserved_tokens == 0
