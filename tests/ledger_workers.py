"""Worker processes for the multi-process ledger tests (imported by spawned children)."""

from __future__ import annotations

import faulthandler
import multiprocessing
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from agent_guard.ledger import Denial, Ledger, ScopeCaps, from_url

T = TypeVar("T")

# Spawned children import agent_guard (and LangChain under it) before they race: seconds of
# CPU each, a minute on a loaded two-core machine. A worker that hangs dumps its stacks.
RACE_TIMEOUT_S = 420.0


def _entry(fn: Callable[..., T], barrier: Any, args: tuple[Any, ...]) -> T:
    faulthandler.dump_traceback_later(RACE_TIMEOUT_S * 0.8, exit=False)
    try:
        return fn(barrier, *args)
    except BaseException:
        barrier.abort()  # the others would wait at the barrier for this one for ever
        raise
    finally:
        faulthandler.cancel_dump_traceback_later()


def run_racing(fn: Callable[..., T], args: Sequence[tuple[Any, ...]], *,
               pool: Any = None, manager: Any = None) -> list[T]:
    """``fn(barrier, *a)`` for each ``a`` in ``args``, each in a spawned process of its own;
    ``fn`` calls ``barrier.wait()`` when ready so that all start racing at once. A worker
    that fails breaks the barrier (the rest fail at once instead of waiting for ever) and
    its error is raised here; a hang fails after ``RACE_TIMEOUT_S`` with the workers' stacks
    on stderr. Pass ``pool``/``manager`` to reuse them across rounds."""
    if pool is None or manager is None:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Manager() as manager, ctx.Pool(len(args)) as pool:
            return run_racing(fn, args, pool=pool, manager=manager)
    barrier = manager.Barrier(len(args), timeout=RACE_TIMEOUT_S)
    pending = [pool.apply_async(_entry, (fn, barrier, a)) for a in args]
    deadline = time.monotonic() + RACE_TIMEOUT_S
    results: list[T] = []
    errors: list[Exception] = []
    for task in pending:
        try:
            results.append(task.get(max(0.0, deadline - time.monotonic())))
        except multiprocessing.TimeoutError:
            raise
        except Exception as exc:  # the worker's own error, re-raised here
            errors.append(exc)
    if errors:  # the cause, not the barrier it broke for the others
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)),
                   errors[0])
    return results


def fails_before_the_barrier(barrier: Any, index: int) -> int:
    """Worker 0 fails before it is ready; the others wait for it (the harness's own test)."""
    if index == 0:
        raise ValueError("worker 0 could not open its ledger")
    barrier.wait()
    return index


CAP = 1_000_000_000  # $1.00 in nano-USD
EACH = 70_000_000  # $0.07 worst case per call


def open_ledger(url: str, namespace: str | None) -> Ledger:
    options: dict[str, Any] = {} if namespace is None else {"namespace": namespace}
    return from_url(url, **options)


def race(barrier: Any, url: str, namespace: str | None, threads: int, partial: bool,
         seed: int, later: bool = False, team: bool = False) -> tuple[int, int]:
    """Reserve $0.07 from ``threads`` threads at once; settle the full amount, or a random
    smaller one (``later``: with ``settle_later``, which on Redis rides with the next
    reserve or a flush, as the guard settles). Returns (calls admitted, nano-USD
    settled). ``team``: each thread is a session of its own (uncapped) and the cap is
    on their shared ``team:shared`` scope instead of ``session:shared``."""
    ledger = open_ledger(url, namespace)
    rng = random.Random(seed)
    amounts = [(i, rng.randint(1, EACH) if partial else EACH) for i in range(threads)]
    local = threading.Barrier(threads)
    barrier.wait()

    def call(job: tuple[int, int]) -> int:
        i, actual = job
        caps = ([ScopeCaps(f"session:p{seed}t{i}"), ScopeCaps("team:shared", {"usd_nano": CAP})]
                if team else [ScopeCaps("session:shared", {"usd_nano": CAP})])
        local.wait()
        res = ledger.reserve(caps, {"usd_nano": EACH, "model_calls": 1}, lease_seconds=60)
        if isinstance(res, Denial):
            return -1
        if later:
            ledger.settle_later(res, {"usd_nano": actual, "model_calls": 1})
        else:
            ledger.settle(res, {"usd_nano": actual, "model_calls": 1})
        return actual

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(call, amounts))
    ledger.close()
    admitted = [r for r in results if r >= 0]
    return len(admitted), sum(admitted)


def reserve_and_hang(url: str, namespace: str | None, lease_seconds: float,
                     settle_later: bool = False) -> None:
    """Reserve, say so on stdout, then hang until killed (a worker that dies mid-call);
    ``settle_later``: the call finished, its settle is queued (not yet sent) when it dies."""
    # settle_delay: longer than the test waits, so the settle is still queued at the kill
    ledger = (from_url(url, namespace=namespace, settle_delay=59) if settle_later
              else open_ledger(url, namespace))
    res = ledger.reserve([ScopeCaps("session:crash", {"usd_nano": CAP})],
                         {"usd_nano": 800_000_000}, lease_seconds=lease_seconds)
    assert not isinstance(res, Denial)
    if settle_later:
        ledger.settle_later(res, {"usd_nano": 1})
        assert ledger.pending_settles == 1
    sys.stdout.write("reserved\n")
    sys.stdout.flush()
    time.sleep(3600)


TEAM_CAP_USD = "0.01"


def team_race(barrier: Any, url: str, namespace: str | None, session: str, threads: int,
              calls: int, now: float, seed: int) -> tuple[int, int]:
    """Sessions of one team, in this process, spend against a team monthly cap at the
    instant ``now``. Returns (calls admitted, nano-USD settled)."""
    from agent_guard import BudgetExceeded, Guard, Limits
    from agent_guard.engine.admission import ModelCall
    from agent_guard.engine.budgets import Budgets
    from agent_guard.engine.usage import Usage

    guard = Guard(Budgets(session=Limits(max_cost_usd=1),
                          team=Limits(max_cost_usd=TEAM_CAP_USD, window="month")),
                  ledger=open_ledger(url, namespace), attributes={"team": "acme"},
                  clock=lambda: now)
    rng = random.Random(seed)
    barrier.wait()

    def worker(i: int) -> tuple[int, int]:
        admitted = settled = 0
        for _ in range(calls):
            call = ModelCall(session=f"{session}-{i}", model="gpt-4o-mini",
                             input_tokens=1000, max_output_tokens=500)
            try:
                admission = guard.before_model_call(call)
            except BudgetExceeded:
                continue
            record = guard.after_model_call(
                admission, Usage(input_tokens=1000, output_tokens=rng.randint(1, 500)))
            admitted += 1
            settled += record.cost_nano
        return admitted, settled

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(worker, range(threads)))
    guard.close()
    return sum(a for a, _ in results), sum(s for _, s in results)


MODEL_CAP_USD = "0.01"
TOOL_USD = "0.0005"


def model_race(barrier: Any, url: str, namespace: str | None, proc: str, threads: int,
               calls: int, now: float, seed: int) -> tuple[int, int]:
    """Sessions of this process call gpt-4o (capped at $0.01 a month for every session,
    ``Budgets(model={"gpt-4o": ...})``), gpt-4o-mini (no model cap) and a $0.0005 tool,
    at the instant ``now``, recording every call in the namespace's usage store.
    Returns (gpt-4o calls admitted, nano-USD settled for them)."""
    from agent_guard import BudgetExceeded, Guard, Limits, UsageStore
    from agent_guard.engine.admission import ModelCall
    from agent_guard.engine.budgets import Budgets
    from agent_guard.engine.usage import Usage
    from agent_guard.pricing import ToolPrice

    ledger = open_ledger(url, namespace)
    store = UsageStore.for_ledger(ledger)
    guard = Guard(Budgets(session=Limits(max_cost_usd=1), global_=Limits(),
                          model={"gpt-4o": Limits(max_cost_usd=MODEL_CAP_USD,
                                                  window="month")}),
                  ledger=ledger, clock=lambda: now, on_record=[store],
                  tool_prices={"web_search": ToolPrice(TOOL_USD)})
    rng = random.Random(seed)
    barrier.wait()

    def worker(i: int) -> tuple[int, int]:
        admitted = settled = 0
        session = f"{proc}-{i}"
        for _ in range(calls):
            for model in ("gpt-4o", "gpt-4o-mini"):
                call = ModelCall(session=session, model=model, provider="openai",
                                 input_tokens=200, max_output_tokens=100)
                try:
                    admission = guard.before_model_call(call)
                except BudgetExceeded as exc:
                    assert model == "gpt-4o" and exc.scope.startswith("model:gpt-4o@"), exc
                    continue
                record = guard.after_model_call(
                    admission, Usage(input_tokens=200, output_tokens=rng.randint(1, 100)))
                if model == "gpt-4o":
                    admitted += 1
                    settled += record.cost_nano
            tool = guard.before_tool_call(session, "web_search", {"q": rng.random()})
            guard.tool_call_done(session, "web_search", admission=tool, result="[]")
        return admitted, settled

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(worker, range(threads)))
    store.close()
    guard.close()
    return sum(a for a, _ in results), sum(s for _, s in results)


if __name__ == "__main__":
    reserve_and_hang(sys.argv[1], sys.argv[2] or None, float(sys.argv[3]),
                     sys.argv[4:] == ["later"])
