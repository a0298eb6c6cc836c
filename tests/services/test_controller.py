"""The controller (public API) over real in-process stages: happy path and every error path."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import grpc
import numpy as np
import pytest

from inferline.common.generated import (
    controller_pb2,
    controller_pb2_grpc,
    grpc_service_pb2,
    grpc_service_pb2_grpc,
    inference_pb2,
    types_pb2,
)
from inferline.common.server import Service
from tests.support.images import encoded
from tests.support.servers import LoopThread, start_service, start_stage

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def stub(stack):
    with grpc.insecure_channel(stack.controller) as channel:
        yield controller_pb2_grpc.ControllerServiceStub(channel)


def _detect(*images: bytes, model: str = "yolov8n", **fields) -> controller_pb2.DetectRequest:
    return controller_pb2.DetectRequest(
        model=model, images=[types_pb2.Image(data=d, name=f"img{i}") for i, d in enumerate(images)], **fields
    )


def test_detect_returns_detections_sizes_and_stage_timings(stub, data_dir):
    response = stub.Detect(_detect((data_dir / "shapes_01.jpg").read_bytes()), timeout=60)
    (result,) = response.results
    assert (response.model, response.model_version) == ("yolov8n", "1")
    assert result.status.code == 0 and (result.width, result.height) == (640, 480)
    assert result.detections and all(0 < d.score <= 1 for d in result.detections)
    assert all(0 <= d.box.x1 < d.box.x2 <= 640 and 0 <= d.box.y1 < d.box.y2 <= 480 for d in result.detections)
    assert {"preprocess", "inference", "postprocess", "total"} <= set(response.timings_ms)


def test_results_come_back_in_request_order(stub, data_dir):
    images = [(data_dir / f"shapes_0{i}.jpg").read_bytes() for i in (1, 2, 3)]
    together = stub.Detect(_detect(*images), timeout=60).results
    for data, result in zip(images, together, strict=True):
        alone = stub.Detect(_detect(data), timeout=60).results[0]
        assert [d.label for d in result.detections] == [d.label for d in alone.detections]


def test_one_bad_image_fails_only_its_own_result(stub, data_dir):
    good = (data_dir / "shapes_01.jpg").read_bytes()
    response = stub.Detect(_detect(good, b"\x89PNG broken", good), timeout=60)
    first, bad, last = response.results
    assert bad.status.code == INVALID.value[0] and "not a decodable image" in bad.status.message
    assert not bad.detections
    assert first.status.code == 0 and last.status.code == 0
    assert [d.label for d in first.detections] == [d.label for d in last.detections] != []


def test_png_rendering_is_the_annotated_original(stub, data_dir):
    response = stub.Detect(_detect((data_dir / "shapes_02.jpg").read_bytes(), render=[types_pb2.RENDER_FORMAT_PNG]),
                           timeout=60)
    (rendering,) = response.results[0].renderings
    assert rendering.content_type == "image/png"
    image = cv2.imdecode(np.frombuffer(rendering.content, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape[:2] == (response.results[0].height, response.results[0].width)


def test_thresholds_apply_per_request(stub, data_dir):
    data = (data_dir / "shapes_01.jpg").read_bytes()
    default = stub.Detect(_detect(data), timeout=60).results[0].detections
    one = stub.Detect(_detect(data, options=types_pb2.DetectOptions(max_det=1)), timeout=60).results[0].detections
    strict = stub.Detect(_detect(data, options=types_pb2.DetectOptions(conf=0.99)), timeout=60).results[0].detections
    assert len(one) == 1 and one[0].score == pytest.approx(default[0].score)
    assert len(strict) < len(default)


def test_list_models_shows_the_served_models(stub):
    models = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10).models
    assert ("yolov8n", "detect") in [(m.name, m.task) for m in models]


def test_unknown_model_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as raised:
        stub.Detect(_detect(encoded(), model="yolov99"), timeout=30)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    assert "yolov99" in raised.value.details() and "yolov8n" in raised.value.details()


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (_detect(encoded(), model=""), "model is required"),
        (_detect(), "no images"),
        (_detect(encoded(), options=types_pb2.DetectOptions(conf=2.0)), "conf must be between 0 and 1"),
        (_detect(encoded(), render=[types_pb2.RENDER_FORMAT_UNSPECIFIED]), "render format"),
        (_detect(*[encoded(8, 8)] * 65), "over the limit of 64"),
    ],
)
def test_bad_requests_are_invalid_argument_with_an_actionable_message(stub, request_, message):
    with pytest.raises(grpc.RpcError) as raised:
        stub.Detect(request_, timeout=30)
    assert raised.value.code() is INVALID and message in raised.value.details()


def test_an_expired_deadline_is_deadline_exceeded(stub, data_dir):
    with pytest.raises(grpc.RpcError) as raised:
        stub.Detect(_detect((data_dir / "shapes_01.jpg").read_bytes()), timeout=0.001)
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_concurrent_requests_mixing_good_and_bad_all_get_their_own_answers(stub, data_dir):
    good = (data_dir / "shapes_03.jpg").read_bytes()
    expected = [d.label for d in stub.Detect(_detect(good), timeout=60).results[0].detections]

    def call(i: int):
        if i % 3 == 0:
            return stub.Detect(_detect(b"garbage"), timeout=60).results[0].status.code
        return [d.label for d in stub.Detect(_detect(good), timeout=60).results[0].detections]

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(call, range(12)))
    for i, outcome in enumerate(outcomes):
        assert outcome == (INVALID.value[0] if i % 3 == 0 else expected)


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stage_that_is_down_makes_detect_unavailable_and_the_controller_stays_up(stack):
    broken = dataclasses.replace(stack.settings, preprocess_target=f"127.0.0.1:{_unused_port()}")
    loop = LoopThread()
    controller = start_stage(loop, "controller", broken)
    try:
        with grpc.insecure_channel(controller.address) as channel:
            stub = controller_pb2_grpc.ControllerServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.Detect(_detect(encoded()), timeout=10)
            assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "preprocess stage at 127.0.0.1:" in raised.value.details()
            assert stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10).models, "still serving"
    finally:
        controller.stop()
        loop.close()


class _SlowInference(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """An OIP server with the real stage's model description that takes long to infer, and
    records the deadline it was given."""

    def __init__(self, metadata: grpc_service_pb2.ModelMetadataResponse, config: grpc_service_pb2.ModelConfigResponse):
        self.metadata, self.config = metadata, config
        self.remaining: list[float] = []

    async def ModelMetadata(self, request, context):  # noqa: N802 - gRPC's method name
        return self.metadata

    async def ModelConfig(self, request, context):  # noqa: N802 - gRPC's method name
        return self.config

    async def ModelInfer(self, request, context):  # noqa: N802 - gRPC's method name
        self.remaining.append(context.time_remaining())
        await asyncio.sleep(5)
        return grpc_service_pb2.ModelInferResponse()


def test_the_callers_deadline_flows_to_the_stages(stack):
    with grpc.insecure_channel(stack.servers["inference"].address) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        metadata = stub.ModelMetadata(grpc_service_pb2.ModelMetadataRequest(name="yolov8n"), timeout=10)
        config = stub.ModelConfig(grpc_service_pb2.ModelConfigRequest(name="yolov8n"), timeout=10)
    slow = _SlowInference(metadata, config)

    def register(server):
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(slow, server)
        return ["inference.GRPCInferenceService"]

    loop = LoopThread()
    fake = start_service(loop, lambda settings: Service("slow-inference", register), stack.settings)
    controller = start_stage(loop, "controller", dataclasses.replace(stack.settings, inference_target=fake.address))
    try:
        with grpc.insecure_channel(controller.address) as channel:
            stub = controller_pb2_grpc.ControllerServiceStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as raised:
                stub.Detect(_detect(encoded()), timeout=1.5)
            assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 4, "the controller did not wait for the slow stage"
        # Far below the 60 s default: the caller's 1.5 s, give or take gRPC's timeout encoding.
        assert slow.remaining and 0 < slow.remaining[0] < 2, "the stage got what was left of the deadline"
    finally:
        controller.stop()
        fake.stop()
        loop.close()
