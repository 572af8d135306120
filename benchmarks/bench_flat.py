"""A guard whose cost does not grow with the run: what it adds per model call on a short
prompt, on a long history, and under several rolling-window budgets; ratios in one run.

    python benchmarks/bench_flat.py [--no-callgrind] [--rounds 7]

Three workloads, each a ratio of what the guard adds (over the same call with no
callbacks) measured in the same run:

- ``prompt``: the 5-message prompt of bench_overhead.py; the guard (memory ledger)
  against an empty callback handler;
- ``history``: an agent-like run whose history has 20 or 2,000 messages (the same
  message objects on every call, as LangGraph state keeps them) and grows by an answer
  and a question per call (restarting every 10 calls); the guard against LangChain's own
  bare call at 2,000 messages, and at 2,000 against at 20;
- ``budgets``: ``Budgets`` of session + user + team + global, the last three with a
  rolling ``"24h"`` window (their 23 earlier hourly buckets hold spend), against a
  session-only ``Limits``.

Two measures of each: instructions per call, counted by ``valgrind --tool=callgrind``
(the benchmark re-runs itself under callgrind; load-independent, main thread only), and
wall time per call (median of interleaved rounds; moves with the machine's load).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _checkout  # noqa: F401  (this checkout's agent_guard)
import _instructions
from bench_overhead import PROMPT, EmptyHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from agent_guard import Budgets, Guard, GuardCallbackHandler, Limits
from agent_guard.testing import ScriptedChatModel

BIG = dict(max_cost_usd=10**6, max_tokens=10**12, max_model_calls=10**9)


def make_model() -> ScriptedChatModel:
    answer = AIMessage(
        content="Your order A1001 is delayed at the depot; refunds apply after 10 days.",
        usage_metadata={"input_tokens": 180, "output_tokens": 20, "total_tokens": 200},
        response_metadata={"model_name": "gpt-4o-mini"},
    )
    return ScriptedChatModel(model_name="gpt-4o-mini", responses=[answer], max_tokens=256)


def history(n: int) -> list[Any]:
    """A system prompt and ``n - 1`` turns of ~50 tokens each (distinct texts)."""
    out: list[Any] = [SystemMessage("You are a careful support agent. " * 20)]
    for i in range(1, n):
        text = (f"Turn {i}: the order A{1000 + i} was checked; the depot says it left on "
                f"day {i % 28 + 1} and the refund policy allows a claim after 10 days. ")
        out.append(HumanMessage(text) if i % 2 else AIMessage(text))
    return out


class Workload:
    """Calls of one model with one prompt shape, per configuration of callbacks."""

    def __init__(self, name: str, prompt: Callable[[], Callable[[int], list[Any]]],
                 configs: dict[str, list[Any]]) -> None:
        self.name, self.configs = name, configs
        self.prompts = {config: prompt() for config in configs}  # a run per configuration
        self.model = make_model()
        self.i = 0

    def run(self, config: str, n: int) -> None:
        cfg = {"callbacks": self.configs[config]}
        model, prompt = self.model, self.prompts[config]
        for _ in range(n):
            self.i += 1
            model.invoke(prompt(self.i), config=cfg)


def growing(base: list[Any]) -> Callable[[int], list[Any]]:
    """An agent run's history: each call sends the history plus a new answer and a new
    question (as an agent loop does); every 10 calls the run starts again from ``base``
    (so the history is ``base`` plus 2 to 20 messages)."""
    state = {"history": base}

    def prompt(i: int) -> list[Any]:
        history = base if i % 10 == 0 else state["history"]
        history = [*history, AIMessage(f"Answer {i}: checked."), HumanMessage(f"Question {i}?")]
        state["history"] = history
        return history
    return prompt


def budgets_guards() -> dict[str, list[Any]]:
    """Session-only vs session + user + team + global with rolling 24h windows, whose
    earlier buckets hold spend (calls made 1..23 hours ago)."""
    offset = [0.0]

    def clock() -> float:
        return time.time() - offset[0]

    day = Limits(window="24h", **BIG)  # type: ignore[arg-type]
    many = Guard(Budgets(Limits(**BIG), user=day, team=day, global_=day),  # type: ignore[arg-type]
                 "memory://", attributes={"user": "u-1", "team": "acme"}, clock=clock)
    one = Guard(Limits(**BIG), "memory://", clock=clock)  # type: ignore[arg-type]
    model = make_model()
    for hours in range(23, 0, -1):
        offset[0] = hours * 3600.0
        for guard in (many, one):
            model.invoke(PROMPT, config={"callbacks": [
                GuardCallbackHandler(guard, session_id=f"past-{hours}")]})
    offset[0] = 0.0
    return {"none": [], "session only": [GuardCallbackHandler(one, session_id="b")],
            "4 scopes, 24h": [GuardCallbackHandler(many, session_id="b")]}


def workloads(only: str = "") -> list[Workload]:
    def guard() -> list[Any]:
        return [GuardCallbackHandler(Guard(Limits(**BIG), "memory://"),  # type: ignore[arg-type]
                                     session_id="b")]

    out = [Workload("prompt", lambda: lambda i: PROMPT,
                    {"none": [], "empty handler": [EmptyHandler()], "guard": guard()})]
    for n in (20, 2000):
        base = history(n)
        out.append(Workload(f"history {n}", lambda base=base: growing(base),  # type: ignore[misc]
                            {"none": [], "empty handler": [EmptyHandler()], "guard": guard()}))
    out.append(Workload("budgets", lambda: lambda i: PROMPT, budgets_guards()))
    return [w for w in out if w.name.startswith(only)]


# calls per configuration counted under callgrind (instructions do not vary between calls)
COUNTED = {"prompt": 200, "history 20": 200, "history 2000": 20, "budgets": 200}
# calls per configuration per round of wall time
TIMED = {"prompt": 300, "history 20": 300, "history 2000": 15, "budgets": 300}


def settle_heap() -> None:
    """Collect, then freeze what is alive: the collector's full passes in a region walk
    only what the region allocated, not the heap earlier workloads left (a 2,000-message
    history, its memo), so a row does not depend on the rows run before it."""
    gc.collect()
    gc.freeze()


def count_instructions(loads: list[Workload]) -> None:
    """(In the callgrind child) one region per workload and configuration."""
    for w in loads:
        for config in w.configs:
            w.run(config, 20)  # warm: memos, imports, first-call paths
            settle_heap()
            with _instructions.region(f"{w.name}|{config}"):
                w.run(config, COUNTED[w.name])


def count_parts() -> None:
    """(In the callgrind child, with --parts) the engine's share of a guarded call on the
    5-message prompt, piece by piece, without LangChain."""
    from agent_guard import ModelCall, Usage

    guard = Guard(Limits(**BIG), "memory://")  # type: ignore[arg-type]
    call = ModelCall(session="p", model="gpt-4o-mini", messages=PROMPT, max_output_tokens=256,
                     params={"model": "gpt-4o-mini"})
    usage = Usage(180, 20, 128)
    n = COUNTED["prompt"]
    for _ in range(20):
        guard.after_model_call(guard.before_model_call(call), usage)
    settle_heap()
    with _instructions.region("parts|Guard.before_model_call"):
        admissions = [guard.before_model_call(call) for _ in range(n)]
    with _instructions.region("parts|Guard.after_model_call"):
        for admission in admissions:
            guard.after_model_call(admission, usage)
    plan = guard._plan(call)
    with _instructions.region("parts|  prompt estimate"):
        for _ in range(n):
            guard.tokens.estimate_prompt(PROMPT, "gpt-4o-mini", params=call.params,
                                         conversation="p")
    with _instructions.region("parts|  ledger reserve + settle"):
        for _ in range(n):
            guard.ledger.settle(guard.ledger.reserve(plan.scopes, plan.amounts,
                                                     lease_seconds=60), {"usd_nano": 1})
    price = guard.prices.resolve("gpt-4o-mini")
    with _instructions.region("parts|  worst case + cost"):
        for _ in range(n):
            price.worst_cost_nano(300, 256)  # type: ignore[union-attr]
            price.cost_nano(usage)  # type: ignore[union-attr]


def time_calls(loads: list[Workload], rounds: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for w in loads:
        for config in w.configs:
            w.run(config, 20)
        samples: dict[str, list[float]] = {c: [] for c in w.configs}
        for _ in range(rounds):
            for config in w.configs:  # interleaved: load hits every configuration alike
                n = TIMED[w.name]
                t0 = time.perf_counter()
                w.run(config, n)
                samples[config].append((time.perf_counter() - t0) / n * 1e6)
        out[w.name] = {c: statistics.median(v) for c, v in samples.items()}
    return out


def ratios(per_call: dict[str, dict[str, float]]) -> dict[str, float]:
    """The aims' ratios from per-call figures (instructions or microseconds); those
    whose workloads were not run are left out."""
    def added(load: str, config: str) -> float:
        return per_call[load][config] - per_call[load]["none"]

    out: dict[str, float] = {}
    if "prompt" in per_call:
        out["prompt: guard added / empty handler added"] = \
            added("prompt", "guard") / added("prompt", "empty handler")
    if "history 2000" in per_call:
        out["history 2000: guard added / LangChain's bare call"] = \
            added("history 2000", "guard") / per_call["history 2000"]["none"]
        if "history 20" in per_call:
            out["history: guard added at 2000 / at 20"] = \
                added("history 2000", "guard") / added("history 20", "guard")
    if "budgets" in per_call:
        out["budgets: 4 scopes 24h added / session-only added"] = \
            added("budgets", "4 scopes, 24h") / added("budgets", "session only")
    return out


AIMS = {"prompt: guard added / empty handler added": 2.5,
        "history 2000: guard added / LangChain's bare call": 0.3,
        "history: guard added at 2000 / at 20": 1.5,
        "budgets: 4 scopes 24h added / session-only added": 1.5}


def show(title: str, unit: str, per_call: dict[str, dict[str, float]]) -> None:
    print(title)
    for load, configs in per_call.items():
        base = configs["none"]
        cells = "  ".join(f"{c} {v:,.0f}" + ("" if c == "none" else f" (+{v - base:,.0f})")
                          for c, v in configs.items())
        print(f"  {load:<13} {unit}/call: {cells}")
    for name, value in ratios(per_call).items():
        mark = "ok" if value <= AIMS[name] else "MISSED"
        print(f"  {name:<52} {value:6.2f}  (aim <= {AIMS[name]}: {mark})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-wall", action="store_true", help="instruction counts only")
    parser.add_argument("--no-callgrind", action="store_true")
    parser.add_argument("--only", default="", help="workloads whose name starts so")
    parser.add_argument("--parts", action="store_true",
                        help="also count the engine's pieces of a guarded call")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/flat.json"))
    args = parser.parse_args()
    if _instructions.active():  # the callgrind child
        count_instructions(workloads(args.only))
        if args.parts:
            count_parts()
        return
    result: dict[str, Any] = {}
    if not args.no_callgrind:
        dumps = _instructions.rerun_under_callgrind([sys.argv[0], *sys.argv[1:]])
        if dumps is None:
            print("valgrind not available (x86-64 Linux): wall time only")
        else:
            counts = _instructions.read_regions(dumps)
            shutil.rmtree(dumps, ignore_errors=True)
            per_call: dict[str, dict[str, float]] = {}
            parts = {k.split("|")[1]: v[-1] / COUNTED["prompt"] for k, v in counts.items()
                     if k.startswith("parts|")}
            for key, values in counts.items():
                load, config = key.split("|")
                if load != "parts":
                    per_call.setdefault(load, {})[config] = values[-1] / COUNTED[load]
            result["instructions"] = per_call
            show("instructions per call (callgrind, main thread):", "instr", per_call)
            if parts:
                result["parts"] = parts
                print("the engine's part of a guarded call (5-message prompt, no LangChain):")
                for name, value in parts.items():
                    print(f"  {name:<30} {value:>10,.0f} instr/call")
    if not args.no_wall:
        wall = time_calls(workloads(args.only), args.rounds)
        result["wall_us"] = wall
        show(f"wall time per call (median of {args.rounds} interleaved rounds):", "us", wall)
    result["ratios"] = {kind: {k: round(v, 3) for k, v in ratios(result[key]).items()}
                        for kind, key in (("instructions", "instructions"), ("wall", "wall_us"))
                        if key in result}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
