"""Telemetry: OpenTelemetry spans and metrics with cost (``pip install
'langchain-agent-guard[otel]'``)."""

from .otel import Attr, ExportStatus, GuardTelemetry, configure_otlp

__all__ = ["Attr", "ExportStatus", "GuardTelemetry", "configure_otlp"]
