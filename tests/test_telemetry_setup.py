"""configure_otlp() set up as OpenTelemetry users expect, checked on the wire: each case runs
in a fresh interpreter (global providers), exports with the real OTLP/HTTP exporters to a
local receiver, and the test reads what arrived."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from .otlp_receiver import OtlpReceiver

SCRIPT = textwrap.dedent("""
    import json, sys
    from opentelemetry import metrics, trace
    from agent_guard import Guard, GuardCallbackHandler, Limits
    from agent_guard.telemetry import configure_otlp
    from agent_guard.testing import ScriptedChatModel
    kwargs = json.loads(sys.argv[1])
    telemetry = configure_otlp(**kwargs)
    handler = GuardCallbackHandler(Guard(Limits(max_cost_usd=1)), telemetry=telemetry,
                                   session_id="setup")
    ScriptedChatModel(model_name="gpt-4o").invoke("hi", config={"callbacks": [handler]})
    flushed = telemetry.flush() if hasattr(telemetry, "flush") else None
    for provider in (trace.get_tracer_provider(), metrics.get_meter_provider()):
        if hasattr(provider, "force_flush"):
            provider.force_flush()
    print(json.dumps({"flushed": flushed,
                      "tracer": type(trace.get_tracer_provider()).__name__,
                      "meter": type(metrics.get_meter_provider()).__name__}))
""")

OTEL_VARS = ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_SERVICE_NAME",
             "OTEL_RESOURCE_ATTRIBUTES", "OTEL_EXPORTER_OTLP_ENDPOINT",
             "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
             "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
             "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "PHOENIX_PROJECT_NAME")


def run(receiver: OtlpReceiver, env: dict[str, str] | None = None, **kwargs: Any
        ) -> tuple[dict[str, Any], str]:
    kwargs.setdefault("endpoint", receiver.base)
    full_env = {k: v for k, v in os.environ.items() if k not in OTEL_VARS}
    full_env.update(env or {})
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(kwargs)], env=full_env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


@pytest.fixture
def traces_only() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver(traces_only=True)
    yield r
    r.close()


def span_names(receiver: OtlpReceiver) -> list[str]:
    return [s.name for s in receiver.spans]


def test_metrics_exporter_none_exports_no_metrics(receiver: OtlpReceiver) -> None:
    """OTEL_METRICS_EXPORTER=none: spans go out, not one metric request (the receiver would
    take them)."""
    result, stderr = run(receiver, {"OTEL_METRICS_EXPORTER": "none"})
    assert span_names(receiver) == ["chat gpt-4o"]
    assert receiver.metric_paths() == [] and receiver.metrics == []
    assert result["flushed"] is True, stderr


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_a_traces_only_receiver_gets_no_metric_requests(traces_only: OtlpReceiver,
                                                        how: str) -> None:
    """Phoenix and Jaeger take OTLP traces only (405 on /v1/metrics): with metrics off
    nothing is sent there, nothing fails, nothing is logged."""
    if how == "argument":
        result, stderr = run(traces_only, metrics=False)
    else:
        result, stderr = run(traces_only, {"OTEL_METRICS_EXPORTER": "none"})
    assert span_names(traces_only) == ["chat gpt-4o"]
    assert traces_only.metric_paths() == [] and 405 not in traces_only.statuses
    assert result["flushed"] is True and "failed" not in stderr


def test_a_failed_export_says_so_clearly(traces_only: OtlpReceiver) -> None:
    """Metrics on against a traces-only receiver: the 405 is reported in one line that
    names the signal, the endpoint and the fix; flush() says the export failed."""
    result, stderr = run(traces_only)
    assert "/v1/metrics" in traces_only.paths and 405 in traces_only.statuses
    lines = [line for line in stderr.splitlines() if "agent-guard" in line]
    assert any("metrics" in line and traces_only.base in line and "failed" in line
               and "metrics=False" in line for line in lines), stderr
    assert result["flushed"] is False


def test_nothing_listening_is_reported_and_flush_says_false() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = OtlpReceiver()
    dead.close()
    result, stderr = run(dead, {"OTEL_EXPORTER_OTLP_TIMEOUT": "1"},
                         endpoint=f"http://127.0.0.1:{port}", metrics=False)
    assert result["flushed"] is False
    assert any("agent-guard" in line and "traces" in line and "failed" in line
               for line in stderr.splitlines()), stderr


def test_traces_exporter_none_sends_no_spans(receiver: OtlpReceiver) -> None:
    run(receiver, {"OTEL_TRACES_EXPORTER": "none"})
    assert receiver.spans == [] and not any(p.endswith("/v1/traces") for p in receiver.paths)
    assert receiver.metrics  # metrics still go


def test_console_exporter_prints_spans(receiver: OtlpReceiver) -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps({"metrics": False})],
        env={**{k: v for k, v in os.environ.items() if k not in OTEL_VARS},
             "OTEL_TRACES_EXPORTER": "console"},
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert '"name": "chat gpt-4o"' in out.stdout and receiver.paths == []


@pytest.mark.parametrize("env, kwargs, expected", [
    ({}, {}, {"service.name": "agent-guard"}),
    ({"OTEL_SERVICE_NAME": "svc-env"}, {}, {"service.name": "svc-env"}),
    ({"OTEL_SERVICE_NAME": "svc-env"}, {"service_name": "svc-arg"}, {"service.name": "svc-arg"}),
    ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=svc-res,deployment.environment.name=staging"},
     {}, {"service.name": "svc-res", "deployment.environment.name": "staging"}),
    ({}, {"project": "billing-bot"}, {"openinference.project.name": "billing-bot"}),
    ({"PHOENIX_PROJECT_NAME": "from-env"}, {}, {"openinference.project.name": "from-env"}),
    ({}, {"resource_attributes": {"team": "core"}}, {"team": "core"}),
])
def test_service_name_project_and_resource_attributes(receiver: OtlpReceiver, env: dict,
                                                      kwargs: dict, expected: dict) -> None:
    run(receiver, env, **kwargs)
    [resource] = receiver.span_resources
    assert {k: resource.get(k) for k in expected} == expected
    [metric_resource, *_] = receiver.metric_resources
    assert {k: metric_resource.get(k) for k in expected} == expected


@pytest.mark.parametrize("env", [{"OTEL_METRICS_EXPORTER": "prometheus"},
                                 {"OTEL_TRACES_EXPORTER": "zipkin"}])
def test_an_exporter_it_cannot_set_up_is_refused_clearly(env: dict) -> None:
    from agent_guard.telemetry.otel import exporter_names

    [(name, value)] = env.items()
    with pytest.raises(ValueError, match=f"{name}={value!r}.*otlp, console or none"):
        exporter_names(name, None, environ=env)


@pytest.mark.parametrize("value, switch, expected", [
    (None, None, ["otlp"]), ("none", None, []), ("None", None, []), ("otlp", None, ["otlp"]),
    ("otlp,console", None, ["otlp", "console"]), (" console ", None, ["console"]),
    ("none", True, ["otlp"]), ("console", True, ["console"]), ("otlp", False, []),
])
def test_exporter_names_from_the_environment_and_the_switch(
        value: str | None, switch: bool | None, expected: list[str]) -> None:
    from agent_guard.telemetry.otel import exporter_names

    environ = {} if value is None else {"OTEL_METRICS_EXPORTER": value}
    assert exporter_names("OTEL_METRICS_EXPORTER", switch, environ=environ) == expected


@pytest.mark.parametrize("env, refused", [
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL":
      "http/protobuf", "OTEL_METRICS_EXPORTER": "none"}, None),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_TRACES_EXPORTER": "console",
      "OTEL_METRICS_EXPORTER": "none"}, None),
])
def test_a_protocol_other_than_otlp_http_is_refused_clearly(monkeypatch, env: dict,
                                                             refused: str | None) -> None:
    from agent_guard.telemetry.otel import _check_protocol, exporter_names

    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def check() -> None:
        for signal in ("TRACES", "METRICS"):
            if "otlp" in exporter_names(f"OTEL_{signal}_EXPORTER", None):
                _check_protocol(signal)

    if refused is None:
        check()
    else:
        with pytest.raises(ValueError, match=f"{refused}=.*http/protobuf"):
            check()
