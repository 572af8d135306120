"""Telemetry: OpenTelemetry spans and metrics with cost (the OTLP exporter of
``configure_otlp``: ``pip install 'langchain-agent-guard[otel]'``), Phoenix prices,
LangSmith tool-run costs.

The OpenTelemetry names load on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .otel import Attr, ExportStatus, GuardTelemetry, configure_otlp

__all__ = ["Attr", "ExportStatus", "GuardTelemetry", "configure_otlp"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import otel

        return getattr(otel, name)
    raise AttributeError(f"module 'agent_guard.telemetry' has no attribute {name!r}")
