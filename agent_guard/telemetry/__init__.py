"""Telemetry: OpenTelemetry spans and metrics with cost (``pip install
'langchain-agent-guard[otel]'``)."""

from .otel import Attr, GuardTelemetry, configure_otlp

__all__ = ["Attr", "GuardTelemetry", "configure_otlp"]
