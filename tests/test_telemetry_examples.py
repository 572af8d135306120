"""examples/jaeger/guarded_run.py against a local traces-only OTLP receiver (what Jaeger v2
is to it): spans arrive, no metric request is made, and a failed export is reported as one,
with a non-zero exit, instead of "spans sent"."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.sdk")

from .otlp_receiver import OtlpReceiver, kv

ROOT = Path(__file__).resolve().parent.parent


def run_example(endpoint: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(AGENT_GUARD_OTLP=endpoint, OTEL_EXPORTER_OTLP_TIMEOUT="2",
               PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "examples/jaeger/guarded_run.py")],
                          env=env, capture_output=True, text=True, timeout=120)


def test_the_jaeger_example_sends_traces_only() -> None:
    receiver = OtlpReceiver(traces_only=True)
    try:
        out = run_example(receiver.base)
    finally:
        receiver.close()
    assert out.returncode == 0, out.stderr
    assert "spans sent" in out.stdout
    assert receiver.metric_paths() == [] and 405 not in receiver.statuses
    [root] = [s for s in receiver.spans if s.name == "invoke_agent support"]
    assert kv(root.attributes)["user.id"] == "ann"
    assert {r["service.name"] for r in receiver.span_resources} == {"agent-guard-demo"}


def test_the_jaeger_example_says_when_nothing_got_there() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = run_example(f"http://127.0.0.1:{port}")
    assert out.returncode == 1
    assert "spans sent" not in out.stdout
    assert "did not reach" in out.stderr and f"127.0.0.1:{port}" in out.stderr
