"""Tracing is off without an OTLP endpoint, and then builds nothing."""

from __future__ import annotations

from serving.ops.tracing import Tracing


def test_off_by_default_is_a_no_op() -> None:
    tracing = Tracing("t", environ={})
    assert not tracing.enabled
    with tracing.span("x", parent={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}, a=1) as span:
        assert span is None
    assert tracing.carrier() is None
    tracing.shutdown()
