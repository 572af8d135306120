"""A task cancelled while its settle is in flight still settles and records the call.

The provider has billed the call by the time the guard settles it; a cancellation that
lands inside that await (``asyncio.timeout``, a cancelled agent run, a closed stream)
must not leave the hold to run out its lease and be returned: that would charge less
than was billed, and the call would leave no record.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from typing import Any

import pytest

from agent_guard import Guard, Limits
from agent_guard.engine.admission import ModelCall
from agent_guard.engine.records import CallRecord
from agent_guard.engine.usage import Usage
from agent_guard.ledger import Reservation, Settlement
from agent_guard.ledger.memory import MemoryLedger
from agent_guard.ledger.redis import RedisLedger

CALL = ModelCall(session="s", model="gpt-4o-mini", input_tokens=100, max_output_tokens=50)
USAGE = Usage(input_tokens=80, output_tokens=20)


class _SlowMemory(MemoryLedger):
    async def asettle(self, reservation: Reservation, actual: Mapping[str, int]) -> Settlement:
        await asyncio.sleep(0.05)
        return await super().asettle(reservation, actual)

    async def arelease(self, reservation: Reservation) -> bool:
        await asyncio.sleep(0.05)
        return await super().arelease(reservation)


class _SlowRedis(RedisLedger):
    async def asettle(self, reservation: Reservation, actual: Mapping[str, int]) -> Settlement:
        await asyncio.sleep(0.05)
        return await super().asettle(reservation, actual)


@pytest.fixture(params=["memory", "redis"])
def ledger(request: pytest.FixtureRequest, redis_namespace: str) -> Iterator[Any]:
    if request.param == "memory":
        made: Any = _SlowMemory()
    else:
        made = _SlowRedis.from_url(request.getfixturevalue("redis_url") + "?settle_delay=0",
                                   namespace=redis_namespace)
    yield made
    made.close()


def _cancel_inside(coro: Any) -> None:
    async def run() -> None:
        task = asyncio.ensure_future(coro)
        await asyncio.sleep(0.01)  # the task now awaits the ledger's settle
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())


@pytest.mark.parametrize("path", ["answer", "failure"])
def test_a_cancel_inside_the_settle_still_charges_and_records(ledger: Any, path: str) -> None:
    guard = Guard(Limits(max_cost_usd=1), ledger)
    records: list[CallRecord] = []
    guard.add_record_hook(records.append)
    admission = asyncio.run(guard.abefore_model_call(CALL))
    if path == "answer":
        _cancel_inside(guard.aafter_model_call(admission, USAGE))
    else:
        _cancel_inside(guard.amodel_call_failed(admission, output_tokens=20))
    usage = guard.usage("s")
    assert usage.reserved_nano == 0, "the hold was left to its lease"
    assert len(records) == 1 and usage.cost_nano == records[0].cost_nano > 0



@pytest.mark.parametrize("path", ["answer", "failure"])
@pytest.mark.parametrize("cancelled_by", ["sweep", "asyncio_run"])
def test_a_settle_whose_own_task_is_cancelled_still_charges_and_records(
        path: str, cancelled_by: str) -> None:
    """``asyncio.run`` whose main task ends on an error (a refused branch of a
    ``RunnableParallel`` fails the run) cancels every task left: the one settling a call
    and the task its settle runs in. ``sweep`` cancels them as it does, before the settle
    ran; ``asyncio_run`` lets it do so itself, as the settle has just run."""
    guard = Guard(Limits(max_cost_usd=1), MemoryLedger())
    records: list[CallRecord] = []
    guard.add_record_hook(records.append)
    admission = asyncio.run(guard.abefore_model_call(CALL))

    async def run() -> None:
        ending = asyncio.ensure_future(
            guard.aafter_model_call(admission, USAGE) if path == "answer"
            else guard.amodel_call_failed(admission, output_tokens=20))
        while not admission.finished:  # its task claimed the end, its settle is scheduled
            await asyncio.sleep(0)
        assert guard.usage("s").reserved_nano > 0 and not records
        if cancelled_by == "asyncio_run":
            raise RuntimeError("a sibling branch was refused")
        left = asyncio.all_tasks() - {asyncio.current_task()}
        assert ending in left
        for task in left:  # as asyncio.run cancels what is left of a run
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)

    with pytest.raises(RuntimeError) if cancelled_by == "asyncio_run" else nullcontext():
        asyncio.run(run())
    usage = guard.usage("s")
    assert usage.reserved_nano == 0, "the hold was left to its lease"
    assert len(records) == 1 and usage.cost_nano == records[0].cost_nano > 0


class _HeldSecondReserve(MemoryLedger):
    """A memory ledger whose second reserve (a fallback attempt, admitted in a worker
    thread) waits for ``go`` inside the reserve."""

    def __init__(self) -> None:
        super().__init__()
        self.reserves = 0
        self.entered, self.go, self.left = (threading.Event() for _ in range(3))

    def reserve(self, *args: Any, **kwargs: Any) -> Any:
        self.reserves += 1
        if self.reserves != 2:
            return super().reserve(*args, **kwargs)
        self.entered.set()
        self.go.wait(10)
        try:
            return super().reserve(*args, **kwargs)
        finally:
            self.left.set()


def test_a_task_cancelled_while_a_fallback_attempt_is_admitted_leaves_no_hold() -> None:
    """``ModelFallbackMiddleware`` inside ``GuardMiddleware`` on an async path: the
    fallback attempt is admitted in a worker thread. A cancellation that lands while that
    thread reserves used to end the wrapped call before the thread had registered its
    attempt, so the attempt's hold waited out its lease; the gate now waits for the
    thread, and the wrapped call's cleanup ends the attempt it admitted."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelFallbackMiddleware

    from agent_guard import GuardMiddleware
    from agent_guard.testing import ScriptedChatModel

    def fail(messages: Any) -> str:
        raise RuntimeError("primary down")

    ledger = _HeldSecondReserve()
    guard = Guard(Limits(max_cost_usd=1), ledger)
    agent = create_agent(
        ScriptedChatModel(model_name="gpt-4o", respond=fail), tools=[],
        middleware=[GuardMiddleware(guard, session_id="s"),
                    ModelFallbackMiddleware(ScriptedChatModel(model_name="gpt-4o-mini",
                                                              responses=["ok"]))])

    async def run() -> None:
        task = asyncio.ensure_future(agent.ainvoke({"messages": [("user", "hi")]}))
        await asyncio.to_thread(ledger.entered.wait, 10)  # the fallback's reserve began
        # the reserve goes on once the run has ended (as before the fix), or after a
        # while if the run waits for it (the fix): either way it ends after the cancel
        task.add_done_callback(lambda _: ledger.go.set())
        asyncio.get_running_loop().call_later(0.3, ledger.go.set)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert ledger.left.wait(10)
    assert guard.usage("s").reserved_nano == 0, "the fallback attempt's hold was left"
