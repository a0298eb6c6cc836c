"""Per-request context that travels with a call: service, request id, the profile flag, CPU meter.

Context variables, so each asyncio task (one per RPC) has its own; thread-pool work sees them
when submitted through ``in_context``, and queued batch items carry a ``capture`` of them.
"""

from __future__ import annotations

import contextvars
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

# gRPC metadata keys (lower case, as gRPC requires).
REQUEST_ID_HEADER = "x-request-id"
PROFILE_HEADER = "x-inferline-profile"
TIMINGS_TRAILER = "x-inferline-timings"
# The model a call serves, passed by the controller to the stages (whose requests name a recipe,
# not a model) so that their request metrics carry it too.
MODEL_HEADER = "x-inferline-model"

SERVICE: contextvars.ContextVar[str] = contextvars.ContextVar("inferline_service", default="")
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("inferline_request_id", default="")
MODEL: contextvars.ContextVar[str] = contextvars.ContextVar("inferline_model", default="")


@dataclass
class Profile:
    """Milliseconds per step of one request, summed over its items (``x-inferline-profile``).

    Steps of items that run in parallel add up, so a step can exceed the request's wall time:
    the sum says where the work went, the stage totals say how long the caller waited.
    """

    ms: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, key: str, seconds: float) -> None:
        with self._lock:
            self.ms[key] = self.ms.get(key, 0.0) + seconds * 1000.0

    def merge(self, timings: dict[str, float]) -> None:
        with self._lock:
            for key, value in timings.items():
                self.ms[key] = self.ms.get(key, 0.0) + value


PROFILE: contextvars.ContextVar[Profile | None] = contextvars.ContextVar("inferline_profile", default=None)


@dataclass
class CpuMeter:
    """CPU seconds of one request's work in this stage, added from the threads that did it.

    Steps are timed with their thread's CPU clock (exact for the step); a forward pass with the
    process's CPU clock (torch's intra-op threads do its work), shared among the requests of the
    batch by their items. Event-loop work ((de)serialisation, the handler itself) is not in it.
    """

    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, seconds: float) -> None:
        with self._lock:
            self.seconds += seconds


CPU: contextvars.ContextVar[CpuMeter | None] = contextvars.ContextVar("inferline_cpu", default=None)
# GPU seconds of one request in this stage: its share (by items) of the wall time of the forward
# passes that ran on a GPU, the time the model held the device for it. Same meter type as CPU.
GPU: contextvars.ContextVar[CpuMeter | None] = contextvars.ContextVar("inferline_gpu", default=None)


@dataclass(frozen=True)
class RequestContext:
    """What a queued item needs to be reported under its own request: trace parent, profile."""

    otel: otel_context.Context
    service: str
    profile: Profile | None
    cpu: CpuMeter | None = None
    gpu: CpuMeter | None = None

    @property
    def key(self) -> tuple[int, int, int]:
        """Items with equal keys belong to the same request (the same parent span)."""
        return trace.get_current_span(self.otel).get_span_context().span_id, id(self.profile), id(self.cpu)


def capture() -> RequestContext:
    return RequestContext(otel_context.get_current(), SERVICE.get(), PROFILE.get(), CPU.get(), GPU.get())


def in_context(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` bound to a copy of the caller's context, for ``run_in_executor``: executor threads
    do not inherit context variables, so spans and logs there would lose their request.

    Call it once per submitted item: one copied context cannot be entered by two threads.
    """
    return functools.partial(contextvars.copy_context().run, fn)
