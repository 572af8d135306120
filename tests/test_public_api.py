"""The public API: about 20 names at the top, the rest in subpackages; old top-level names
still import (with a DeprecationWarning naming their module); the errors say what each
stop is."""

from __future__ import annotations

import importlib
import pickle
import warnings

import pytest

import agent_guard
from agent_guard import errors


def test_about_twenty_public_names_that_all_resolve():
    names = [n for n in agent_guard.__all__ if n != "__version__"]
    assert 15 <= len(names) <= 22, names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in agent_guard.__all__:
            assert getattr(agent_guard, name) is not None
    assert set(agent_guard.__all__).isdisjoint(agent_guard.MOVED)


@pytest.mark.parametrize("name", sorted(agent_guard.MOVED))
def test_a_moved_name_still_imports_with_a_warning(name):
    module = agent_guard.MOVED[name]
    with pytest.warns(DeprecationWarning, match=rf"from {module} import {name}"):
        old = getattr(agent_guard, name)
    assert old is getattr(importlib.import_module(module), name)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        agent_guard.nope  # noqa: B018
    assert "Usage" in dir(agent_guard) and "Guard" in dir(agent_guard)


STOPS = [errors.BudgetExceeded, errors.StepLimitExceeded, errors.LoopDetected,
         errors.OutputCapExceeded]


@pytest.mark.parametrize("cls", STOPS, ids=lambda c: c.__name__)
def test_every_stop_is_a_guard_stop_defined_in_errors(cls):
    assert issubclass(cls, errors.GuardStop) and issubclass(cls, errors.GuardError)
    assert cls.__module__ == "agent_guard.errors"
    exc = cls(session="s", scope="session:s", dimension="model_calls", cap=3, spent=3,
              reserved=0, requested=1)
    with pytest.raises(errors.GuardStop):
        raise exc
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls and str(back) == str(exc)


def test_counts_loops_and_output_are_not_budget_errors():
    for cls in (errors.StepLimitExceeded, errors.LoopDetected, errors.OutputCapExceeded):
        assert not issubclass(cls, errors.BudgetExceeded)
    assert issubclass(errors.LoopDetected, errors.StepLimitExceeded)
    for cls in (errors.SessionRequired, errors.UnknownModelPrice, errors.LedgerUnavailable):
        assert issubclass(cls, errors.GuardError) and not issubclass(cls, errors.GuardStop)


def test_output_cap_error_still_imports_from_the_callback_module():
    from agent_guard.langchain.callback import OutputCapExceeded

    assert OutputCapExceeded is errors.OutputCapExceeded


def test_the_guard_raises_the_stop_that_says_what_happened():
    from agent_guard import Guard, Limits

    guard = Guard(Limits(max_tool_calls=1, max_repeats=1), ledger="memory://")
    guard.before_tool_call("s", "search", {"q": 1})
    with pytest.raises(errors.LoopDetected):
        guard.before_tool_call("s", "search", {"q": 1})
    with pytest.raises(errors.StepLimitExceeded) as info:
        guard.before_tool_call("s", "search", {"q": 2})
    assert type(info.value) is errors.StepLimitExceeded
    assert not isinstance(info.value, errors.BudgetExceeded)
