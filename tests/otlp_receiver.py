"""A local OTLP/HTTP receiver for tests: decodes what the real exporters send.

``traces_only=True`` behaves like Phoenix's or Jaeger's OTLP endpoint: it takes
``/v1/traces`` and answers 405 to anything else (``/v1/metrics``)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


def any_value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def kv(attributes: Any) -> dict[str, Any]:
    return {a.key: any_value(a.value) for a in attributes}


class OtlpReceiver:
    def __init__(self, *, traces_only: bool = False) -> None:
        self.spans: list[Any] = []
        self.span_resources: list[dict[str, Any]] = []
        self.metrics: list[Any] = []
        self.metric_resources: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.statuses: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, code: int) -> None:
                receiver.statuses.append(code)
                self.send_response(code)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.paths.append(self.path)
                if self.path.endswith("/v1/traces"):
                    request = ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    for rs in request.resource_spans:
                        for ss in rs.scope_spans:
                            receiver.spans.extend(ss.spans)
                            receiver.span_resources.extend(
                                kv(rs.resource.attributes) for _ in ss.spans)
                    self._answer(200)
                elif self.path.endswith("/v1/metrics") and not traces_only:
                    request = ExportMetricsServiceRequest()
                    request.ParseFromString(body)
                    for rm in request.resource_metrics:
                        receiver.metric_resources.append(kv(rm.resource.attributes))
                        for sm in rm.scope_metrics:
                            receiver.metrics.extend(sm.metrics)
                    self._answer(200)
                else:
                    self._answer(405)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def metric_paths(self) -> list[str]:
        return [p for p in self.paths if p.endswith("/v1/metrics")]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
