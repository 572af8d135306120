"""Added time per model call with telemetry on: the guard (caps + spans + metrics) vs an
empty callback handler vs OpenLLMetry's opentelemetry-instrumentation-langchain.

    python benchmarks/bench_telemetry.py [--calls 1000] [--rounds 7]

"OTel SDK alone" is a handler doing only the SDK work the guard's telemetry asks for
(the same span attributes, read from a real guarded call, and the same histogram
points, no agent-guard code): the floor that any exporter of those attributes pays,
caps or not. "guard + tel., no OI" leaves out the OpenInference names
(``GuardTelemetry(openinference=False)``).

All configurations invoke the same in-process chat model on the same prompt,
in interleaved rounds, with spans going to an SDK TracerProvider whose
exporter drops them (so export cost is equal and small) and metric points to an
SDK MeterProvider. OpenLLMetry runs in processes of its own (its ``uninstrument()``
does not fully undo it), each against its own bare-model baseline: "OpenLLMetry"
with its histograms on an SDK MeterProvider as the guard's are (like for like),
"OL, spans only" with them on the global no-op meter provider (what it costs when
the application sets up no metrics).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _checkout  # noqa: F401  (this checkout's agent_guard)
from bench_overhead import PROMPT, EmptyHandler, make_model  # the script's own folder
from langchain_core.callbacks import BaseCallbackHandler
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from agent_guard import Guard, GuardCallbackHandler, Limits
from agent_guard.telemetry import Attr, GuardTelemetry

try:
    import _instructions  # callgrind instruction counts (benchmarks/_instructions.py)
except ImportError:  # not in this checkout yet: wall time only
    _instructions = None  # type: ignore[assignment]


class DropExporter(SpanExporter):
    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        self.count += len(spans)
        return SpanExportResult.SUCCESS


class _Capture(SpanProcessor):
    """Keeps the attributes of the first model-call span at its start and at its end."""

    def __init__(self) -> None:
        self.start: dict[str, Any] | None = None
        self.end: dict[str, Any] | None = None

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if self.start is None and span.name.startswith("chat "):
            self.start = dict(span.attributes)

    def on_end(self, span: Any) -> None:
        if self.end is None and span.name.startswith("chat "):
            self.end = dict(span.attributes)


def guard_span_attributes(model: Any, **options: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(start, end) attributes of the span GuardTelemetry(**options) writes for one call of
    ``model``, read from a real guarded call, so the floor writes exactly the same."""
    capture = _Capture()
    provider = TracerProvider()
    provider.add_span_processor(capture)
    telemetry = GuardTelemetry(provider, MeterProvider(metric_readers=[InMemoryMetricReader()]),
                               **options)
    handler = GuardCallbackHandler(Guard(Limits(max_cost_usd=10)), session_id="b",
                                   telemetry=telemetry)
    model.invoke(PROMPT, config={"callbacks": [handler]})
    assert capture.start is not None and capture.end is not None
    return capture.start, {k: v for k, v in capture.end.items()
                           if capture.start.get(k, object()) != v}


class SdkOnlyHandler(BaseCallbackHandler):
    """The floor: only the OpenTelemetry SDK work the guard's telemetry asks for per
    model call (one CLIENT span with the same attributes, set at the same moments, and
    the same three histogram points), with no agent-guard code and no caps."""

    def __init__(self, provider: Any, meters: Any, start: dict[str, Any],
                 end: dict[str, Any]) -> None:
        self.tracer = provider.get_tracer("floor")
        meter = meters.get_meter("floor")
        self.tokens = meter.create_histogram("gen_ai.client.token.usage")
        self.duration = meter.create_histogram("gen_ai.client.operation.duration")
        self.spans: dict[Any, Any] = {}
        self.start, self.end = start, end
        self.common = {Attr.OPERATION: "chat", Attr.REQUEST_MODEL: "gpt-4o",
                       Attr.PROVIDER: "openai"}

    def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: Any,
                            **kwargs: Any) -> None:
        self.spans[run_id] = self.tracer.start_span(
            "chat gpt-4o", kind=SpanKind.CLIENT, attributes=dict(self.start))

    def on_llm_end(self, response: Any, *, run_id: Any, **kwargs: Any) -> None:
        span = self.spans.pop(run_id)
        span.set_attributes(dict(self.end))
        self.tokens.record(120, {**self.common, Attr.TOKEN_TYPE: "input"})
        self.tokens.record(20, {**self.common, Attr.TOKEN_TYPE: "output"})
        self.duration.record(0.001, self.common)
        span.end()


OPENLLMETRY = "OpenLLMetry"  # spans and metrics, each to an SDK provider, as the guard's
OPENLLMETRY_SPANS = "OL, spans only"  # its metrics to the global no-op meter provider


def timed(model: Any, handlers: list[Any], n: int) -> float:
    cfg = {"callbacks": handlers}
    t0 = time.perf_counter()
    for _ in range(n):
        model.invoke(PROMPT, config=cfg)
    return (time.perf_counter() - t0) / n


def instrument_openllmetry(metrics: bool) -> None:
    """OpenLLMetry on this process, its spans to a dropping exporter as the guard's are;
    with ``metrics`` its histograms go to an SDK MeterProvider as the guard's do, else to
    the global meter provider, a no-op when nobody set one."""
    from opentelemetry.instrumentation.langchain import LangchainInstrumentor

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(DropExporter()))
    meters = {"meter_provider": MeterProvider(metric_readers=[InMemoryMetricReader()])
              } if metrics else {}
    LangchainInstrumentor().instrument(tracer_provider=provider, **meters)


def openllmetry_child(rounds: int, per: int, metrics: bool, queue: Any) -> None:
    """In its own process: the bare model, then the model with OpenLLMetry (it cannot
    be switched off again, so the two are not interleaved)."""
    model = make_model()
    timed(model, [], 100)
    bare = [timed(model, [], per) for _ in range(rounds)]
    instrument_openllmetry(metrics)
    timed(model, [], 100)
    instrumented = [timed(model, [], per) for _ in range(rounds)]
    queue.put((statistics.median(bare), statistics.median(instrumented)))


def configurations(model: Any) -> dict[str, list[Any]]:
    """The handlers of each in-process configuration (OpenLLMetry's are in its own)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(DropExporter()))

    def meters() -> MeterProvider:
        return MeterProvider(metric_readers=[InMemoryMetricReader()])

    limits = Limits(max_cost_usd=10**6, max_tokens=10**12, max_model_calls=10**9)

    def guarded(**telemetry: Any) -> list[Any]:
        return [GuardCallbackHandler(Guard(limits), session_id="b", telemetry=GuardTelemetry(
            provider, meters(), **telemetry) if telemetry else None)]

    return {"no callbacks": [], "empty handler": [EmptyHandler()],
            "OTel SDK alone": [SdkOnlyHandler(provider, meters(),
                                              *guard_span_attributes(model))],
            "guard, no telemetry": guarded(),
            "guard + telemetry": guarded(openinference=True),
            "guard + tel., no OI": guarded(openinference=False)}


COUNTED = 200  # calls per configuration under callgrind (instructions vary little)


def count_instructions(openllmetry: str) -> None:
    """(In a callgrind child) one region per configuration; OpenLLMetry last, since it
    cannot be switched off: ``metrics`` counts every configuration and OpenLLMetry with
    its metrics, ``spans`` the bare model and OpenLLMetry with spans only."""
    model = make_model()
    configs = configurations(model)
    if openllmetry == "spans":
        configs = {"no callbacks": []}
    for name, handlers in configs.items():
        timed(model, handlers, 20)  # warm: first-call paths, memos
        with _instructions.region(name):
            timed(model, handlers, COUNTED)
    instrument_openllmetry(openllmetry == "metrics")
    timed(model, [], 20)
    with _instructions.region(OPENLLMETRY if openllmetry == "metrics" else OPENLLMETRY_SPANS):
        timed(model, [], COUNTED)


def instructions() -> dict[str, float] | None:
    """Instructions per call of every configuration (main thread), or None without
    valgrind. OpenLLMetry's added count is against the bare model of its own child."""
    per_call: dict[str, float] = {}
    if _instructions is None:
        return None
    for variant in ("metrics", "spans"):
        dumps = _instructions.rerun_under_callgrind(
            [sys.argv[0], "--callgrind-openllmetry", variant])
        if dumps is None:
            return None
        counts = _instructions.read_regions(dumps)
        shutil.rmtree(dumps, ignore_errors=True)
        found = {name: values[-1] / COUNTED for name, values in counts.items()}
        if variant == "metrics":
            per_call.update(found)
        else:  # the same bare model in both children: OpenLLMetry's added count is kept
            per_call[OPENLLMETRY_SPANS] = (found[OPENLLMETRY_SPANS] - found["no callbacks"]
                                           + per_call["no callbacks"])
    return per_call


def table(title: str, unit: str, per_call: dict[str, float]) -> dict[str, dict[str, float]]:
    """Print per-call figures with their added cost and its ratios; return them."""
    base = per_call["no callbacks"]
    added = {k: v - base for k, v in per_call.items()}
    print(title)
    print(f"{'configuration':<24}{unit + '/call':>13}{'added':>12}{'/ empty':>9}"
          f"{'/ OpenLLMetry':>15}{'/ OL spans only':>17}")
    for name, v in per_call.items():
        print(f"{name:<24}{v:>13,.1f}{added[name]:>12,.1f}"
              f"{added[name] / added['empty handler']:>9.2f}"
              f"{added[name] / added[OPENLLMETRY]:>15.2f}"
              f"{added[name] / added[OPENLLMETRY_SPANS]:>17.2f}")
    return {k: {"per_call": per_call[k], "added": added[k]} for k in per_call}


def wall_time(rounds: int, per: int) -> tuple[dict[str, float], list[float]]:
    """Median microseconds per call of each configuration in interleaved rounds, and
    OpenLLMetry's, each against its own baseline, put on this process's bare model."""
    import multiprocessing

    model = make_model()
    configs = configurations(model)
    for handlers in configs.values():  # warm-up
        timed(model, handlers, 100)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, handlers in configs.items():
            times[name].append(timed(model, handlers, per))
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    ctx = multiprocessing.get_context("spawn")
    bares = []
    for name, metrics in ((OPENLLMETRY, True), (OPENLLMETRY_SPANS, False)):
        queue = ctx.Queue()
        child = ctx.Process(target=openllmetry_child, args=(rounds, per, metrics, queue))
        child.start()
        bare, instrumented = queue.get(timeout=600)
        child.join()
        bares.append(bare * 1e6)
        med[name] = med["no callbacks"] + (instrumented - bare) * 1e6
    return med, bares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-wall", action="store_true", help="instruction counts only")
    parser.add_argument("--no-callgrind", action="store_true", help="wall time only")
    parser.add_argument("--callgrind-openllmetry", choices=("metrics", "spans"),
                        help=argparse.SUPPRESS)  # set in the callgrind children
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/telemetry.json"))
    args = parser.parse_args()
    if _instructions is not None and _instructions.active():
        count_instructions(args.callgrind_openllmetry or "metrics")
        return
    result: dict[str, Any] = {}
    if not args.no_callgrind:
        counted = instructions()
        if counted is None:
            print("callgrind not available (valgrind on x86-64 Linux): wall time only")
        else:
            result["instructions"] = table(
                f"instructions per model call (callgrind, main thread, {COUNTED} calls "
                "each; OpenLLMetry's added count from its own process):", "instr", counted)
    if not args.no_wall:
        med, bares = wall_time(args.rounds, args.calls)
        result["wall_us"] = table(
            f"wall time per model call, median of {args.rounds} interleaved rounds x "
            f"{args.calls} calls (OpenLLMetry in its own processes, its added time against "
            "their own bare-model baselines of " + " and ".join(f"{b:.1f}" for b in bares)
            + " us):", "us", med)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
