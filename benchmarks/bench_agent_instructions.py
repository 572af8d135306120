"""What the callback handler and GuardMiddleware add to a ``create_agent`` run, in
instructions (callgrind) and in thread hops, sync and async.

Wall time on a loaded machine says little; the instructions a run executes and the
number of times it hands work to a thread (executor submissions: each is a wake-up of
another thread and a wait for it) do not move with the load. Four agents, one model call
per run (the ``bench_overhead.py`` agent): alone, with ``GuardCallbackHandler``, with
``GuardMiddleware``, with an empty middleware that only passes ``wrap_model_call``
/ ``awrap_model_call`` through (what LangChain itself adds for any middleware with that
hook), and with one that also has an empty ``before_model`` hook (a graph node of its
own, as GuardMiddleware's step count). Memory ledger.

    python benchmarks/bench_agent_instructions.py            # callgrind (x86-64 Linux)
    python benchmarks/bench_agent_instructions.py --no-callgrind   # hops only
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import shutil
import sys
from typing import Any

import _checkout  # noqa: F401  (this checkout's agent_guard)
import _instructions
from bench_overhead import PROMPT, make_model

RUNS = 50  # counted runs per configuration and mode

_HOPS: collections.Counter[str] = collections.Counter()
_submit = concurrent.futures.ThreadPoolExecutor.submit


def _counting_submit(self: Any, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
    _HOPS["hops"] += 1
    return _submit(self, fn, *args, **kwargs)


def agents() -> dict[str, tuple[Any, dict[str, Any]]]:
    from langchain.agents import create_agent
    from langchain.agents.middleware import AgentMiddleware

    from agent_guard import Guard, GuardCallbackHandler, GuardMiddleware, Limits

    class PassThrough(AgentMiddleware):
        def wrap_model_call(self, request: Any, handler: Any) -> Any:
            return handler(request)

        async def awrap_model_call(self, request: Any, handler: Any) -> Any:
            return await handler(request)

    class PassThroughAndStep(PassThrough):
        def before_model(self, state: Any, runtime: Any) -> None:
            return None

        async def abefore_model(self, state: Any, runtime: Any) -> None:
            return None

    limits = Limits(max_cost_usd=1e6)
    handler = GuardCallbackHandler(Guard(limits), session_id="bench")
    return {
        "agent": (create_agent(make_model(), []), {}),
        "agent + callback": (create_agent(make_model(), []), {"callbacks": [handler]}),
        "agent + middleware": (create_agent(make_model(), [], middleware=[
            GuardMiddleware(limits=limits, session_id="bench")]), {}),
        "agent + empty middleware": (create_agent(make_model(), [],
                                                  middleware=[PassThrough()]), {}),
        "empty middleware + step": (create_agent(make_model(), [],
                                                 middleware=[PassThroughAndStep()]), {}),
    }


def measure() -> dict[str, dict[str, float]]:
    """(In the callgrind child, or alone) run every agent; count hops per run, and mark
    the counted runs as callgrind regions."""
    inputs = {"messages": PROMPT[1:2]}
    hops: dict[str, dict[str, float]] = {}
    concurrent.futures.ThreadPoolExecutor.submit = _counting_submit  # type: ignore[method-assign]
    for name, (agent, config) in agents().items():
        for _ in range(20):  # warm: imports, memos, first-call paths
            agent.invoke(inputs, config)
        _HOPS.clear()
        with _instructions.region(f"{name}|sync"):
            for _ in range(RUNS):
                agent.invoke(inputs, config)
        hops.setdefault(name, {})["sync"] = _HOPS["hops"] / RUNS

        async def arun(n: int, agent: Any = agent, config: Any = config) -> None:
            for _ in range(n):
                await agent.ainvoke(inputs, config)

        asyncio.run(arun(20))
        _HOPS.clear()

        async def counted(agent: Any = agent, config: Any = config, name: str = name
                          ) -> None:
            with _instructions.region(f"{name}|async"):
                await arun(RUNS, agent, config)

        asyncio.run(counted())
        hops[name]["async"] = _HOPS["hops"] / RUNS
    return hops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-callgrind", action="store_true")
    args = parser.parse_args()
    if _instructions.active():
        hops = measure()
        print("HOPS", repr(hops))
        return
    counts: dict[str, list[int]] = {}
    if not args.no_callgrind:
        dumps = _instructions.rerun_under_callgrind([sys.argv[0], *sys.argv[1:]])
        if dumps is not None:
            counts = _instructions.read_regions(dumps, all_threads=True)
            shutil.rmtree(dumps, ignore_errors=True)
    hops = measure()
    print(f"create_agent, one model call per run, memory ledger ({RUNS} runs each):")
    print(f"{'configuration':<26}{'sync k-instr':>13}{'added':>8}{'hops':>6}"
          f"{'async k-instr':>15}{'added':>8}{'hops':>6}")
    base = {mode: counts.get(f"agent|{mode}", [0])[-1] / RUNS for mode in ("sync", "async")}
    for name in hops:
        row = f"{name:<26}"
        for mode, width in (("sync", 13), ("async", 15)):
            n = counts.get(f"{name}|{mode}", [0])[-1] / RUNS
            row += (f"{n / 1e3:>{width}.0f}{(n - base[mode]) / 1e3:>8.0f}" if counts
                    else f"{'-':>{width}}{'-':>8}")
            row += f"{hops[name][mode]:>6.1f}"
        print(row)


if __name__ == "__main__":
    main()
