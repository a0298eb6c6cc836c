"""Traces, metrics, request context and profiling, shared by every stage.

The bootstrap (``common/server.py``) wires these once; stages only mark their inner steps with
``span(...)`` and the batcher reports through ``batch_started``. See docs/monitoring.md.
"""

from inferline.common.telemetry.context import RequestContext, capture, in_context
from inferline.common.telemetry.tracing import span, traced

__all__ = ["RequestContext", "capture", "in_context", "span", "traced"]
