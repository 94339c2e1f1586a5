"""OpenTelemetry spans over the request path, exported over OTLP/HTTP when an endpoint is configured.

Off by default and then free: `Tracing.start` returns None and no span object is ever built. On when the
standard OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set; Langfuse and Grafana Tempo accept
OTLP. The trace context crosses Ray handles as a small W3C `traceparent` carrier dict.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


class Tracing:
    def __init__(self, service: str, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.tracer: Any = None
        if not any(env.get(v) for v in ENDPOINT_VARS):
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # Headers, timeout and batching come from the standard OTEL_* variables, read by the SDK itself.
        endpoint = env.get(ENDPOINT_VARS[0]) or env[ENDPOINT_VARS[1]].rstrip("/") + "/v1/traces"
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.provider = provider
        self.tracer = provider.get_tracer("tierserve")
        log.info("tracing: OTLP export on for %s", service)

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    @contextmanager
    def span(self, name: str, parent: dict[str, str] | None = None, **attributes: Any) -> Iterator[Any]:
        """A span (child of `parent`, a carrier from another process); a no-op when tracing is off."""
        if self.tracer is None:
            yield None
            return
        from opentelemetry.propagate import extract

        context = extract(parent) if parent else None
        with self.tracer.start_as_current_span(name, context=context, attributes=attributes) as span:
            yield span

    def carrier(self) -> dict[str, str] | None:
        """The current span's context to hand to another process (None when off)."""
        if self.tracer is None:
            return None
        from opentelemetry.propagate import inject

        out: dict[str, str] = {}
        inject(out)
        return out

    def shutdown(self) -> None:
        if self.tracer is not None:
            self.provider.shutdown()
