"""The one server bootstrap every stage uses.

A stage hands over a ``Service``: a function that registers its servicers, and optional async
``load``/``close`` hooks. The bootstrap owns everything else: the grpc.aio server and its
message limits, the error-mapping interceptor, the standard health service (NOT_SERVING until
``load`` finished), server reflection, signal handling and graceful shutdown.

Health names: each registered service name is SERVING from the end of ``load`` until the drain
starts (the replica takes calls: what a client's load balancer checks). The overall name ``""``
(what Kubernetes and ``inferline up`` probe) follows the same, unless the service has a
``readiness`` hook: then the hook reports it, with any further names of its own (the
controller's ``model/<name>``), for as long as the stage runs.

Shutdown on SIGTERM, in this order, so a stopping stage never refuses work its callers already
sent: every health name NOT_SERVING (callers' channels stop picking this replica), keep accepting
for ``drain_delay_s`` (the time callers, or Kubernetes endpoints, need to notice), stop with
``grace_period_s`` for the calls in flight (calls arriving now are refused with UNAVAILABLE and
the callers' retry policy sends them elsewhere or waits for the restart), then ``close``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter

from inferline.common.channels import channel_options
from inferline.common.errors import ConfigError
from inferline.common.memory import bound_memory
from inferline.common.settings import STAGES, Settings
from inferline.common.status import ErrorMappingInterceptor
from inferline.common.telemetry.interceptors import TelemetryServerInterceptor
from inferline.common.telemetry.metrics import MetricsServer, Route, register_gpu_metrics
from inferline.common.telemetry.tracing import configure_tracing
from inferline.common.tls import server_credentials

log = logging.getLogger(__name__)

# Registers the stage's servicers on the server and returns their full service names.
Register = Callable[[grpc.aio.Server], Sequence[str]]
Hook = Callable[[], Awaitable[None]]
# Sets health names to SERVING (True) or NOT_SERVING (False); "" is the whole stage.
ReportHealth = Callable[[Mapping[str, bool]], Awaitable[None]]
# Runs for the life of the stage after ``load``, reporting its readiness as it changes.
Readiness = Callable[[ReportHealth], Coroutine[Any, Any, None]]


@dataclass
class Service:
    name: str
    register: Register
    load: Hook | None = None
    close: Hook | None = None
    # The servicer object itself, so the controller's --inprocess mode can call the same stage
    # code without a server (services/controller/inprocess.py).
    servicer: object | None = None
    # The stage's domain service (``services/<stage>/service.py``: numpy arrays and domain values
    # in and out, no protos), for callers in this process that skip the transport altogether.
    domain: object | None = None
    # Extra HTTP endpoints beside /metrics (the inference stage's profiler).
    routes: dict[tuple[str, str], Route] = field(default_factory=dict)
    # NVML GPU metrics on this stage's /metrics (the inference stage: the one that uses the GPU).
    gpu_metrics: bool = False
    # Readiness that depends on more than this process (the controller's stages), if any.
    readiness: Readiness | None = None
    # Added to the process's niceness before it loads anything (the inference stage's
    # ``inference_nice``): the threads made later, the model's included, inherit it.
    nice: int = 0


RETRIED_CALLS = Counter(
    "inferline_retried_calls_total",
    "Calls this service received that are a caller's gRPC retry (a restart, drain or lost replica "
    "cost latency here instead of an error).",
    ["service"],
)


class RetryCounter(grpc.aio.ServerInterceptor):
    """Counts retries from the header gRPC's retry policy puts on every attempt after the first
    (the caller's side sees no trace of them)."""

    def __init__(self, service: str):
        self.retried = RETRIED_CALLS.labels(service)

    async def intercept_service(self, continuation, handler_call_details):
        if any(key == "grpc-previous-rpc-attempts" for key, _ in handler_call_details.invocation_metadata or ()):
            self.retried.inc()
        return await continuation(handler_call_details)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """The server's connection policy (issue 18, docs/deployment.md "Load balancing").

    ``max_connection_age``: each client connection is closed (GOAWAY, then ``grace`` for the
    calls in flight) after about ``max_connection_age_s``, so clients re-resolve the target and
    replicas added since get their share; without it a long-lived channel stays on the pods that
    existed when it connected. New calls move to a new connection at once; the grace is long so
    that a stream (ModelStreamInfer) is not cut short. Keepalive: the server accepts the clients' pings at the rate they
    send them (common/channels.py) instead of answering them with GOAWAY "too_many_pings", and
    pings idle clients itself to drop connections whose peer vanished.
    """
    keepalive_ms = int(settings.keepalive_time_s * 1000)
    age: list[tuple[str, int]] = []
    if settings.max_connection_age_s > 0:
        age = [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000)),
        ]
    return [
        *channel_options(settings),
        ("grpc.so_reuseport", 0),
        *age,
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", int(settings.keepalive_permit_without_calls)),
        # Half the clients' interval: a ping that arrives a little early is no strike.
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive_ms // 2),
        ("grpc.http2.max_ping_strikes", 2),
    ]


class ServerApp:
    """One running stage. ``start`` returns the bound port, so tests can bind port 0.

    ``metrics_port`` None serves no /metrics (in-process test stacks share one registry);
    0 picks a free port, read back from ``metrics_port`` after ``start``. ``interceptors`` run
    after the bootstrap's own (a test's call counter, a deployment's auth check).
    """

    def __init__(
        self, service: Service, settings: Settings, *, port: int, host: str | None = None,
        metrics_port: int | None = None, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
    ):
        self.service = service
        self.interceptors = tuple(interceptors)
        self.metrics_port = metrics_port
        self._metrics: MetricsServer | None = None
        self.settings = settings
        self.requested_port = port
        self.host = settings.host if host is None else host
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._service_names: list[str] = []
        self._stopped = False
        self._readiness: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    async def start(self) -> int:
        server = grpc.aio.server(
            interceptors=[
                RetryCounter(self.service.name),
                TelemetryServerInterceptor(
                    self.service.name, self.settings.cost_per_core_hour, self.settings.cost_per_gpu_hour
                ),
                ErrorMappingInterceptor(),
                *self.interceptors
            ],
            options=server_options(self.settings),
        )
        self._service_names = list(self.service.register(server))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            credentials = server_credentials(self.settings)
            address = f"{self.host}:{self.requested_port}"
            if credentials is not None:
                self.port = server.add_secure_port(address, credentials)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigError(
                f"{self.service.name}: cannot listen on {self.host}:{self.requested_port} ({exc}); "
                "is another process using the port?"
            ) from None
        await server.start()
        self._server = server
        log.info("%s listening on %s:%d", self.service.name, self.host, self.port)
        self._start_metrics()
        if self.service.load is not None:
            try:
                await self.service.load()
            except BaseException:
                await server.stop(0)
                raise
        if self.service.readiness is None:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            log.info("%s is serving", self.service.name)
        else:
            for name in self._service_names:
                await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
            self._readiness = asyncio.create_task(self.service.readiness(self._report))
            log.info("%s takes calls; it reports SERVING once what it needs is ready", self.service.name)
        return self.port

    async def stop(self, grace: float | None = None, drain_delay: float = 0.0) -> None:
        """Health to NOT_SERVING, keep accepting for ``drain_delay`` s, drain in-flight calls for
        up to ``grace`` s, then release (the order in the module docstring)."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.grace_period_s if grace is None else grace
        await self._health.enter_graceful_shutdown()
        if self._readiness is not None:
            self._readiness.cancel()
            await asyncio.gather(self._readiness, return_exceptions=True)
        if self._server is not None and drain_delay > 0:
            log.info("%s is NOT_SERVING; still accepting calls for %.1f s", self.service.name, drain_delay)
            await asyncio.sleep(drain_delay)
        if self._server is not None:
            log.info("%s draining (grace %.1f s)", self.service.name, grace)
            await self._server.stop(grace)
        if self.service.close is not None:
            await self.service.close()
        if self._metrics is not None:
            self._metrics.stop()
        log.info("%s stopped", self.service.name)

    def _start_metrics(self) -> None:
        """A taken metrics port is logged, not fatal: the stage keeps serving requests, and
        Prometheus shows its target down (InferlineStageDown names it)."""
        if self.metrics_port is None:
            return
        try:
            self._metrics = MetricsServer(self.host, self.metrics_port, self.service.routes)
        except OSError as exc:
            log.error(
                "%s: cannot serve metrics on %s:%d (%s); set INFERLINE_%s_METRICS_PORT to a free port",
                self.service.name, self.host, self.metrics_port, exc, self.service.name.upper(),
            )
            return
        self.metrics_port = self._metrics.start()
        gpu = self.service.gpu_metrics and register_gpu_metrics()
        log.info("%s metrics on http://%s:%d/metrics%s", self.service.name, self.host, self.metrics_port,
                 " (with NVML GPU metrics)" if gpu else "")

    async def _set_health(self, status: int) -> None:
        for name in ("", *self._service_names):
            await self._health.set(name, status)

    async def _report(self, names: Mapping[str, bool]) -> None:
        """The readiness hook's report; the health servicer ignores it once the drain began."""
        for name, serving in names.items():
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            await self._health.set(name, status)


def lower_priority(service: Service) -> None:
    """Applies ``service.nice`` to this process, before its models and thread pools exist."""
    if service.nice > 0:
        os.nice(service.nice)
        log.info("%s runs at niceness %d", service.name, os.getpriority(os.PRIO_PROCESS, 0))


async def serve(service: Service, settings: Settings, *, port: int) -> None:
    """Run one stage until SIGTERM or SIGINT, then shut it down gracefully.

    Process-wide telemetry starts here: the OTLP tracer provider (from ``OTEL_*``) and /metrics.
    """
    flush_traces = configure_tracing(service.name, os.environ)
    # Allocator limits and the idle heap trimmer (common/memory.py). The trimmer stops before the
    # shutdown: a stage is quiet while it drains, and a trim's gc.collect() on the trimmer's
    # thread while the main thread tears gRPC down can finalise gRPC objects there and abort the
    # process ("terminate called without an active exception").
    lower_priority(service)
    trimmer = bound_memory(settings)
    try:
        metrics_port = settings.metrics_port(service.name) if service.name in STAGES else None
        app = ServerApp(service, settings, port=port, metrics_port=metrics_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        starting = asyncio.create_task(app.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a failed start (bad port, missing weights) ends the process here
            await stopping
        else:
            starting.cancel()
    finally:
        if trimmer is not None:
            trimmer.stop()
    try:
        await app.stop(drain_delay=settings.drain_delay_s if starting.done() else 0.0)
    finally:
        if flush_traces is not None:
            flush_traces(settings.grace_period_s)
