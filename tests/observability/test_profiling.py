"""Profiling: the per-request stage breakdown (``x-inferline-profile``) and PyTorch profiler
traces of the inference stage for N batches (``POST /debug/profile`` on its metrics port)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from inferline.common import oip
from inferline.common.generated import (
    controller_pb2,
    controller_pb2_grpc,
    grpc_service_pb2,
    grpc_service_pb2_grpc,
    types_pb2,
)
from tests.support.servers import InProcessStack

BREAKDOWN = {"preprocess.decode", "preprocess.letterbox", "preprocess.server", "inference.queue_wait",
             "inference.batch_run", "inference.server", "postprocess.nms", "postprocess.server"}


def _detect(stack, data_dir, metadata=()):
    with grpc.insecure_channel(stack.controller) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        images = [types_pb2.Image(name=n, data=(data_dir / n).read_bytes()) for n in ("shapes_01.jpg", "shapes_02.jpg")]
        return stub.Detect(controller_pb2.DetectRequest(model="yolov8n", images=images), metadata=metadata, timeout=120)


def test_profile_flag_adds_the_per_step_breakdown_of_every_stage_to_timings(stack, data_dir):
    timings = dict(_detect(stack, data_dir, [("x-inferline-profile", "1")]).timings_ms)
    assert BREAKDOWN <= set(timings), sorted(timings)
    assert all(timings[key] > 0 for key in BREAKDOWN)
    # The controller's own wall times stay, and a stage's server time fits inside its call.
    for stage in ("preprocess", "inference", "postprocess"):
        assert timings[f"{stage}.server"] <= timings[stage] + 0.5
    # A step's time is summed over the request's items (as decode is): on a CPU each of the two
    # images runs its own pass (yolov8n's cpu_max_batch_size: 1), and the model's two instances
    # may run them side by side, so their sum fits in two instances' worth of the server time.
    assert timings["inference.batch_run"] <= 2 * timings["inference.server"] + 0.5


def test_profile_flag_adds_the_cpu_time_each_stage_spent_on_the_request(stack, data_dir):
    """``<stage>.cpu``: CPU ms of the request's steps and its share of the forward passes."""
    timings = dict(_detect(stack, data_dir, [("x-inferline-profile", "1")]).timings_ms)
    for stage in ("preprocess", "inference", "postprocess"):
        assert timings[f"{stage}.cpu"] > 0, sorted(timings)
    # One thread's CPU cannot exceed its wall time; the preprocess steps each run on one thread.
    assert timings["preprocess.cpu"] <= timings["preprocess.decode"] + timings["preprocess.letterbox"] + 0.5


@pytest.mark.parametrize("flag", [None, "0", "false"])
def test_without_the_profile_flag_timings_keep_their_plain_shape(stack, data_dir, flag):
    metadata = [] if flag is None else [("x-inferline-profile", flag)]
    timings = _detect(stack, data_dir, metadata).timings_ms
    assert set(timings) == {"preprocess", "inference", "postprocess", "total"}


def _post(app, query: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{app.metrics_port}/debug/profile?{query}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:  # noqa: S310 - a local http URL
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _infer(app, count: int) -> None:
    with grpc.insecure_channel(app.address) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        pixels = np.random.default_rng(0).integers(0, 256, (1, 3, 320, 320), dtype=np.uint8)
        tensor, data = oip.input_tensor("images", pixels)
        for _ in range(count):
            request = grpc_service_pb2.ModelInferRequest(model_name="yolov8n", inputs=[tensor])
            request.raw_input_contents.append(data)
            stub.ModelInfer(request, timeout=60)


def test_profiler_captures_a_chrome_trace_of_exactly_the_next_n_batches(inference):
    app, profiles = inference
    answer: dict = {}
    capture = threading.Thread(
        target=lambda: answer.update(zip(("status", "body"), _post(app, "batches=2&timeout=60"), strict=True))
    )
    capture.start()
    # Keep sending until the capture is done: the route may arm after the first call.
    while capture.is_alive():
        _infer(app, 1)
        capture.join(0.2)
    assert answer["status"] == 200, answer
    body = answer["body"]
    assert (body["model"], body["batches"]) == ("yolov8n", 2)
    trace = json.loads(open(body["trace"]).read())
    assert body["trace"].startswith(str(profiles))
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any(name.startswith("aten::conv") for name in names), "the trace holds the model's convolutions"


@pytest.mark.parametrize(
    "query, message",
    [("batches=0", "batches must be between 1 and 1000"), ("batches=many", "invalid literal"),
     ("batches=1&timeout=soon", "could not convert")],
)
def test_profiler_refuses_bad_parameters_with_usage(inference, query, message):
    app, _ = inference
    status, body = _post(app, query)
    assert status == 400 and message in body["error"] and "POST /debug/profile?batches=N" in body["usage"]


def test_profiler_without_traffic_times_out_with_advice_and_can_be_armed_again(inference):
    app, _ = inference
    status, body = _post(app, "batches=1&timeout=0.3")
    assert status == 504 and "send traffic while profiling" in body["error"] and body["batches_seen"] == 0
    answer: dict = {}
    capture = threading.Thread(
        target=lambda: answer.update(zip(("status", "body"), _post(app, "batches=1&timeout=60"), strict=True))
    )
    capture.start()
    while capture.is_alive():
        _infer(app, 1)
        capture.join(0.2)
    assert answer["status"] == 200, answer


CLI = [sys.executable, "-m", "inferline.services.cli"]


def test_profile_command_prints_the_trace_file(inference):
    app, profiles = inference
    command = subprocess.Popen([*CLI, "profile", "--batches", "1", "--metrics", f"127.0.0.1:{app.metrics_port}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while command.poll() is None:
        _infer(app, 1)
        time.sleep(0.2)
    out, err = command.communicate()
    assert command.returncode == 0, err
    assert json.loads(out)["trace"].startswith(str(profiles))


def test_profile_command_names_the_address_it_could_not_reach():
    done = subprocess.run([*CLI, "profile", "--metrics", "127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "cannot reach the inference stage's metrics port at 127.0.0.1:1" in done.stderr


def test_profile_command_passes_on_the_stages_refusal(inference):
    app, _ = inference
    done = subprocess.run([*CLI, "profile", "--batches", "0", "--metrics", f"127.0.0.1:{app.metrics_port}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "batches must be between 1 and 1000" in done.stderr




@pytest.mark.slow
def test_the_device_preprocess_path_reports_its_batched_decode_and_letterbox(settings, data_dir):
    stack = InProcessStack(dataclasses.replace(settings, preprocess_device="torch-cpu", models=("yolov8n",)))
    try:
        timings = dict(_detect(stack, data_dir, [("x-inferline-profile", "1")]).timings_ms)
    finally:
        stack.close()
    assert timings["preprocess.decode_letterbox"] > 0
    assert "preprocess.letterbox" not in timings, "the JPEGs took the device path, not OpenCV's"


@pytest.mark.slow
def test_with_a_core_hour_price_each_stage_reports_and_counts_the_cost_of_its_cpu(settings, data_dir):
    """INFERLINE_COST_PER_CORE_HOUR=3600 makes one CPU second cost 1: ``<stage>.cost`` equals the
    stage's CPU seconds, and ``inferline_cost_total`` grows by the same."""
    before = {s: _cost(s) for s in ("preprocess", "inference", "postprocess")}
    stack = InProcessStack(dataclasses.replace(settings, cost_per_core_hour=3600.0, models=("yolov8n",)))
    try:
        timings = dict(_detect(stack, data_dir, [("x-inferline-profile", "1")]).timings_ms)
    finally:
        stack.close()
    for stage in ("preprocess", "inference", "postprocess"):
        assert timings[f"{stage}.cost"] == pytest.approx(timings[f"{stage}.cpu"] / 1000, abs=1e-3), stage
        assert _cost(stage) - before[stage] == pytest.approx(timings[f"{stage}.cost"], abs=1e-3), stage


@pytest.mark.slow
def test_a_model_on_a_gpu_reports_its_gpu_seconds_and_their_cost(settings, data_dir, monkeypatch):
    """The inference stage of a model whose passes run on a GPU (declared here: no GPU on this
    machine) reports ``inference.gpu`` (ms) and prices it at INFERLINE_COST_PER_GPU_HOUR."""
    monkeypatch.setattr("inferline.services.inference.models.runs_on_gpu", lambda backend: True)
    before = REGISTRY.get_sample_value("inferline_gpu_seconds_total", {"model": "yolov8n", "stage": "inference"}) or 0
    stack = InProcessStack(dataclasses.replace(settings, cost_per_gpu_hour=3600.0, models=("yolov8n",)))
    try:
        timings = dict(_detect(stack, data_dir, [("x-inferline-profile", "1")]).timings_ms)
    finally:
        stack.close()
    assert timings["inference.gpu"] > 0
    assert timings["inference.cost"] == pytest.approx(timings["inference.gpu"] / 1000, abs=1e-3)
    after = REGISTRY.get_sample_value("inferline_gpu_seconds_total", {"model": "yolov8n", "stage": "inference"})
    assert after - before == pytest.approx(timings["inference.gpu"] / 1000, abs=1e-3)
    assert "preprocess.gpu" not in timings and "preprocess.cost" not in timings  # no CPU price was set


def test_without_a_price_no_cost_is_reported(stack, data_dir):
    timings = dict(_detect(stack, data_dir, [("x-inferline-profile", "1")]).timings_ms)
    assert not [key for key in timings if key.endswith(".cost")]


def _cost(stage: str) -> float:
    return REGISTRY.get_sample_value("inferline_cost_total", {"model": "yolov8n", "stage": stage}) or 0.0
