"""The gateway's own metrics: Prometheus series for /metrics, and a one-minute window for /v1/stats.

Kept apart from the routes so the observability work can rewire it (OpenTelemetry, shared
registry) without touching them. Labels stay bounded: the route *template* (``/v1/models/{name}``,
never the name), the method and the status code; unmatched paths share one label.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

UNMATCHED_ROUTE = "unmatched"
WINDOW_S = 60.0
# Bounds the window's memory under a flood; past it the oldest requests fall out early.
WINDOW_MAX_REQUESTS = 100_000
# Latency buckets from a cached 5 ms answer up to a CLIP batch on a busy CPU.
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class WindowStats:
    window_s: float
    requests: int
    rate_per_s: float
    p95_ms: float | None
    errors: int


class RecentRequests:
    """(finish time, seconds, failed) of the API calls of the last ``window_s``, for the demo's live panel.

    Appended from the event loop and read from it too; the lock makes it safe for a threaded server.
    """

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self.clock = clock
        self._items: deque[tuple[float, float, bool]] = deque(maxlen=WINDOW_MAX_REQUESTS)
        self._lock = threading.Lock()

    def add(self, seconds: float, failed: bool) -> None:
        with self._lock:
            self._items.append((self.clock(), seconds, failed))

    def stats(self) -> WindowStats:
        now = self.clock()
        with self._lock:
            while self._items and self._items[0][0] < now - self.window_s:
                self._items.popleft()
            durations = sorted(seconds for _, seconds, _ in self._items)
            errors = sum(1 for *_, failed in self._items if failed)
        p95 = None
        if durations:
            # Nearest-rank p95: the smallest duration with at least 95 % of requests at or below it.
            rank = max(1, -(-95 * len(durations) // 100))
            p95 = round(durations[rank - 1] * 1000, 2)
        return WindowStats(self.window_s, len(durations), round(len(durations) / self.window_s, 3), p95, errors)


class GatewayMetrics:
    """Prometheus series on a registry of its own (one per app, so tests can build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "inferline_gateway_requests_total",
            "HTTP requests answered by the gateway.",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "inferline_gateway_request_duration_seconds",
            "Time from request to response, by route template.",
            ("route", "method"),
            buckets=BUCKETS_S,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "inferline_gateway_requests_in_flight", "Requests being handled now.", registry=self.registry
        )
        self.recent = RecentRequests()

    def observe(self, route: str, method: str, status: int, seconds: float, *, api_call: bool) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)
        if api_call:
            self.recent.add(seconds, status >= 400)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
