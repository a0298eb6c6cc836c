"""Models load and unload live, as with Triton's model control (docs/model-control.md).

Every model-control call goes through an unmodified ``tritonclient.grpc`` against an in-process
inference stage serving a temporary repository: ``yolov8n``, ``yolo-b`` (a second copy of it, the
model that is loaded, reloaded and unloaded) and ``broken`` (its weights file does not exist).
While a model changes, a background loop calls another one, and must see no failed call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml
from prometheus_client import REGISTRY
from tritonclient.utils import InferenceServerException

from inferline.common.api import DetectRequest
from inferline.common.detections import DetectOptions
from inferline.common.errors import ConfigError, WeightsError
from inferline.common.settings import Settings
from inferline.services.client import Client, image_inputs
from inferline.services.controller.plan import METADATA_TTL_S
from inferline.services.inference.models import ModelManager
from inferline.services.inference.repository import BUILTIN_REPOSITORY
from inferline.services.inference.servicer import build_service
from tests.support.servers import LoopThread, RunningServer, start_service, start_stage

IMAGE = np.zeros((1, 3, 64, 64), np.uint8)


def _write_model(repo: Path, name: str, **changes) -> Path:
    """A copy of yolov8n's config as model ``name`` (the same weights file), with ``changes``."""
    raw = yaml.safe_load((BUILTIN_REPOSITORY / "yolov8n" / "config.yaml").read_text())
    raw.update(name=name, **changes)
    folder = repo / name
    folder.mkdir(exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    return folder


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    shutil.copytree(BUILTIN_REPOSITORY / "yolov8n", root / "yolov8n")
    _write_model(root, "yolo-b")
    _write_model(root, "broken", weights={"file": "missing-weights.pt", "verify": "warn"})
    return root


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    running = LoopThread()
    yield running
    running.close()


@contextmanager
def _serving(loop: LoopThread, settings: Settings) -> Iterator[RunningServer]:
    server = start_service(loop, build_service, settings)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def explicit(loop, settings, repo) -> Iterator[RunningServer]:
    live = dataclasses.replace(
        settings, model_repository=repo, model_control_mode="explicit", load_models=("yolov8n", "broken")
    )
    with _serving(loop, live) as server:
        yield server


@pytest.fixture(scope="module")
def client(explicit) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(explicit.address) as running:
        yield running


def _infer(client: triton.InferenceServerClient, model: str) -> np.ndarray:
    tensor = triton.InferInput("images", list(IMAGE.shape), "UINT8")
    tensor.set_data_from_numpy(IMAGE)
    return client.infer(model, [tensor], client_timeout=60).as_numpy("output0")


@contextmanager
def _traffic(address: str, model: str = "yolov8n") -> Iterator[dict[str, list]]:
    """A loop of ModelInfer calls to ``model`` until the block ends: what succeeded and what failed."""
    seen: dict[str, list] = {"ok": [], "failed": []}
    stop = threading.Event()

    def run() -> None:
        with triton.InferenceServerClient(address) as own:
            while not stop.is_set():
                try:
                    _infer(own, model)
                    seen["ok"].append(time.monotonic())
                except InferenceServerException as exc:
                    seen["failed"].append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(60)
    assert not seen["failed"], f"calls to {model} failed while another model changed: {seen['failed'][:3]}"
    assert seen["ok"], f"no call to {model} ran during the change"


def _states(client: triton.InferenceServerClient) -> dict[str, tuple[str, str]]:
    return {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the repository did not reach the expected state in time"
        time.sleep(0.1)


def test_a_model_whose_weights_are_missing_is_unavailable_with_its_reason_while_the_others_serve(client):
    state, reason = _states(client)["broken"]
    assert state == "UNAVAILABLE" and "missing-weights.pt" in reason
    with pytest.raises(InferenceServerException) as raised:
        _infer(client, "broken")
    assert raised.value.status() == "StatusCode.UNAVAILABLE" and "missing-weights.pt" in raised.value.message()
    assert _infer(client, "yolov8n").shape[:2] == (1, 84)
    # Strict readiness, as Triton's default: a model meant to be served is not.
    assert not client.is_server_ready()
    assert client.is_model_ready("yolov8n")
    assert not client.is_model_ready("broken")  # as Triton: not ready, the reason in the index


def test_explicit_load_then_unload_under_traffic_to_another_model(client, explicit):
    assert _states(client)["yolo-b"] == ("UNAVAILABLE", "not loaded")
    with _traffic(explicit.address):
        client.load_model("yolo-b")
        assert _states(client)["yolo-b"][0] == "READY" and client.is_model_ready("yolo-b")
        assert _infer(client, "yolo-b").shape[:2] == (1, 84)
        assert REGISTRY.get_sample_value("inferline_queue_capacity", {"model": "yolo-b"}) == 256
        client.unload_model("yolo-b")
    assert _states(client)["yolo-b"] == ("UNAVAILABLE", "unloaded")
    assert not client.is_model_ready("yolo-b")
    # Its per-model gauges go with it (the stage's /metrics lists only the models it serves).
    assert REGISTRY.get_sample_value("inferline_queue_capacity", {"model": "yolo-b"}) is None
    assert REGISTRY.get_sample_value("inferline_queue_depth", {"model": "yolo-b"}) is None
    with pytest.raises(InferenceServerException) as raised:
        _infer(client, "yolo-b")
    assert raised.value.status() == "StatusCode.UNAVAILABLE" and "unloaded" in raised.value.message()


def test_a_reload_with_a_changed_config_swaps_without_a_failed_call(client, explicit, repo):
    client.load_model("yolo-b")
    changed = yaml.safe_load((repo / "yolo-b" / "config.yaml").read_text())
    changed["labels"] = [f"class-{i}" for i in range(80)]
    changed["dynamic_batching"] = {"max_queue_delay_ms": 2, "max_queue_size": 64}
    with _traffic(explicit.address), _traffic(explicit.address, "yolo-b"):
        client.load_model("yolo-b", config=json.dumps(changed))
        time.sleep(0.3)  # calls reach the new version too
    config = client.get_model_config("yolo-b").config
    assert json.loads(config.parameters["labels"].string_value)[:2] == ["class-0", "class-1"]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 64


def test_a_config_override_is_validated_with_a_message_naming_the_field(client):
    raw = yaml.safe_load((BUILTIN_REPOSITORY / "yolov8n" / "config.yaml").read_text())
    raw.update(name="yolo-b", max_batch_size=0)
    with pytest.raises(InferenceServerException) as raised:
        client.load_model("yolo-b", config=json.dumps(raw))
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT" and "max_batch_size" in raised.value.message()
    with pytest.raises(InferenceServerException) as raised:
        client.load_model("yolo-b", config="{not json")
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT" and "JSON" in raised.value.message()


def test_requests_in_flight_when_their_model_is_unloaded_complete(client, explicit, repo):
    slow = yaml.safe_load((repo / "yolo-b" / "config.yaml").read_text())
    # Items wait up to 2 s in the queue for company: the unload arrives while the model holds them.
    slow["dynamic_batching"] = {"max_queue_delay_ms": 2000, "max_queue_size": 64}
    slow["max_batch_size"] = 8
    slow.setdefault("parameters", {})["cpu_max_batch_size"] = 8  # else one image is a full batch on a CPU
    client.load_model("yolo-b", config=json.dumps(slow))
    results: list[object] = []

    def call() -> None:
        with triton.InferenceServerClient(explicit.address) as own:
            try:
                results.append(_infer(own, "yolo-b").shape)
            except InferenceServerException as exc:
                results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    batcher = explicit.app.service.domain.manager.get("yolo-b").batcher  # the stage's own, in this process
    _wait_for(lambda: batcher.depth == 3)
    client.unload_model("yolo-b")
    for thread in threads:
        thread.join(60)
    assert [r if isinstance(r, Exception) else r[:2] for r in results] == [(1, 84)] * 3


def test_model_statistics_count_what_was_sent(client):
    client.load_model("yolo-b")  # a (re)load starts the version's counters afresh, as in Triton
    for _ in range(3):
        _infer(client, "yolo-b")
    with pytest.raises(InferenceServerException):  # reaches the model, and fails there: an empty image
        empty = np.zeros((1, 3, 0, 64), np.uint8)
        tensor = triton.InferInput("images", list(empty.shape), "UINT8")
        tensor.set_data_from_numpy(empty)
        client.infer("yolo-b", [tensor], client_timeout=60)
    stats = client.get_inference_statistics("yolo-b").model_stats
    assert [(s.name, s.version) for s in stats] == [("yolo-b", "1")]
    s = stats[0]
    infer = s.inference_stats
    assert (infer.success.count, infer.fail.count) == (3, 1)
    assert s.inference_count == 3 and s.execution_count == 3 and s.last_inference > 0
    assert infer.queue.count == 3 and infer.compute_infer.count == 3 and infer.compute_infer.ns > 0
    assert infer.compute_input.count == 3 and infer.compute_output.count == 3
    assert [(b.batch_size, b.compute_infer.count) for b in s.batch_stats] == [(1, 3)]
    everything = {m.name for m in client.get_inference_statistics().model_stats}
    assert everything == {"yolov8n", "yolo-b"}


def test_poll_mode_follows_the_repository_folder_under_traffic(loop, settings, tmp_path):
    shutil.copytree(BUILTIN_REPOSITORY / "yolov8n", tmp_path / "yolov8n")
    live = dataclasses.replace(settings, model_repository=tmp_path, model_control_mode="poll", repository_poll_s=0.2)
    with _serving(loop, live) as server, triton.InferenceServerClient(server.address) as client:
        with _traffic(server.address):
            _write_model(tmp_path, "yolo-b")
            _wait_for(lambda: _states(client).get("yolo-b", ("",))[0] == "READY")
            assert _infer(client, "yolo-b").shape[:2] == (1, 84)

            _write_model(tmp_path, "yolo-b", labels=["only"] * 80)
            _wait_for(
                lambda: json.loads(client.get_model_config("yolo-b").config.parameters["labels"].string_value)[0]
                == "only"
            )
            # Load and unload calls are for the explicit mode, as in Triton.
            with pytest.raises(InferenceServerException) as raised:
                client.unload_model("yolo-b")
            assert raised.value.status() == "StatusCode.FAILED_PRECONDITION"

            shutil.rmtree(tmp_path / "yolo-b")
            _wait_for(lambda: "yolo-b" not in _states(client))
        with pytest.raises(InferenceServerException) as raised:
            _infer(client, "yolo-b")
        assert raised.value.status() == "StatusCode.NOT_FOUND"


def test_none_mode_refuses_load_and_unload(settings):
    manager = ModelManager(settings)
    for call in (manager.load("yolov8n"), manager.unload("yolov8n")):
        with pytest.raises(ConfigError, match="not allowed in model control mode 'none'"):
            asyncio.run(call)


def test_exit_on_error_makes_startup_fail(loop, settings, repo):
    live = dataclasses.replace(
        settings, model_repository=repo, model_control_mode="explicit", load_models=("broken",), exit_on_error=True
    )
    with pytest.raises(WeightsError, match="missing-weights.pt"):
        start_service(loop, build_service, live)
    tolerant = ModelManager(dataclasses.replace(live, exit_on_error=False))
    tolerant.load_all()
    assert [(s.name, s.state) for s in tolerant.index() if s.name == "broken"] == [("broken", "UNAVAILABLE")]


def test_an_unknown_mode_is_refused_by_name(settings):
    with pytest.raises(ConfigError, match="INFERLINE_MODEL_CONTROL_MODE='sometimes'"):
        ModelManager(dataclasses.replace(settings, model_control_mode="sometimes"))


def test_the_controller_follows_a_reload_and_an_unload_before_its_caches_expire(
    loop, stack, client, explicit, repo, sample_images
):
    """The controller's plans and its OIP pipelines follow the stage's RepositoryIndex at each
    readiness poll: an unloaded model leaves the controller's pipelines at once, not when their
    10 s caches expire. A reload of the same version changes nothing RepositoryIndex shows, so its
    new labels answer within the plan cache's 10 s (METADATA_TTL_S)."""
    base = yaml.safe_load((repo / "yolo-b" / "config.yaml").read_text())
    base["labels"] = [f"before-{i}" for i in range(80)]
    client.load_model("yolo-b", config=json.dumps(base))
    settings = dataclasses.replace(stack.settings, inference_target=explicit.address, readiness_poll_s=0.2)
    controller = start_stage(loop, "controller", settings)
    request = DetectRequest("yolo-b", tuple(image_inputs(sample_images[-1:])), options=DetectOptions(conf=0.01))

    def labels(api: Client) -> set[str]:
        return {d.label.split("-")[0] for d in api.detect(request).images[0].detections}

    def pipelines() -> set[str]:
        with triton.InferenceServerClient(controller.address) as oip:
            index = oip.get_model_repository_index(as_json=True)["models"]
            return {m["name"] for m in index}

    def within(seconds: float, check) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if check():
                return True
            time.sleep(0.1)
        return False

    try:
        with Client(controller.address, timeout=60) as api:
            assert labels(api) == {"before"} and "yolo-b" in pipelines()
            base["labels"] = [f"after-{i}" for i in range(80)]
            client.load_model("yolo-b", config=json.dumps(base))
            assert within(METADATA_TTL_S + 5.0, lambda: labels(api) == {"after"})
            assert "yolo-b" in pipelines()  # the pipeline list is fresh: its TTL cannot explain what follows
            client.unload_model("yolo-b")
            assert within(3.0, lambda: "yolo-b" not in pipelines())  # inside the 10 s caches
            assert "yolov8n" in pipelines()
    finally:
        controller.stop()
