"""The engine on its own: worst-case reservations, settlement, refusals, shrink-to-fit."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_guard import (
    BudgetExceeded,
    Guard,
    Limits,
    PriceBook,
    StepLimitExceeded,
    UnknownModelPrice,
)
from agent_guard.engine.admission import ModelCall
from agent_guard.engine.usage import Usage, usd_to_nano

# gpt-4o list prices, typed here on purpose (not read from the code under test)
IN, OUT, CACHED = Decimal("2.5e-06"), Decimal("1e-05"), Decimal("1.25e-06")


def nano(usd: Decimal) -> int:
    return usd_to_nano(usd)


def call(session: str = "s", **kw) -> ModelCall:
    kw.setdefault("model", "gpt-4o")
    kw.setdefault("input_tokens", 1000)
    kw.setdefault("max_output_tokens", 500)
    return ModelCall(session=session, **kw)


def test_reservation_is_the_worst_case_and_settle_is_exact() -> None:
    guard = Guard(Limits(max_cost_usd=1, input_margin=0.1))
    adm = guard.before_model_call(call())
    # 1000 prompt tokens + 10% margin, all uncached; 500 output tokens
    assert adm.reserved_nano == nano(1100 * IN + 500 * OUT)
    u = guard.usage("s")
    assert u.reserved_nano == adm.reserved_nano and u.cost_nano == 0
    record = guard.after_model_call(
        adm, Usage(input_tokens=1000, output_tokens=120, cache_read_tokens=600)
    )
    expected = nano(400 * IN + 600 * CACHED + 120 * OUT)
    assert record.cost_nano == expected
    assert record.usage_estimated is False
    u = guard.usage("s")
    assert (u.cost_nano, u.reserved_nano, u.model_calls) == (expected, 0, 1)
    assert (u.input_tokens, u.output_tokens, u.cached_tokens) == (1000, 120, 600)
    assert u.remaining_usd == Decimal(1) - Decimal(expected) / 10**9


def test_refusal_happens_before_spending_and_says_what_to_do() -> None:
    guard = Guard(Limits(max_cost_usd="0.01"))
    with pytest.raises(BudgetExceeded) as info:
        guard.before_model_call(call(max_output_tokens=4000))  # worst case $0.04+
    err = info.value
    assert err.session == "s" and err.dimension == "usd_nano"
    assert err.cap == nano(Decimal("0.01")) and err.spent == 0
    assert "Nothing was spent" in str(err) and "Raise the cap" in str(err)
    assert guard.usage("s").reserved_nano == 0


def test_default_output_reservation_applies_without_max_tokens() -> None:
    guard = Guard(Limits(max_tokens=10_000, default_max_output_tokens=2000, input_margin=0))
    adm = guard.before_model_call(call(max_output_tokens=None, input_tokens=100))
    assert adm.max_output_tokens == 2000
    assert guard.usage("s").reserved_tokens == 2100


def test_count_caps_raise_step_limit() -> None:
    guard = Guard(Limits(max_model_calls=2, max_tool_calls=1))
    for _ in range(2):
        guard.after_model_call(guard.before_model_call(call()), Usage(10, 10))
    with pytest.raises(StepLimitExceeded, match="cap on model calls"):
        guard.before_model_call(call())
    guard.before_tool_call("s", "search")
    with pytest.raises(StepLimitExceeded, match="looping"):
        guard.before_tool_call("s", "search")
    assert guard.usage("s").tool_calls == 1


def test_unknown_model_price_is_an_explicit_decision(caplog) -> None:
    guard = Guard(Limits(max_cost_usd=1))
    with pytest.raises(UnknownModelPrice) as info:
        guard.before_model_call(call(model="acme-llm-9000"))
    msg = str(info.value)
    assert "acme-llm-9000" in msg and "with_overrides" in msg and "AGENT_GUARD_PRICES" in msg
    assert guard.usage("s").reserved_nano == 0

    with pytest.raises(ValueError, match="could not hold"):
        Limits(max_cost_usd=1, unknown_price="allow")  # $0 under a dollar cap: refused

    lenient = Guard(Limits(max_tokens=10_000, unknown_price="allow"))  # no dollar cap
    with caplog.at_level(logging.WARNING, logger="agent_guard"):
        adm = lenient.before_model_call(call(model="acme-llm-9000"))
    assert "no price for model 'acme-llm-9000'" in caplog.text
    record = lenient.after_model_call(adm, Usage(100, 50))
    assert record.unpriced and record.cost_nano == 0
    assert lenient.usage("s").output_tokens == 50

    stated = {"input_cost_per_token": 1e-05, "output_cost_per_token": 4e-05}
    conservative = Guard(Limits(max_cost_usd=1, unknown_price=stated))
    adm = conservative.before_model_call(call(model="acme-llm-9000"))
    assert adm.reserved_nano > 0 and conservative.usage("s").reserved_nano == adm.reserved_nano
    record = conservative.after_model_call(adm, Usage(100, 50))
    assert record.unpriced and record.cost_nano == 100 * 10_000 + 50 * 40_000

    priced = Guard(
        Limits(max_cost_usd=1),
        prices=PriceBook.default().with_overrides(
            {"acme-llm-9000": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06}}
        ),
    )
    adm = priced.before_model_call(call(model="acme-llm-9000"))
    assert priced.after_model_call(adm, Usage(100, 50)).cost_nano == 100 * 1000 + 50 * 2000


def test_no_usage_settles_from_the_count_and_is_marked_estimated() -> None:
    guard = Guard(Limits(max_cost_usd=1))
    adm = guard.before_model_call(call(input_tokens=1000))
    record = guard.after_model_call(adm, None, output_tokens=40)
    assert record.usage_estimated
    assert record.cost_nano == nano(1000 * IN + 40 * OUT) > 0


def test_failed_call_releases_and_streamed_failure_is_charged() -> None:
    guard = Guard(Limits(max_cost_usd=1))
    adm = guard.before_model_call(call())
    assert guard.model_call_failed(adm).outcome == "error"
    assert guard.usage("s").reserved_nano == 0 and guard.usage("s").cost_nano == 0
    adm = guard.before_model_call(call(input_tokens=1000))
    record = guard.model_call_failed(adm, output_tokens=30)
    assert record.outcome == "aborted" and record.usage_estimated
    assert guard.usage("s").cost_nano == nano(1000 * IN + 30 * OUT)


def test_cache_hit_costs_nothing_and_records_the_saving() -> None:
    guard = Guard(Limits(max_cost_usd=1))
    adm = guard.before_model_call(call())
    record = guard.after_model_call(adm, Usage(1000, 100), cache_hit=True)
    assert record.cost_nano == 0 and record.saved_nano == nano(1000 * IN + 100 * OUT)
    assert guard.usage("s").cost_nano == 0 and guard.usage("s").reserved_nano == 0


def test_shrink_to_fit_when_the_adapter_allows_it() -> None:
    guard = Guard(Limits(max_cost_usd="0.01", input_margin=0))
    # $0.01 - 1000*2.5e-6 = $0.0075 of room: 750 output tokens at 1e-5
    adm = guard.before_model_call(call(max_output_tokens=4000, can_shrink=True))
    assert adm.shrunk and adm.max_output_tokens == 750
    assert adm.reserved_nano <= nano(Decimal("0.01"))
    # nothing left for a second one, not even min_output_tokens
    with pytest.raises(BudgetExceeded):
        guard.before_model_call(call(max_output_tokens=4000, can_shrink=True))


def test_response_model_name_is_priced_when_known() -> None:
    guard = Guard(Limits(max_cost_usd=1))
    adm = guard.before_model_call(call(model="gpt-4o"))
    record = guard.after_model_call(adm, Usage(100, 10), response_model="gpt-4o-mini-2025-01-01")
    mini_in, mini_out = Decimal("1.5e-07"), Decimal("6e-07")
    assert record.cost_nano == nano(100 * mini_in + 10 * mini_out)
    assert record.model == "gpt-4o-mini-2025-01-01"


def test_record_hooks_receive_every_call_and_never_break_it() -> None:
    seen = []

    def broken(_record) -> None:
        raise RuntimeError("reporting is down")

    guard = Guard(Limits(max_cost_usd=1), on_record=[broken, seen.append])
    guard.after_model_call(guard.before_model_call(call()), Usage(10, 10))
    assert len(seen) == 1 and seen[0].outcome == "ok"


def test_bad_limits_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="max_cost_usd must be >= 0"):
        Limits(max_cost_usd=-1)
    with pytest.raises(ValueError, match="finite"):
        Limits(max_cost_usd=float("nan"))
    with pytest.raises(ValueError, match="max_tokens must be >= 0"):
        Limits(max_tokens=-5)
    with pytest.raises(TypeError, match="max_model_calls must be an int"):
        Limits(max_model_calls=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown_price"):
        Limits(unknown_price="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown ledger scheme"):
        Guard(Limits(), ledger="postgres://x")
    with pytest.raises(TypeError, match="limits must be Limits or Budgets"):
        Guard({"max_cost_usd": 1})  # type: ignore[arg-type]


def test_zero_cap_refuses_everything() -> None:
    guard = Guard(Limits(max_cost_usd=0))
    with pytest.raises(BudgetExceeded):
        guard.before_model_call(call(input_tokens=1, max_output_tokens=1))


def test_sessions_are_independent() -> None:
    guard = Guard(Limits(max_model_calls=1))
    guard.after_model_call(guard.before_model_call(call("a")), Usage(1, 1))
    guard.after_model_call(guard.before_model_call(call("b")), Usage(1, 1))
    with pytest.raises(StepLimitExceeded):
        guard.before_model_call(call("a"))


def test_extend_raises_a_session_cap() -> None:
    guard = Guard(Limits(max_cost_usd="0.005", input_margin=0))
    with pytest.raises(BudgetExceeded):
        guard.before_model_call(call())
    guard.extend("s", usd="0.01")
    guard.before_model_call(call())
    assert guard.usage("s").cap_usd == Decimal("0.015")


async def test_async_twins_enforce_the_same_caps() -> None:
    guard = Guard(Limits(max_cost_usd="0.02", max_tool_calls=1, input_margin=0))
    adm = await guard.abefore_model_call(call())  # worst case $0.0075
    record = await guard.aafter_model_call(adm, Usage(1000, 100))
    assert record.cost_nano == nano(1000 * IN + 100 * OUT)
    await guard.abefore_tool_call("s", "t")
    with pytest.raises(StepLimitExceeded):
        await guard.abefore_tool_call("s", "t")
    adm = await guard.abefore_model_call(call())
    await guard.amodel_call_failed(adm)
    with pytest.raises(BudgetExceeded):
        await guard.abefore_model_call(call(max_output_tokens=2000))
    assert (await guard.ausage("s")).cost_nano == record.cost_nano


def test_threads_sharing_a_guard_never_overshoot() -> None:
    guard = Guard(Limits(max_cost_usd=1, input_margin=0))
    worst = nano(1000 * IN + 500 * OUT)  # $0.0075 per call

    def one(_: int) -> bool:
        try:
            adm = guard.before_model_call(call())
        except BudgetExceeded:
            return False
        guard.after_model_call(adm, Usage(1000, 500))
        return True

    with ThreadPoolExecutor(16) as pool:
        admitted = sum(pool.map(one, range(200)))
    assert admitted == 10**9 // worst == 133
    assert guard.usage("s").cost_nano == admitted * worst <= 10**9


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cap_cents=st.integers(0, 500),
    calls=st.lists(
        st.tuples(
            st.integers(1, 20_000),  # prompt tokens
            st.integers(1, 4_000),  # max_tokens
            st.floats(0, 1),  # share of max_tokens actually produced
            st.floats(0, 1),  # share of the prompt read from cache
            st.booleans(),  # fails instead of finishing
        ),
        max_size=40,
    ),
)
def test_no_overshoot_and_money_conservation(cap_cents, calls) -> None:
    """Bounded outputs never take spend past the cap, and the ledger holds exactly the
    sum of the recorded costs."""
    records = []
    guard = Guard(Limits(max_cost_usd=Decimal(cap_cents) / 100, input_margin=0),
                  on_record=[records.append])
    cap = guard.limits.max_cost_nano
    for prompt, max_out, produced, cached, fails in calls:
        try:
            adm = guard.before_model_call(call(input_tokens=prompt, max_output_tokens=max_out))
        except BudgetExceeded:
            continue
        if fails:
            guard.model_call_failed(adm)
            continue
        usage = Usage(prompt, int(max_out * produced), cache_read_tokens=int(prompt * cached))
        guard.after_model_call(adm, usage)
        u = guard.usage("s")
        assert u.cost_nano + u.reserved_nano <= cap
    u = guard.usage("s")
    assert u.reserved_nano == 0
    assert u.cost_nano == sum(r.cost_nano for r in records) <= cap
    assert u.model_calls == sum(r.outcome == "ok" for r in records)
