"""The planner's call descriptor (Planner.resolved) and the thresholds' pre-check
(ThresholdWatch.may_fire) are fast paths: each must give what the general path gives.

- An admission's price, scopes and attributes, and its record's scope names, equal what
  the guard's general helpers (``PriceBook.resolve``, ``Guard.scope_refs``,
  ``Guard.attributes_for``) give at that moment, across window periods, sessions,
  models, call attributes, a changed price book and changed guard attributes.
- ``may_fire`` is False only when the general check would read nothing and fire nothing.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_guard import Budgets, Guard, Limits, PriceBook
from agent_guard.engine.admission import ModelCall
from agent_guard.engine.budgets import ScopeRef
from agent_guard.engine.thresholds import ThresholdWatch
from agent_guard.engine.usage import Usage
from agent_guard.ledger import ScopeCaps
from agent_guard.ledger.base import Settlement

from .conftest import FakeClock

START = datetime(2026, 11, 30, 22, 40, tzinfo=UTC).timestamp()
DAY = Limits(max_cost_usd=50, window="24h")
BUDGETS = {
    "session-only": lambda: Limits(max_cost_usd=100),
    "session-month": lambda: Limits(max_cost_usd=100, window="month"),
    "four-scopes-24h": lambda: Budgets(Limits(max_cost_usd=100), user=DAY, team=DAY,
                                       global_=DAY),
    "per-model-hour": lambda: Budgets(Limits(max_cost_usd=100), model={
        "gpt-4o-mini": Limits(max_cost_usd=20, window="hour"),
        "*": Limits(max_tokens=10**6)}),
}
CALL_ATTRIBUTES = [{}, {"user": "u1"}, {"user": "u2", "team": "beta"},
                   {"team": "beta", "user": "u2"}, {"feature": "search"},
                   {"feature": ["not", "hashable"]}]

step = st.one_of(
    st.tuples(st.just("call"), st.sampled_from(["a", "b"]),
              st.sampled_from(["gpt-4o-mini", "gpt-4o", "no-such-model"]),
              st.sampled_from(range(len(CALL_ATTRIBUTES)))),
    st.tuples(st.just("wait"), st.sampled_from([1, 600, 3600, 86_400, 40 * 86_400])),
    st.tuples(st.just("attributes"), st.sampled_from([{}, {"team": "acme"},
                                                      {"team": "beta", "user": "u9"}])),
    st.tuples(st.just("prices"), st.sampled_from([0, 1])),
)


def _prices() -> list[PriceBook]:
    base = PriceBook.default()
    return [base, base.with_overrides({"gpt-4o-mini": {"input_cost_per_token": 1e-06,
                                                       "output_cost_per_token": 2e-06}})]


@pytest.mark.slow
@pytest.mark.parametrize("budgets", list(BUDGETS))
@settings(max_examples=40, deadline=None)
@given(steps=st.lists(step, min_size=1, max_size=25))
def test_admissions_carry_what_the_general_helpers_give(budgets: str,
                                                       steps: list[tuple]) -> None:
    clock = FakeClock(START)
    prices = _prices()
    guard = Guard(BUDGETS[budgets](), attributes={"team": "acme"}, clock=clock,
                  prices=prices[0])
    for op, *args in steps:
        if op == "wait":
            clock.advance(args[0])
        elif op == "attributes":
            guard.attributes.clear()
            guard.attributes.update(args[0])
        elif op == "prices":
            guard.prices = prices[args[0]]
        else:
            session, model, which = args
            attributes = CALL_ATTRIBUTES[which]
            call = ModelCall(session=session, model=model, attributes=attributes,
                             max_output_tokens=50, input_tokens=20)
            if guard.prices.resolve(model) is None:
                continue  # refused under a dollar cap (UnknownModelPrice): nothing to compare
            admission = guard.before_model_call(call)
            assert admission.price is guard.prices.resolve(model)
            assert admission.scopes == tuple(guard.scope_refs(session, attributes,
                                                              model=model))
            assert admission.attributes == guard.attributes_for(attributes)
            assert list(admission.attributes) == list(guard.attributes_for(attributes))
            record = guard.after_model_call(admission, Usage(20, 10))
            assert record.scopes == tuple(r.scope for r in admission.scopes)
            assert record.attributes == guard.attributes_for(attributes)


def test_a_replaced_scope_tuple_is_named_from_its_refs() -> None:
    """An adapter that replaces an admission's scopes gets their names on the record, not
    the descriptor's."""
    guard = Guard(Limits(max_cost_usd=1))
    admission = guard.before_model_call(ModelCall(session="s", model="gpt-4o-mini",
                                                  input_tokens=10, max_output_tokens=10))
    other = guard.scope_refs("t")
    record = guard.after_model_call(replace(admission, scopes=tuple(other)), Usage(10, 5))
    assert record.scopes == ("session:t",)


def test_a_new_window_period_gives_new_scopes_to_the_same_session() -> None:
    clock = FakeClock(datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC).timestamp())
    guard = Guard(Budgets(Limits(), team=Limits(max_cost_usd=1, window="month")),
                  attributes={"team": "acme"}, clock=clock)
    call = ModelCall(session="s", model="gpt-4o-mini", input_tokens=10,
                     max_output_tokens=10)
    first = guard.after_model_call(guard.before_model_call(call), Usage(10, 5))
    clock.advance(1)
    second = guard.after_model_call(guard.before_model_call(call), Usage(10, 5))
    assert first.scopes == ("session:s", "team:acme@2026-11")
    assert second.scopes == ("session:s", "team:acme@2026-12")


# -- ThresholdWatch.may_fire -----------------------------------------------------------------

DIMS = ["usd_nano", "tokens", "model_calls", "steps"]
ref_spec = st.tuples(
    st.dictionaries(st.sampled_from(DIMS), st.integers(0, 8), max_size=4),  # caps
    st.lists(st.sampled_from([0.25, 0.5, 0.8, 1.0]), max_size=3, unique=True),  # thresholds
    st.booleans(),  # a rolling window
)

# fired thresholds: (scope index, dimension, threshold)
fired_thresholds = st.sets(st.tuples(st.integers(0, 3), st.sampled_from(DIMS),
                                     st.sampled_from([0.25, 0.5, 0.8, 1.0])))


def per_scope(most: int) -> st.SearchStrategy[list[dict[str, int] | None]]:
    """Totals per scope (up to 4 scopes; None: none known), each from 0 to ``most``."""
    return st.lists(st.one_of(st.none(), st.dictionaries(st.sampled_from(DIMS),
                                                         st.integers(0, most), max_size=4)),
                    min_size=4, max_size=4)


def watched_refs(specs: list[tuple[dict[str, int], list[float], bool]],
                 past: list[dict[str, int] | None], fired: set[tuple[int, str, float]]
                 ) -> tuple[list[ScopeRef], ThresholdWatch]:
    """Team scopes ``team:t<i>`` from ``specs`` (caps, thresholds, rolling) and a watch
    that has fired ``fired`` and read ``past`` as their earlier buckets' spend."""
    refs = []
    for i, (caps, thresholds, rolling) in enumerate(specs):
        name = f"team:t{i}"
        history = (f"{name}@3h:earlier",) if rolling else ()
        refs.append(ScopeRef("team", f"t{i}", None, Limits(thresholds=tuple(thresholds)),
                             ScopeCaps(name, caps, history)))
    watch = ThresholdWatch([], "memory://")
    watch.fired = {(f"team:t{i}", dim, t) for i, dim, t in fired}
    watch.past_spent = {f"team:t{i}": p for i, p in enumerate(past) if p is not None}
    return refs, watch


@pytest.mark.slow
@settings(max_examples=400, deadline=None)
@given(specs=st.lists(ref_spec, min_size=1, max_size=4),
       spent=per_scope(12), past=per_scope(6), fired=fired_thresholds)
def test_may_fire_is_false_only_when_the_check_has_nothing_to_do(
        specs: list[tuple[dict[str, int], list[float], bool]],
        spent: list[dict[str, int] | None], past: list[dict[str, int] | None],
        fired: set[tuple[int, str, float]]) -> None:
    refs, watch = watched_refs(specs, past, fired)
    settled = Settlement(True, {f"team:t{i}": s for i, s in enumerate(spent[:len(refs)])
                                if s is not None})
    if watch.may_fire(ThresholdWatch.triggers(refs), settled.spent):
        return
    assert watch.unread_windows(refs, settled) == []
    assert watch.crossed("s", refs, settled) == []


@settings(max_examples=400, deadline=None)
@given(specs=st.lists(ref_spec, min_size=1, max_size=4),
       hint=per_scope(12), past=per_scope(6),
       amounts=st.dictionaries(st.sampled_from(DIMS), st.integers(0, 6), max_size=4),
       fired=fired_thresholds)
def test_may_defer_answers_the_same_from_the_triggers(
        specs: list[tuple[dict[str, int], list[float], bool]],
        hint: list[dict[str, int] | None], past: list[dict[str, int] | None],
        amounts: dict[str, int], fired: set[tuple[int, str, float]]) -> None:
    """may_defer given the refs' triggers (its shortcut for a spend below every lowest
    threshold) answers as it does from the refs alone."""
    refs, watch = watched_refs(specs, past, fired)
    seen = {f"team:t{i}": h for i, h in enumerate(hint[:len(refs)]) if h is not None}
    for spent_hint in (seen, None):
        assert watch.may_defer(refs, amounts, spent_hint, ThresholdWatch.triggers(refs)) \
            == watch.may_defer(refs, amounts, spent_hint)


def test_the_amounts_written_out_are_dimension_names() -> None:
    """amounts_of and a plan's amounts name their dimensions as string constants (one-step
    dict building): they must be Dimension's names."""
    from agent_guard.engine.limits import Dimension
    from agent_guard.engine.recording import amounts_of

    names = {value for name, value in vars(Dimension).items() if name.isupper()}
    assert amounts_of(Usage(30, 20, 10, 5, 3), 7) == {
        Dimension.USD_NANO: 7, Dimension.TOKENS: 50, Dimension.INPUT_TOKENS: 30,
        Dimension.OUTPUT_TOKENS: 20, Dimension.CACHE_READ_TOKENS: 10,
        Dimension.CACHE_CREATION_TOKENS: 5, Dimension.REASONING_TOKENS: 3,
        Dimension.MODEL_CALLS: 1}
    guard = Guard(Limits(max_cost_usd=1))
    plan = guard._planner.plan(ModelCall(session="s", model="gpt-4o-mini", input_tokens=10,
                                         max_output_tokens=10))
    assert set(plan.amounts) == {Dimension.USD_NANO, Dimension.TOKENS,
                                 Dimension.MODEL_CALLS} <= names


@pytest.mark.parametrize("cost", [7, -1, 7.0, True])
def test_a_settle_skips_the_amounts_check_only_for_a_plain_cost(cost: object) -> None:
    """after_model_call settles by ``settle_valid`` (the memory ledger skips the check)
    only when the cost, the one amount not from a validated Usage, is an int >= 0;
    any other cost is still refused by the ledger's check, as by ``settle``."""
    guard = Guard(Limits(max_cost_usd=1))
    settlement = guard._settlement

    def with_cost(*args: object) -> object:
        record, amounts = settlement(*args)  # type: ignore[arg-type]
        return record, {**amounts, "usd_nano": cost}

    guard._settlement = with_cost  # type: ignore[assignment]
    admission = guard.before_model_call(ModelCall(session="s", model="gpt-4o-mini",
                                                  input_tokens=10, max_output_tokens=10))
    if cost == 7 and type(cost) is int:
        guard.after_model_call(admission, Usage(10, 5))
        assert guard.ledger.totals("session:s").spent["usd_nano"] == 7
    else:
        with pytest.raises((TypeError, ValueError), match="usd_nano"):
            guard.after_model_call(admission, Usage(10, 5))


@pytest.mark.parametrize("attempts", [1, 3, 0, -2, True, 2.0, 3.7])
def test_a_plans_attempts_are_the_general_rule(attempts: object) -> None:
    """A plan's attempts (an exact int >= 1 taken as is) are max(1, int(attempts))."""
    guard = Guard(Limits(max_cost_usd=1))
    plan = guard._planner.plan(ModelCall(session="s", model="gpt-4o-mini", input_tokens=10,
                                         max_output_tokens=10,
                                         attempts=attempts))  # type: ignore[arg-type]
    assert plan.attempts == max(1, int(attempts))  # type: ignore[call-overload]
    assert type(plan.attempts) is int
    assert plan.amounts["tokens"] == (plan.reserved_input + 10) * plan.attempts


def test_an_admission_ends_once_with_the_first_record_of_many_threads() -> None:
    """finish() keeps the first record set (one dict.setdefault, atomic under the GIL):
    every holder ending the same admission at once gets that one record back."""
    import threading

    from agent_guard.engine.admission import finish

    guard = Guard(Limits(max_cost_usd=1))
    admission = guard.before_model_call(ModelCall(session="s", model="gpt-4o-mini",
                                                  input_tokens=10, max_output_tokens=10))
    assert not admission.finished
    record = guard._settlement(admission, Usage(10, 5), None, None, "ok")[0]
    records = [replace(record, cost_nano=i) for i in range(16)]
    got: list[object] = [None] * 16
    start = threading.Barrier(16)

    def end(i: int) -> None:
        start.wait()
        got[i] = finish(admission, records[i])

    threads = [threading.Thread(target=end, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert admission.finished
    assert all(r is admission.state.record for r in got)
    assert admission.state.record in records
