"""Safe defaults, through real servers: weights are verified before they are unpickled, the
profiler is off by default and, when on, answers only on its own host while /metrics stays open,
and no public answer carries a server's file path."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from inferline.common.errors import WeightsError
from inferline.common.generated import controller_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc, inference_pb2
from inferline.common.model_info import ModelInfo
from inferline.common.server import ServerApp
from inferline.common.settings import Settings
from inferline.common.telemetry.profiler import PROFILER
from inferline.services.inference.repository import BUILTIN_REPOSITORY
from inferline.services.inference.servicer import build_service as build_inference
from inferline.services.inference.weights import sha256_of
from tests.support.gateway import RunningGateway
from tests.support.servers import InProcessStack, LoopThread, start_stage
from tests.support.standins import STANDIN_PINS

OFFICIAL_YOLO = "f59b3d833e2ff32e194b5bb8e08d211dc7c5bdf144b90d2c8412c47ccfc83b36"
CLI = [sys.executable, "-m", "inferline.services.cli"]


def _yolo_only(settings: Settings, **changes) -> Settings:
    return dataclasses.replace(settings, models=("yolov8n",), **changes)


# ---- weights integrity ----------------------------------------------------------------------


def test_a_checkpoint_that_is_not_the_official_release_is_refused_before_it_is_unpickled(settings, tmp_path):
    marker = tmp_path / "the pickle ran"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "code inside the weights file ran"))

    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "yolov8n.pt").write_bytes(pickle.dumps(Payload()))
    digest = sha256_of(folder / "yolov8n.pt")
    loop = LoopThread()
    try:
        # The stage starts; the refused model is UNAVAILABLE, its reason the refusal.
        stage = start_stage(loop, "inference", _yolo_only(settings, model_dir=(folder,), trusted_weights=()))
        try:
            with grpc.insecure_channel(stage.address) as channel:
                index = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
                    grpc_service_pb2.RepositoryIndexRequest()
                )
        finally:
            stage.stop()
    finally:
        loop.close()
    (entry,) = [m for m in index.models if m.name == "yolov8n"]
    assert entry.state == "UNAVAILABLE"
    message = entry.reason
    assert not marker.exists(), "the file was unpickled"
    assert str(folder / "yolov8n.pt") in message and digest in message and OFFICIAL_YOLO in message
    assert "put the official yolov8n.pt there" in message
    assert f"verify: sha256:{digest}" in message and f"INFERLINE_TRUSTED_WEIGHTS=sha256:{digest}" in message


def _model_info(channel: grpc.Channel) -> Any:
    """yolov8n's weights as the inference stage describes them (its ModelConfig), in the
    controller's public shape (``weights.sha256``, ``weights.official``)."""
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    config = stub.ModelConfig(grpc_service_pb2.ModelConfigRequest(name="yolov8n"), timeout=10).config
    return ModelInfo.from_config(config, "1").to_metadata()


def test_the_stand_in_weights_are_served_only_when_an_operator_pins_their_digest(settings, yolo_weights):
    # Triton's --exit-on-error: a model refused at start stops the stage.
    strict = _yolo_only(settings, trusted_weights=(), exit_on_error=True)
    loop = LoopThread()
    try:
        with pytest.raises(WeightsError, match=f"its sha256 is {sha256_of(yolo_weights)}"):
            start_stage(loop, "inference", strict)
        pinned = start_stage(loop, "inference",
                             _yolo_only(settings, trusted_weights=(f"sha256:{sha256_of(yolo_weights)}",)))
        try:
            with grpc.insecure_channel(pinned.address) as channel:
                meta = _model_info(channel)
            assert meta.weights.sha256 == sha256_of(yolo_weights) and meta.weights.official is False
        finally:
            pinned.stop()
    finally:
        loop.close()


def test_a_custom_model_config_serves_the_file_it_pins(settings, yolo_weights, tmp_path):
    repository = tmp_path / "repository"
    shutil.copytree(BUILTIN_REPOSITORY / "yolov8n", repository / "yolov8n")
    config = repository / "yolov8n" / "config.yaml"
    config.write_text(config.read_text().replace(
        f"sha256: {OFFICIAL_YOLO}", f"sha256: {OFFICIAL_YOLO}\n  verify: sha256:{sha256_of(yolo_weights)}"))
    loop = LoopThread()
    try:
        server = start_stage(loop, "inference", _yolo_only(settings, model_repository=repository, trusted_weights=()))
        try:
            with grpc.insecure_channel(server.address) as channel:
                meta = _model_info(channel)
            assert meta.weights.sha256 == sha256_of(yolo_weights)
        finally:
            server.stop()
    finally:
        loop.close()


# ---- the profiler ---------------------------------------------------------------------------


def _http(method: str, port: int, path: str, source: str = "127.0.0.1") -> tuple[int, bytes]:
    """One HTTP request to this host's metrics port from the loopback address ``source``: any
    127.0.0.0/8 address but 127.0.0.1 stands for a caller that is not on the stage's host (as
    a sidecar proxy that hands on remote callers presents them)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as conn:
        conn.sendall(f"{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n".encode())
        raw = b""
        while chunk := conn.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.fixture()
def inference_app(settings, request):
    """An inference stage as `inferline serve` binds it (settings.host, 0.0.0.0) with its metrics port."""
    own = _yolo_only(settings, **getattr(request, "param", {}))
    loop = LoopThread()
    app = ServerApp(build_inference(own), own, port=0, metrics_port=0)
    loop.run(app.start())
    yield app
    loop.run(app.stop(0.5))
    loop.close()


def test_profiling_is_off_by_default_and_arms_nothing(inference_app):
    assert Settings().profiling is False
    before = PROFILER._capture
    status, body = _http("POST", inference_app.metrics_port, "/debug/profile?batches=1&timeout=1")
    assert status == 404 and "INFERLINE_PROFILING=true" in json.loads(body)["error"]
    assert PROFILER._capture is before


@pytest.mark.parametrize("inference_app", [{"profiling": True}], indirect=True)
def test_when_on_the_profiler_answers_only_on_its_host_while_metrics_stay_open_to_all(inference_app):
    port = inference_app.metrics_port
    assert inference_app._metrics._server.server_address[0] == "0.0.0.0"
    before = PROFILER._capture
    status, body = _http("POST", port, "/debug/profile?batches=1&timeout=1", source="127.0.0.2")
    assert status == 403 and "answers only to 127.0.0.1" in json.loads(body)["error"]
    assert PROFILER._capture is before, "a refused caller armed the profiler"
    # The same route from this host reaches the profiler (bad parameters: refused with usage).
    status, body = _http("POST", port, "/debug/profile?batches=0", source="127.0.0.1")
    assert status == 400 and "batches must be between 1 and 1000" in json.loads(body)["error"]
    status, body = _http("GET", port, "/metrics", source="127.0.0.2")
    assert status == 200 and b"inferline_rpc_duration_seconds" in body


# ---- no server paths in public answers -----------------------------------------------------


@pytest.fixture(scope="module")
def yolo_stack(settings):
    stack = InProcessStack(_yolo_only(settings))
    gateway = RunningGateway(stack.settings, stack.controller)
    yield stack, gateway
    gateway.stop()
    stack.close()


def _no_folder(text: str, model_dir: Path) -> None:
    assert str(model_dir) not in text and "/yolov8n.pt" not in text, text


def test_list_models_and_model_info_name_the_weights_file_not_its_folder(yolo_stack, model_dir):
    stack, _ = yolo_stack
    with grpc.insecure_channel(stack.controller) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        listed = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10).models
        info = stub.ModelInfo(inference_pb2.ModelMetadataRequest(name="yolov8n"), timeout=10)
    with grpc.insecure_channel(stack.servers["inference"].address) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        direct = [stub.ModelConfig(grpc_service_pb2.ModelConfigRequest(name="yolov8n"), timeout=10).config]
    for meta in (*listed, info):
        assert meta.weights.path == "yolov8n.pt"
        _no_folder(str(meta), model_dir)
    for config in direct:
        assert config.parameters["weights_file"].string_value == "yolov8n.pt"
        _no_folder(str(config), model_dir)


def test_the_gateways_models_answer_names_no_server_folder(yolo_stack, model_dir):
    _, gateway = yolo_stack
    for path in ("/v1/models", "/v1/models/yolov8n"):
        reply = httpx.get(gateway.url + path, timeout=10)
        assert reply.status_code == 200
        _no_folder(reply.text, model_dir)
    assert httpx.get(gateway.url + "/v1/models", timeout=10).json()["models"][0]["weights"]["path"] == "yolov8n.pt"


@pytest.mark.parametrize("form", [[], ["--json"]])
def test_the_cli_models_command_names_no_server_folder(yolo_stack, model_dir, form):
    stack, _ = yolo_stack
    done = subprocess.run([*CLI, "models", "--target", stack.controller, *form], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "yolov8n.pt" in done.stdout
    _no_folder(done.stdout, model_dir)


def test_the_makefile_pins_exactly_the_stand_ins_the_tests_pin_and_they_are_the_shared_files(model_dir: Path):
    """The stand-in digests live in two places (the Makefile for `make demo|test|up`, the tests
    for in-process stacks): they must not drift apart, nor from the files they let through."""
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    block = makefile.split("STANDIN_WEIGHTS :=", 1)[1].split("\n\n", 1)[0].split("ifeq", 1)[0]
    assert set(re.findall(r"sha256:[0-9a-f]{64}", block)) == set(STANDIN_PINS)
    for name in ("yolov8n.pt", "yolov8n-seg.pt", "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth"):
        if (model_dir / name).is_file():
            assert f"sha256:{sha256_of(model_dir / name)}" in STANDIN_PINS, name
