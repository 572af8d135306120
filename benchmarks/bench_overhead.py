"""Added time per model call: the guard (memory, SQLite, Redis ledgers) vs an empty handler;
and, in a ``create_agent`` agent, the callback handler beside GuardMiddleware, sync and async.

    python benchmarks/bench_overhead.py [--calls 2000] [--redis redis://127.0.0.1:6379/15]

Every configuration invokes the same in-process chat model on the same
5-message prompt, in interleaved rounds so machine noise hits all of them
alike. Reported per configuration: median time per call, the time it adds
over no callbacks at all, and two ratios against the empty callback handler
measured in the same run:

- ``total / empty``: a guarded call's time over an empty-handler call's time;
- ``added / empty added``: what the guard adds over what an empty handler adds.

For Redis it also counts the commands the server processed per model call
(``INFO commandstats``): one EVALSHA (a call's settle rides with the next reserve;
``benchmarks/bench_redis.py`` measures the Redis ledger against one EVALSHA).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import _checkout  # noqa: F401  (this checkout's agent_guard)
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from agent_guard import Guard, GuardCallbackHandler, Limits
from agent_guard.testing import ScriptedChatModel


class EmptyHandler(BaseCallbackHandler):
    """Receives the same events as the guard and does nothing."""

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        pass

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        pass

    def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        pass


PROMPT = [
    SystemMessage("You are a careful support agent. Check orders before answering. " * 10),
    HumanMessage("Where is my order A1001? It was supposed to arrive last week."),
    AIMessage("Let me check the order system for A1001."),
    HumanMessage("Also, can I get a refund if it is lost?"),
    AIMessage("I will check the refund policy too."),
]


def make_model() -> ScriptedChatModel:
    answer = AIMessage(
        content="Your order A1001 is delayed at the depot; refunds apply after 10 days.",
        usage_metadata={"input_tokens": 180, "output_tokens": 20, "total_tokens": 200,
                        "input_token_details": {"cache_read": 128}},
        response_metadata={"model_name": "gpt-4o-mini"},
    )
    return ScriptedChatModel(model_name="gpt-4o-mini", responses=[answer], max_tokens=256)


class RoundTrips:
    """Counts the commands sync redis-py connections write (each is one round trip; the
    ledger writes its scripts on a connection it keeps, not through the client)."""

    def __init__(self) -> None:
        import redis.connection

        self.count = 0
        inner = redis.connection.AbstractConnection.send_command

        def counting(conn: Any, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return inner(conn, *args, **kwargs)

        redis.connection.AbstractConnection.send_command = counting  # type: ignore


def evalsha_calls(client: Any) -> int:
    """EVALSHA calls the server has run (INFO commandstats also counts the commands
    a script runs inside, so only top-level EVALSHA is read here)."""
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def run(calls: int, rounds: int, redis_url: str | None) -> dict[str, Any]:
    model = make_model()
    tmp = tempfile.mkdtemp(prefix="agent-guard-bench-")
    big = Limits(max_cost_usd=10**6, max_tokens=10**12, max_model_calls=10**9)
    configs: dict[str, list[Any]] = {
        "no callbacks": [],
        "empty handler": [EmptyHandler()],
        "guard memory://": [GuardCallbackHandler(Guard(big, "memory://"), session_id="b")],
        "guard sqlite://": [GuardCallbackHandler(
            Guard(big, f"sqlite:///{Path(tmp) / 'bench.db'}"), session_id="b")],
    }
    redis_guard = None
    if redis_url:
        from agent_guard.ledger.redis import RedisLedger

        ledger = RedisLedger.from_url(redis_url, namespace=f"bench-{uuid.uuid4().hex[:8]}")
        redis_guard = Guard(big, ledger)
        configs["guard redis://"] = [GuardCallbackHandler(redis_guard, session_id="b")]

    for handlers in configs.values():  # warm up: imports, encodings, scripts, connections
        for _ in range(50):
            model.invoke(PROMPT, config={"callbacks": handlers})

    per_call: dict[str, list[float]] = {name: [] for name in configs}
    per_round = max(1, calls // rounds)
    for _ in range(rounds):
        for name, handlers in configs.items():
            cfg = {"callbacks": handlers}
            t0 = time.perf_counter()
            for _ in range(per_round):
                model.invoke(PROMPT, config=cfg)
            per_call[name].append((time.perf_counter() - t0) / per_round)

    result: dict[str, Any] = {"calls_per_config": per_round * rounds, "configs": {}}
    med = {name: statistics.median(v) for name, v in per_call.items()}
    base, empty = med["no callbacks"], med["empty handler"]
    for name, t in med.items():
        result["configs"][name] = {
            "us_per_call": round(t * 1e6, 1),
            "added_us": round((t - base) * 1e6, 1),
            "total_vs_empty": round(t / empty, 3),
            "added_vs_empty_added": round((t - base) / (empty - base), 2)
            if empty > base else None,
        }

    if redis_guard is not None:
        client = redis_guard.ledger.client  # type: ignore[attr-defined]
        n = 500
        before = evalsha_calls(client)
        trips = RoundTrips()
        for _ in range(n):
            model.invoke(PROMPT, config={"callbacks": configs["guard redis://"]})
        result["redis_round_trips_per_model_call"] = trips.count / n
        result["redis_evalsha_per_model_call"] = (evalsha_calls(client) - before) / n
    return result


def run_agents(calls: int, rounds: int) -> dict[str, Any]:
    """A ``create_agent`` agent (one model call per run): what the callback handler and
    GuardMiddleware each add per call over the agent alone, sync and async, same run."""
    import asyncio

    from langchain.agents import create_agent

    from agent_guard import GuardMiddleware

    big = Limits(max_cost_usd=10**6, max_tokens=10**12, max_model_calls=10**9,
                 max_steps=10**9)
    inputs = {"messages": PROMPT[1:2]}
    plain = create_agent(make_model(), [])
    callback_guard = Guard(big, "memory://")
    with_callback = create_agent(make_model(), [])
    with_middleware = create_agent(make_model(), [], middleware=[
        GuardMiddleware(Guard(big, "memory://"), session_id="b")])
    configs: dict[str, tuple[Any, dict[str, Any]]] = {
        "agent": (plain, {}),
        "agent + callback": (with_callback, {"callbacks": [
            GuardCallbackHandler(callback_guard, session_id="b")]}),
        "agent + middleware": (with_middleware, {}),
    }
    per_round = max(1, calls // rounds)
    result: dict[str, Any] = {"calls_per_config": per_round * rounds}

    def sync_round(agent: Any, cfg: dict[str, Any], n: int) -> None:
        for _ in range(n):
            agent.invoke(inputs, cfg)

    async def async_round(agent: Any, cfg: dict[str, Any], n: int) -> None:
        for _ in range(n):
            await agent.ainvoke(inputs, cfg)

    for mode in ("sync", "async"):
        for agent, cfg in configs.values():  # warm up
            if mode == "sync":
                sync_round(agent, cfg, 20)
            else:
                asyncio.run(async_round(agent, cfg, 20))
        per_call: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(rounds):
            for name, (agent, cfg) in configs.items():
                t0 = time.perf_counter()
                if mode == "sync":
                    sync_round(agent, cfg, per_round)
                else:
                    asyncio.run(async_round(agent, cfg, per_round))
                per_call[name].append((time.perf_counter() - t0) / per_round)
        med = {name: statistics.median(v) for name, v in per_call.items()}
        base = med["agent"]
        result[mode] = {name: {"us_per_call": round(t * 1e6, 1),
                               "added_us": round((t - base) * 1e6, 1)}
                        for name, t in med.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15",
                        help="Redis URL, or '' to skip the Redis ledger")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/overhead.json"))
    parser.add_argument("--agent-calls", type=int, default=400,
                        help="agent runs per configuration for the middleware rows")
    args = parser.parse_args()
    result = run(args.calls, args.rounds, args.redis or None)
    result["agents"] = run_agents(args.agent_calls, args.rounds)
    print(f"per model call, median of {args.rounds} rounds "
          f"({result['calls_per_config']} calls per configuration):")
    print(f"{'configuration':<18}{'us/call':>10}{'added us':>10}{'total/empty':>13}"
          f"{'added/empty added':>19}")
    for name, r in result["configs"].items():
        ratio = "" if r["added_vs_empty_added"] is None else f"{r['added_vs_empty_added']:.2f}"
        print(f"{name:<18}{r['us_per_call']:>10.1f}{r['added_us']:>10.1f}"
              f"{r['total_vs_empty']:>13.3f}{ratio:>19}")
    if "redis_round_trips_per_model_call" in result:
        print("Redis round trips per guarded model call: "
              f"{result['redis_round_trips_per_model_call']:g} sent by the client, "
              f"{result['redis_evalsha_per_model_call']:g} EVALSHA run by the server "
              "(each settle rides with the next reserve)")
    agents = result["agents"]
    print(f"create_agent, one model call per run, median of {args.rounds} rounds "
          f"({agents['calls_per_config']} runs per configuration), memory ledger:")
    print(f"{'configuration':<22}{'sync us':>10}{'added':>9}{'async us':>10}{'added':>9}")
    for name in agents["sync"]:
        s_, a_ = agents["sync"][name], agents["async"][name]
        print(f"{name:<22}{s_['us_per_call']:>10.1f}{s_['added_us']:>9.1f}"
              f"{a_['us_per_call']:>10.1f}{a_['added_us']:>9.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
