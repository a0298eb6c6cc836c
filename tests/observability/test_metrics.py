"""Each stage serves Prometheus metrics over HTTP, named by the conventions, with bounded labels.

Traffic goes through the in-process stack; the bootstrap's own /metrics endpoint (port 0) is
scraped, so the test reads exactly what Prometheus would.
"""

from __future__ import annotations

import logging
import socket
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inferline.common.errors import ConfigError
from inferline.common.generated import controller_pb2, controller_pb2_grpc, types_pb2
from inferline.common.logs import configure_logging
from inferline.common.server import ServerApp
from inferline.common.settings import Settings
from inferline.common.telemetry.metrics import register_gpu_metrics
from inferline.services.postprocess.servicer import build_service as build_postprocess
from tests.support.servers import LoopThread

# model_instance: bounded by the model's instance_count (inferline_model_busy_seconds_total);
# transport: shm or inline (inferline_tensor_transport_total).
ALLOWED_LABELS = {"service", "method", "code", "stage", "step", "model", "model_instance", "gpu", "le", "transport"}


@pytest.fixture(scope="module")
def metrics_app(settings):
    """The postprocess stage on the bootstrap with /metrics on a free port."""
    loop = LoopThread()
    app = ServerApp(build_postprocess(settings), settings, port=0, host="127.0.0.1", metrics_port=0)
    loop.run(app.start())
    yield app
    loop.run(app.stop(0.5))
    loop.close()


def scrape(app: ServerApp) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("inferline_")}


class Scrapes:
    """/metrics before and after the traffic: the registry is the process's, shared with every
    other test that ran here, so counts are compared as increases."""

    def __init__(self, before: dict, after: dict):
        self.before, self.after = before, after

    def increase(self, name: str, suffix: str = "", **labels: str) -> float:
        return value(self.after, name, suffix, **labels) - value(self.before, name, suffix, **labels)

    def now(self, name: str, suffix: str = "", **labels: str) -> float:
        return value(self.after, name, suffix, **labels)


@pytest.fixture(scope="module")
def scraped(stack, metrics_app, data_dir):
    """/metrics around good calls, a call for an unknown model and a batch with a broken image."""
    before = scrape(metrics_app)
    with grpc.insecure_channel(stack.controller) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        image = types_pb2.Image(name="shapes_01.jpg", data=(data_dir / "shapes_01.jpg").read_bytes())
        for _ in range(3):
            stub.Detect(controller_pb2.DetectRequest(model="yolov8n", images=[image]), timeout=120)
        with pytest.raises(grpc.RpcError):
            stub.Detect(controller_pb2.DetectRequest(model="no-such-model", images=[image]), timeout=60)
        broken = types_pb2.Image(name="broken.jpg", data=b"not an image")
        stub.Detect(controller_pb2.DetectRequest(model="yolov8n", images=[image, broken]), timeout=120)
    return Scrapes(before, scrape(metrics_app))


def value(families, name: str, suffix: str = "", **labels: str) -> float:
    family = families.get(name)
    if family is None:
        return 0.0
    return sum(
        s.value
        for s in family.samples
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_rpcs_are_counted_and_timed_by_service_method_and_status_code(scraped):
    assert scraped.increase("inferline_rpc_duration_seconds", "_count", service="controller", method="Detect",
                            code="OK") >= 4
    assert scraped.increase("inferline_rpc_duration_seconds", "_count", service="controller", method="Detect",
                            code="NOT_FOUND") == 1
    assert scraped.increase("inferline_rpc_duration_seconds", "_count", service="inference", method="ModelInfer",
                            code="OK") >= 4
    assert scraped.increase("inferline_rpc_duration_seconds", "_sum", service="preprocess", method="Preprocess",
                            code="OK") > 0


def test_request_metrics_carry_the_model_on_every_stage_and_an_unknown_name_counts_as_other(scraped):
    """Per-model SLOs need the model on the request metrics; the stages (whose requests name a
    recipe) get it from the controller. A name nobody serves must not become a series."""
    for service, method in [("controller", "Detect"), ("preprocess", "Preprocess"), ("inference", "ModelInfer"),
                            ("postprocess", "Postprocess")]:
        assert scraped.increase("inferline_rpc_duration_seconds", "_count", service=service, method=method,
                                code="OK", model="yolov8n") >= 4, service
    assert scraped.increase("inferline_rpc_duration_seconds", "_count", service="controller", method="Detect",
                            code="NOT_FOUND", model="other") == 1
    for stage in ("preprocess", "inference", "postprocess"):
        assert scraped.increase("inferline_stage_call_duration_seconds", "_count", stage=stage, code="OK",
                                model="yolov8n") >= 4, stage
    models = {s.labels.get("model") for f in scraped.after.values() for s in f.samples}
    assert "no-such-model" not in models


def test_each_stage_counts_the_cpu_seconds_of_its_work_by_model(scraped):
    """What a budget owner multiplies by a core-hour price: CPU of the steps and forward passes."""
    for stage in ("preprocess", "inference", "postprocess"):
        assert scraped.increase("inferline_cpu_seconds", "_total", stage=stage, model="yolov8n") > 0, stage


def test_the_controller_times_each_stage_call(scraped):
    for stage in ("preprocess", "inference", "postprocess"):
        assert scraped.increase("inferline_stage_call_duration_seconds", "_count", stage=stage, code="OK") >= 4


def test_inner_steps_batching_and_queueing_are_measured(scraped):
    for service, step in [("preprocess", "decode"), ("preprocess", "letterbox"), ("inference", "batch_run"),
                          ("postprocess", "nms")]:
        assert scraped.increase("inferline_step_duration_seconds", "_count", service=service, step=step) >= 4, step
    assert scraped.increase("inferline_batch_size", "_count", model="yolov8n") >= 4
    assert scraped.increase("inferline_queue_wait_seconds", "_count", model="yolov8n") >= 4
    assert scraped.now("inferline_queue_depth", model="yolov8n") == 0
    assert scraped.now("inferline_queue_capacity", model="yolov8n") > 0
    assert scraped.now("inferline_rpc_in_flight", service="controller", method="Detect") == 0


def test_model_load_time_and_item_errors_are_reported(scraped):
    assert scraped.now("inferline_model_load_seconds", model="yolov8n") > 0
    assert scraped.increase("inferline_item_errors", "_total", service="preprocess", code="INVALID_ARGUMENT") >= 1


def test_names_follow_prometheus_conventions_and_labels_are_bounded(scraped):
    assert scraped.after
    for name, family in scraped.after.items():
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), name
        if family.type == "histogram" and name != "inferline_batch_size":
            assert name.endswith("_seconds"), f"{name}: durations are in seconds"
        labels = {label for s in family.samples for label in s.labels}
        assert labels <= ALLOWED_LABELS, f"{name} has unbounded labels {labels - ALLOWED_LABELS}"


def test_unknown_path_on_the_metrics_port_is_404_naming_the_endpoints(metrics_app):
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_app.metrics_port}/metric", timeout=10)
    assert missing.value.code == 404 and "GET /metrics" in missing.value.read().decode()


def test_a_taken_metrics_port_is_logged_and_the_stage_still_serves(settings, caplog):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    loop = LoopThread()
    app = ServerApp(build_postprocess(settings), settings, port=0, host="127.0.0.1",
                    metrics_port=taken.getsockname()[1])
    try:
        with caplog.at_level(logging.ERROR):
            assert loop.run(app.start()) > 0
        assert any("cannot serve metrics" in r.getMessage() and "INFERLINE_POSTPROCESS_METRICS_PORT" in r.getMessage()
                   for r in caplog.records)
    finally:
        loop.run(app.stop(0.5))
        loop.close()
        taken.close()


def test_metrics_ports_come_from_settings_and_can_be_turned_off():
    defaults = Settings()
    assert [defaults.metrics_port(s) for s in ("controller", "preprocess", "inference", "postprocess")] == [
        9101,
        9102,
        9103,
        9104,
    ]
    assert Settings.from_env({"INFERLINE_INFERENCE_METRICS_PORT": "0"}).metrics_port("inference") == 0
    assert Settings.from_env({"INFERLINE_INFERENCE_METRICS_PORT": "-1"}).metrics_port("inference") is None
    assert Settings.from_env({"INFERLINE_METRICS": "false"}).metrics_port("controller") is None


def test_a_non_numeric_metrics_port_is_refused_with_the_variable_named():
    with pytest.raises(ConfigError, match="INFERLINE_CONTROLLER_METRICS_PORT='ninety'"):
        Settings.from_env({"INFERLINE_CONTROLLER_METRICS_PORT": "ninety"})


def test_an_unknown_log_format_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="INFERLINE_LOG_FORMAT='xml' is not one of json, text"):
        configure_logging("INFO", "test", "xml")


def test_the_inference_stage_reports_gpu_metrics_exactly_when_nvml_sees_a_gpu(inference):
    app, _ = inference
    with urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    assert ("inferline_gpu_utilization_ratio" in text) is register_gpu_metrics()
    assert ("inferline_gpu_memory_total_bytes" in text) is register_gpu_metrics()
