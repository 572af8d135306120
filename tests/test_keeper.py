"""The lease keeper: renews running calls, ends calls that stopped, leaves the rest alone."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

from agent_guard import Guard, Limits
from agent_guard.engine.admission import ModelCall
from agent_guard.engine.keeper import LeaseKeeper, Watch

OWNER = object()


def admitted(guard: Guard) -> object:
    return guard.before_model_call(ModelCall(session="s", model="gpt-4o", input_tokens=100,
                                             max_output_tokens=100))


def due(keeper: LeaseKeeper) -> None:
    for w in keeper._watches.values():
        w.renew_at = 0.0


def test_a_running_sync_call_is_renewed_and_ended_when_its_frame_returns() -> None:
    guard = Guard(Limits(max_cost_usd=1, lease_seconds=30))
    keeper = LeaseKeeper()
    stopped: list[str] = []
    inside, leave = threading.Event(), threading.Event()
    adm: list[object] = []

    def call() -> None:  # the "model call": its frame is on this thread's stack
        adm.append(admitted(guard))
        keeper.watch(OWNER, guard, adm[0], on_stop=lambda: stopped.append("stop"),
                     thread_id=threading.get_ident(), frame=sys._getframe())
        inside.set()
        leave.wait(5)

    thread = threading.Thread(target=call)
    thread.start()
    inside.wait(5)
    before = adm[0].reservation.expires_at  # type: ignore[attr-defined]
    due(keeper)
    keeper.check()
    [w] = keeper._watches.values()
    assert w.renewed and stopped == []
    assert guard.ledger._open[adm[0].reservation.id].expires_at >= before  # type: ignore
    leave.set()
    thread.join()
    keeper.check()
    assert stopped == ["stop"] and keeper.watching == 0


def test_a_cancelled_task_ends_its_call() -> None:
    guard = Guard(Limits(max_cost_usd=1))
    keeper = LeaseKeeper()
    stopped: list[str] = []

    async def main() -> None:
        async def call() -> None:
            keeper.watch(OWNER, guard, admitted(guard), on_stop=lambda: stopped.append("x"),
                         task=asyncio.current_task())
            await asyncio.sleep(10)

        task = asyncio.ensure_future(call())
        await asyncio.sleep(0.01)
        keeper.check()
        assert stopped == []
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    keeper.check()
    assert stopped == ["x"]


def test_a_call_nobody_can_see_is_not_renewed_until_it_shows_life() -> None:
    guard = Guard(Limits(max_cost_usd=1))
    keeper = LeaseKeeper()
    adm = admitted(guard)
    keeper.watch(OWNER, guard, adm)
    due(keeper)
    keeper.check()
    [w] = keeper._watches.values()
    assert w.renewed == []  # no sign of life: the lease decides, as before
    keeper.touch(OWNER, adm)
    due(keeper)
    keeper.check()
    assert len(w.renewed) == 1


def test_an_ended_call_is_dropped_and_unwatch_forgets() -> None:
    guard = Guard(Limits(max_cost_usd=1))
    keeper = LeaseKeeper()
    stops: list[int] = []
    adm = admitted(guard)
    keeper.watch(OWNER, guard, adm, on_stop=lambda: stops.append(1))
    guard.model_call_failed(adm)  # type: ignore[arg-type]
    keeper.check()
    assert stops == [1] and keeper.watching == 0
    other = admitted(guard)
    keeper.watch(OWNER, guard, other, on_stop=lambda: stops.append(2))
    keeper.unwatch(OWNER, other)
    keeper.check()
    assert stops == [1]


class _Source:
    """An adapter keeping its open calls' watches itself (as the callback handler does)."""

    def __init__(self) -> None:
        self.runs: dict[int, Watch] = {}
        self.stopped: list[int] = []
        self.kept = False

    def open_watches(self) -> list[Watch]:
        return list(self.runs.values())

    def open_count(self) -> int:
        return len(self.runs)

    def forked(self) -> None:
        pass

    def open(self, keeper: LeaseKeeper, guard: Guard, key: int, task: object) -> Watch:
        w = Watch(guard, admitted(guard), lambda: self.stop(key), task=task)
        self.runs[key] = w  # the call is open before the keeper is told
        if not self.kept:
            keeper.keep(self)
        return w

    def stop(self, key: int) -> None:
        self.stopped.append(key)
        self.runs.pop(key, None)


class _Task:
    def __init__(self) -> None:
        self.over = False

    def done(self) -> bool:
        return self.over


def _until(condition: Any, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.005)
    return False


def test_a_source_s_calls_are_renewed_and_ended_and_wake_an_idle_keeper() -> None:
    """A source's open calls are read on each pass (no watch per call): a call due is
    renewed, a call whose task is done is stopped through its source; a pass that finds
    none lets the source go and the keeper sleeps; the source's next call wakes it."""
    guard = Guard(Limits(max_cost_usd=1, lease_seconds=30))
    keeper = LeaseKeeper(poll_seconds=0.01)
    source = _Source()
    for key in (1, 2):  # the second after the keeper let the source go and slept
        task = _Task()
        w = source.open(keeper, guard, key, task)
        assert keeper._thread is not None and source.kept
        assert _until(lambda w=w: bool(w.renewed)), "a due call was not renewed"
        assert source.stopped == [1] if key == 2 else source.stopped == []
        task.over = True
        assert _until(lambda key=key: key in source.stopped), "an ended call was kept"
        assert _until(lambda: keeper._idle and not source.kept), "the source was kept"
    assert keeper.watching == 0 and not keeper._sources


def test_a_source_opening_a_call_as_it_is_let_go_is_kept() -> None:
    """The keeper lets a source go when a pass finds no open call; a call opened at that
    moment is still read: the keeper looks again after clearing ``kept``."""
    guard = Guard(Limits(max_cost_usd=1))
    keeper = LeaseKeeper()
    source = _Source()
    source.open(keeper, guard, 1, _Task())
    counts = iter([0, 1])  # none open at the pass's look; one opened just after

    class Racing(_Source):
        def open_count(self) -> int:
            return next(counts, len(self.runs))

    source.__class__ = Racing
    keeper._let_go([source])
    assert source.kept and source in keeper._sources
    source.runs.clear()
    keeper._let_go([source])
    assert not source.kept and source not in keeper._sources


def test_the_handler_bounds_its_open_runs(monkeypatch) -> None:
    """Runs nothing ever ends are bounded: past the bound the oldest is ended
    (charged as abandoned), so the handler's memory stays flat."""
    from uuid import uuid4

    from agent_guard import GuardCallbackHandler
    from agent_guard.langchain import callback

    monkeypatch.setattr(callback, "_MAX_OPEN_RUNS", 3)
    handler = GuardCallbackHandler(limits=Limits(max_cost_usd=1), session_id="s")
    params = {"model": "gpt-4o", "max_tokens": 10}
    for _ in range(5):
        handler.on_chat_model_start({}, [[]], run_id=uuid4(), invocation_params=params)
    assert handler.open_runs == 3
    usage = handler.guard.usage("s")
    assert usage.model_calls == 2 and usage.cost_nano > 0  # the two oldest, charged


def test_a_forked_child_does_not_end_its_parents_calls() -> None:
    import os

    from agent_guard.engine import admission as guard_module
    from agent_guard.engine.keeper import keeper

    if not hasattr(os, "fork"):
        return
    guard = Guard(Limits(max_cost_usd=1))
    adm = guard.before_model_call(ModelCall(session="s", model="gpt-4o", input_tokens=10,
                                            max_output_tokens=10, run_id="forked"))
    keeper.watch(OWNER, guard, adm, task=None)
    # a handler's open run (the handler is the keeper's source of it), run in this thread
    from uuid import uuid4

    from agent_guard import GuardCallbackHandler

    handler = GuardCallbackHandler(guard, session_id="s")
    handler.on_chat_model_start({}, [[]], run_id=uuid4(),
                                invocation_params={"model": "gpt-4o", "max_tokens": 10})
    [run] = handler._runs.values()
    run.frame = sys._getframe()  # as a sync model call's frame would be
    assert handler.kept and handler in keeper._sources
    pid = os.fork()
    if pid == 0:  # the child: nothing of the parent's is watched or open
        ok = keeper.watching == 0 and not guard_module._OPEN_REQUESTS
        # the handler is no source of the child's keeper, and holds no run of the parent
        ok = ok and not keeper._sources and not handler.kept and handler.open_runs == 0
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    keeper.unwatch(OWNER, adm)
    guard.model_call_failed(adm)  # type: ignore[arg-type]
    handler._stopped(run.run_id)
    assert os.WEXITSTATUS(status) == 0


def test_a_legacy_text_model_s_sync_call_is_watched_by_its_generate_frame() -> None:
    """A legacy text-completion model (``BaseLLM``) starts its runs from a list
    comprehension in ``generate``: on Python 3.11 that comprehension is a frame of its own
    in LangChain's model code, over as soon as the runs are started. The call's frame is
    ``generate``'s: a call (one prompt, or a batch of two) running past several keeper
    passes and past its lease keeps its hold and is charged as answered, not ended as
    abandoned at its worst case while it runs."""
    from langchain_core.language_models.fake import FakeListLLM

    from agent_guard import GuardCallbackHandler

    class SlowLLM(FakeListLLM):
        def _call(self, prompt: str, stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> str:
            time.sleep(0.4)  # past the lease
            held.append(guard.usage("s").reserved_nano)
            return super()._call(prompt, stop, run_manager, **kwargs)

        @property
        def _identifying_params(self) -> dict[str, Any]:
            return {"model_name": "gpt-4o"}  # a priced model

    records: list[Any] = []
    held: list[int] = []  # the hold as each prompt's answer comes, past its lease
    guard = Guard(Limits(max_cost_usd=1, lease_seconds=0.3), on_record=[records.append])
    handler = GuardCallbackHandler(guard, session_id="s")
    llm = SlowLLM(responses=["a completion of several words"])
    llm.invoke("complete this", config={"callbacks": [handler]})
    llm.generate(["one", "two"], callbacks=[handler])  # one call's batch: two prompts
    assert [r.outcome for r in records] == ["ok"] * 3
    assert all(r.usage.output_tokens < 50 for r in records)  # the answer, not the worst case
    assert len(held) == 3 and all(held), "a running call lost its hold"
    usage = guard.usage("s")
    assert usage.reserved_nano == 0 and handler.open_runs == 0
    assert usage.cost_nano == sum(r.cost_nano for r in records)
