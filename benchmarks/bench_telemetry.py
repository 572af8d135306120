"""Added time per model call with telemetry on: the guard (caps + spans + metrics) vs an
empty callback handler vs OpenLLMetry's opentelemetry-instrumentation-langchain.

    python benchmarks/bench_telemetry.py [--calls 1000] [--rounds 7]

All configurations invoke the same in-process chat model on the same prompt,
in interleaved rounds, with spans going to an SDK TracerProvider whose
exporter drops them (so export cost is equal and small). OpenLLMetry is
instrumented and uninstrumented around its own timing in each round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _checkout  # noqa: F401  (this checkout's agent_guard)
from bench_overhead import PROMPT, EmptyHandler, make_model  # the script's own folder
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from agent_guard import Guard, GuardCallbackHandler, Limits
from agent_guard.telemetry import GuardTelemetry


class DropExporter(SpanExporter):
    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        self.count += len(spans)
        return SpanExportResult.SUCCESS


def timed(model: Any, handlers: list[Any], n: int) -> float:
    cfg = {"callbacks": handlers}
    t0 = time.perf_counter()
    for _ in range(n):
        model.invoke(PROMPT, config=cfg)
    return (time.perf_counter() - t0) / n


def openllmetry_child(rounds: int, per: int, queue: Any) -> None:
    """In its own process (uninstrument does not fully undo the instrumentation): the
    bare model, then the model with OpenLLMetry, each against its own baseline."""
    from opentelemetry.instrumentation.langchain import LangchainInstrumentor

    model = make_model()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(DropExporter()))
    timed(model, [], 100)
    bare = [timed(model, [], per) for _ in range(rounds)]
    LangchainInstrumentor().instrument(tracer_provider=provider)
    timed(model, [], 100)
    instrumented = [timed(model, [], per) for _ in range(rounds)]
    queue.put((statistics.median(bare), statistics.median(instrumented)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/telemetry.json"))
    args = parser.parse_args()
    import multiprocessing

    model = make_model()
    exporter = DropExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = GuardTelemetry(provider, MeterProvider(metric_readers=[InMemoryMetricReader()]))
    guard = Guard(Limits(max_cost_usd=10**6, max_tokens=10**12, max_model_calls=10**9))
    guarded = [GuardCallbackHandler(guard, session_id="b", telemetry=telemetry)]
    plain_guard = [GuardCallbackHandler(Guard(guard.limits), session_id="b")]
    per = args.calls
    times: dict[str, list[float]] = {"no callbacks": [], "empty handler": [],
                                     "guard, no telemetry": [], "guard + telemetry": []}
    for handlers in ([], guarded, plain_guard):  # warm-up
        timed(model, handlers, 100)
    for _ in range(args.rounds):
        times["no callbacks"].append(timed(model, [], per))
        times["empty handler"].append(timed(model, [EmptyHandler()], per))
        times["guard, no telemetry"].append(timed(model, plain_guard, per))
        times["guard + telemetry"].append(timed(model, guarded, per))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["no callbacks"]
    added = {k: v - base for k, v in med.items()}

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=openllmetry_child, args=(args.rounds, per, queue))
    child.start()
    bare, instrumented = queue.get(timeout=600)
    child.join()
    med["OpenLLMetry"] = instrumented
    added["OpenLLMetry"] = instrumented - bare

    print(f"per model call, median of {args.rounds} rounds x {per} calls "
          "(OpenLLMetry in its own process, against its own bare-model baseline "
          f"of {bare * 1e6:.1f} us):")
    print(f"{'configuration':<22}{'us/call':>10}{'added us':>10}{'added / empty':>15}"
          f"{'added / OpenLLMetry':>21}")
    for name, t in med.items():
        print(f"{name:<22}{t * 1e6:>10.1f}{added[name] * 1e6:>10.1f}"
              f"{added[name] / added['empty handler']:>15.2f}"
              f"{added[name] / added['OpenLLMetry']:>21.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({k: {"us_per_call": med[k] * 1e6,
                                         "added_us": added[k] * 1e6} for k in med}, indent=2))


if __name__ == "__main__":
    main()
