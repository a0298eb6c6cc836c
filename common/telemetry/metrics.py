"""Prometheus metrics of every stage, and the HTTP endpoint that serves them.

Names follow Prometheus conventions (``inferline_`` prefix, base units, ``_seconds``,
``_total``). Labels are bounded: service and stage names, the gRPC method (a fixed set per
service), status code names, model names (``ModelLabels``: loaded or served ones, else "other"),
step names from the code. Nothing per request, image or client ever becomes a label.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# 1 ms .. 60 s: a cached tiny image is a few ms, a large CPU batch of Faster R-CNN tens of s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

OTHER_MODEL = "other"
MAX_MODEL_LABELS = 64


class ModelLabels:
    """The values the ``model`` label may take, so a caller cannot grow the series without bound.

    A caller can send any model name, and every new label value is a new series for the life of
    the process. A name becomes a label value once this process has loaded it (the inference
    stage's queues) or answered a call for it with OK; until then (an unknown model's NOT_FOUND)
    and past ``limit`` names the call counts under "other". Calls that name no model (health,
    ListModels) have an empty label, which Prometheus shows as no label.
    """

    def __init__(self, limit: int = MAX_MODEL_LABELS):
        self.limit = limit
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        with self._lock:
            if len(self._known) < self.limit:
                self._known.add(name)

    def label(self, name: str, served: bool) -> str:
        """``name`` if known (or now known: ``served`` says the call succeeded), else "other"."""
        if not name or name in self._known:
            return name
        if served:
            self.add(name)
            if name in self._known:
                return name
        return OTHER_MODEL


MODELS = ModelLabels()

RPC_SECONDS = Histogram(
    "inferline_rpc_duration_seconds",
    "Server-side duration of each RPC, by service, method, gRPC status code and model.",
    ["service", "method", "code", "model"],
    buckets=LATENCY_BUCKETS,
)
RPC_IN_FLIGHT = Gauge(
    "inferline_rpc_in_flight", "RPCs being handled right now.", ["service", "method"]
)
STAGE_CALL_SECONDS = Histogram(
    "inferline_stage_call_duration_seconds",
    "The controller's view of each call to a stage (network and queueing included).",
    ["stage", "method", "code", "model"],
    buckets=LATENCY_BUCKETS,
)
STEP_SECONDS = Histogram(
    "inferline_step_duration_seconds",
    "Inner steps of a stage (decode, letterbox, queue_wait, batch_run, nms, render), per item or batch.",
    ["service", "step"],
    buckets=STEP_BUCKETS,
)
BATCH_SIZE = Histogram(
    "inferline_batch_size", "Items per forward pass made by the dynamic batcher.", ["model"], buckets=BATCH_BUCKETS
)
QUEUE_WAIT_SECONDS = Histogram(
    "inferline_queue_wait_seconds",
    "Time an item waited in its model's batching queue before its forward pass began.",
    ["model"],
    buckets=STEP_BUCKETS,
)
QUEUE_DEPTH = Gauge("inferline_queue_depth", "Items waiting in the model's batching queue.", ["model"])
QUEUE_CAPACITY = Gauge(
    "inferline_queue_capacity", "The batching queue's limit (max_queue_size); full refuses calls.", ["model"]
)
MODEL_LOAD_SECONDS = Gauge("inferline_model_load_seconds", "How long loading the model took at start-up.", ["model"])
CPU_SECONDS = Counter(
    "inferline_cpu_seconds",
    "CPU seconds of the requests' work in each stage (steps and forward passes), by model.",
    ["model", "stage"],
)
GPU_SECONDS = Counter(
    "inferline_gpu_seconds",
    "GPU seconds of the requests in each stage (their share of the forward passes run on a GPU), by model.",
    ["model", "stage"],
)
COST = Counter(
    "inferline_cost",
    "Cost of the requests' CPU and GPU time in each stage at INFERLINE_COST_PER_CORE_HOUR and "
    "INFERLINE_COST_PER_GPU_HOUR (their currency), by model.",
    ["model", "stage"],
)
ITEM_ERRORS = Counter(
    "inferline_item_errors_total", "Items of a batch that failed on their own, by status code.", ["service", "code"]
)

# Admission and overload (docs/reliability-admission.md).
ADMISSION_LIMIT = Gauge(
    "inferline_admission_limit", "The controller's adaptive limit on images in flight, per model.", ["model"]
)
ADMISSION_IN_FLIGHT = Gauge(
    "inferline_admission_in_flight", "Images the controller has admitted and not yet answered, per model.", ["model"]
)
ADMISSION_WAITING = Gauge(
    "inferline_admission_waiting",
    "Requests waiting in the controller for room under the admission limit (up to INFERLINE_ADMISSION_WAIT_S), "
    "per model.",
    ["model"],
)
ADMISSION_REFUSED = Counter(
    "inferline_admission_refused_total",
    "Requests refused before any stage work, by why: over the concurrency limit, or not done before their deadline.",
    ["model", "reason"],
)
SHED_ITEMS = Counter(
    "inferline_shed_items_total",
    "Items the batcher settled without running: refused at submit (expected wait beyond their deadline), "
    "expired in the queue or their caller gone.",
    ["model", "reason"],
)
WASTED_ITEMS = Counter(
    "inferline_wasted_items_total",
    "Items the model ran whose caller had gone (cancelled, or past its deadline) by the time their results were ready.",
    ["model"],
)

# Issue 16 (docs/shared-memory.md): how preprocessed tensors crossed each hop.
TENSOR_TRANSPORT = Counter(
    "inferline_tensor_transport_total",
    "Preprocessed tensors handed from the preprocess stage (stage=preprocess) and to the inference stage "
    "(stage=inference), by transport: cuda (the tensor stayed in the controller's device memory), shm (in its "
    "shared memory: only an offset crossed) or inline (the bytes in the message).",
    ["stage", "transport"],
)
# Model busy and threads (issue 17, docs/monitoring.md): how much of the time the model's
# instances run a batch, and how many intra-op threads the last pass ran with.
MODEL_BUSY_SECONDS = Counter(
    "inferline_model_busy_seconds",
    "Seconds each instance of the model spent running batches (rate() it: 1.0 is an instance never idle).",
    # Not "instance": Prometheus gives every scraped series its target's "instance" label.
    ["model", "model_instance"],
)
MODEL_BUSY_RATIO = Gauge(
    "inferline_model_busy_ratio",
    "Fraction of the model's instance-time spent running batches over the last INFERLINE_MODEL_BUSY_WINDOW_S.",
    ["model"],
)
MODEL_INSTANCES_BUSY = Gauge("inferline_model_instances_busy", "Instances of the model running a batch now.", ["model"])
INTRA_OP_THREADS = Gauge(
    "inferline_intra_op_threads", "Intra-op threads the model's latest forward pass ran with.", ["model"]
)


def track_queue(model: str, depth: Callable[[], int], capacity: int) -> None:
    """Queue depth is read at scrape time, so the batcher's hot path does no metric work. A model
    with a queue is loaded here, so its name is a valid ``model`` label from now on."""
    MODELS.add(model)
    QUEUE_DEPTH.labels(model).set_function(depth)
    QUEUE_CAPACITY.labels(model).set(capacity)


class NvmlCollector(Collector):
    """GPU utilisation and memory from NVML, read at scrape time; nothing without a GPU."""

    def __init__(self, nvml: Any):
        self.nvml = nvml

    def collect(self) -> Iterator[GaugeMetricFamily]:
        util = GaugeMetricFamily(
            "inferline_gpu_utilization_ratio", "Share of the last sample period the GPU was busy (0-1).", labels=["gpu"]
        )
        used = GaugeMetricFamily("inferline_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        total = GaugeMetricFamily("inferline_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu"])
        nvml = self.nvml
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                util.add_metric([str(index)], rates.gpu / 100.0)
                used.add_metric([str(index)], float(memory.used))
                total.add_metric([str(index)], float(memory.total))
        except nvml.NVMLError as exc:
            log.warning("NVML read failed: %s", exc)
        yield from (util, used, total)


_gpu_registered = False


def register_gpu_metrics() -> bool:
    """Adds the NVML collector once per process when a driver and a GPU are there."""
    global _gpu_registered
    if _gpu_registered:
        return True
    try:
        import pynvml  # noqa: PLC0415 - nvidia-ml-py; optional

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() == 0:
            return False
    except Exception:  # noqa: BLE001 - no library, no driver or no GPU: no GPU metrics
        return False
    REGISTRY.register(NvmlCollector(pynvml))
    _gpu_registered = True
    return True


Route = Callable[[BaseHTTPRequestHandler], None]

# Exactly these, not all of 127.0.0.0/8: sidecar proxies hand on remote callers from other
# loopback addresses (Istio's inbound passthrough comes from 127.0.0.6).
LOOPBACK_PEERS = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


def loopback_only(route: Route) -> Route:
    """A debug route answered only to callers on this host, on a port that Prometheus scrapes
    from anywhere: others get 403 before the route runs (kubectl port-forward and ssh tunnels
    arrive from 127.0.0.1, so an operator still reaches it)."""

    def guarded(handler: BaseHTTPRequestHandler) -> None:
        peer = handler.client_address[0]
        if peer not in LOOPBACK_PEERS:
            log.warning("refused %s %s from %s: it answers only on this host", handler.command,
                        handler.path.split("?", 1)[0], peer)
            body = {
                "error": f"{handler.path.split('?', 1)[0]} answers only to 127.0.0.1 or ::1 on this host, not {peer}; "
                "use kubectl port-forward or an ssh tunnel"
            }
            reply(handler, 403, "application/json", json.dumps(body).encode())
            return
        route(handler)

    return guarded


class MetricsServer:
    """``/metrics`` (and extra routes such as the profiler's) on a daemon thread.

    A plain threading HTTP server: a scrape never waits on the gRPC event loop, so a stage whose
    loop is stuck still reports (and its in-flight and queue gauges show why).
    """

    def __init__(self, host: str, port: int, routes: dict[tuple[str, str], Route] | None = None):
        self.routes: dict[tuple[str, str], Route] = {("GET", "/metrics"): _serve_metrics, **(routes or {})}
        routes_ = self.routes

        class Handler(BaseHTTPRequestHandler):
            def _dispatch(self, verb: str) -> None:
                route = routes_.get((verb, self.path.split("?", 1)[0]))
                if route is None:
                    known = ", ".join(f"{v} {p}" for v, p in sorted(routes_))
                    reply(self, 404, "text/plain", f"no such endpoint; this server has: {known}\n".encode())
                    return
                route(self)

            def do_GET(self) -> None:
                self._dispatch("GET")

            def do_POST(self) -> None:
                self._dispatch("POST")

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("metrics http: " + fmt, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> int:
        self._thread.start()
        return self.port

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def reply(handler: BaseHTTPRequestHandler, status: int, content_type: str, body: bytes) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _serve_metrics(handler: BaseHTTPRequestHandler) -> None:
    reply(handler, 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))

