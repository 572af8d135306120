"""Two guards on one ledger see the same request (same run id) at once: the second
waits for the first's reservation and joins it; a refusal reaches both."""

from __future__ import annotations

import threading
import time

import pytest

from agent_guard import Guard, Limits
from agent_guard.engine.admission import ModelCall
from agent_guard.errors import BudgetExceeded
from agent_guard.ledger.memory import MemoryLedger


class SlowLedger(MemoryLedger):
    """Reserves only after ``gate`` opens, so a second holder arrives meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.reserves = 0

    def reserve(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.reserves += 1
        self.gate.wait(10)
        return super().reserve(*args, **kwargs)


def _call(run_id: str) -> ModelCall:
    return ModelCall(session="s", model="gpt-4o-mini", messages=[{"role": "user",
                                                                  "content": "hi"}],
                     max_output_tokens=50, run_id=run_id)


def _race(guards: list[Guard], run_id: str) -> list[object]:
    out: list[object] = [None, None]

    def go(i: int) -> None:
        try:
            out[i] = guards[i].before_model_call(_call(run_id))
        except BudgetExceeded as exc:
            out[i] = exc

    first = threading.Thread(target=go, args=(0,))
    first.start()
    while guards[0].ledger.reserves == 0:  # type: ignore[attr-defined]
        time.sleep(0.001)
    second = threading.Thread(target=go, args=(1,))
    second.start()
    time.sleep(0.05)  # the second holder is waiting on the first's reservation
    assert second.is_alive()
    guards[0].ledger.gate.set()  # type: ignore[attr-defined]
    first.join(10)
    second.join(10)
    return out


def test_second_holder_waits_and_joins_the_first_admission() -> None:
    ledger = SlowLedger()
    guards = [Guard(Limits(max_cost_usd=1), ledger), Guard(Limits(max_cost_usd=1), ledger)]
    first, second = _race(guards, "run-join")
    assert first is second  # one request, one admission
    assert ledger.reserves == 1


@pytest.mark.parametrize("cap", [0.000001])
def test_second_holder_waiting_gets_the_first_refusal(cap: float) -> None:
    ledger = SlowLedger()
    guards = [Guard(Limits(max_cost_usd=cap), ledger), Guard(Limits(max_cost_usd=cap), ledger)]
    first, second = _race(guards, "run-refused")
    assert isinstance(first, BudgetExceeded)
    assert second is first
    assert ledger.reserves == 1
