"""Postprocess stage through a real server: decoding, thresholds, renderers and errors."""

from __future__ import annotations

import json

import cv2
import grpc
import numpy as np
import pytest

from inferline.common import tensors
from inferline.common.generated import postprocess_pb2, postprocess_pb2_grpc, types_pb2
from inferline.common.recipes import Recipe
from tests.support.images import encoded
from tests.support.servers import stage_channel

YOLO = Recipe("yolo_detect", {"conf": 0.25, "iou": 0.7, "max_det": 300}).to_proto()
LABELS = ["zero", "one", "two"]
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest.fixture(scope="module")
def stub(settings):
    with stage_channel("postprocess", settings) as channel:
        yield postprocess_pb2_grpc.PostprocessServiceStub(channel)


def _raw_output() -> np.ndarray:
    """(4 + 3 classes, 4 anchors): two overlapping class-1 boxes, one class-2 box, one weak box."""
    columns = [
        # cx, cy, w, h, then scores of classes 0..2
        [100, 100, 40, 40, 0.0, 0.9, 0.0],
        [102, 101, 40, 40, 0.0, 0.8, 0.0],  # overlaps the first: suppressed
        [300, 200, 60, 20, 0.0, 0.0, 0.6],
        [500, 400, 10, 10, 0.1, 0.0, 0.0],  # under conf 0.25
    ]
    return np.array(columns, np.float32).T


def _transform(scale: float = 0.5, pad_x: float = 0.0, pad_y: float = 0.0) -> types_pb2.ImageTransform:
    """A 1280x960 original letterboxed to 640x480."""
    return types_pb2.ImageTransform(
        orig_width=1280, orig_height=960, input_width=640, input_height=480,
        scale_x=scale, scale_y=scale, pad_x=pad_x, pad_y=pad_y,
    )


def _request(options: types_pb2.DetectOptions | None = None, items=None) -> postprocess_pb2.PostprocessRequest:
    if items is None:
        output = tensors.to_proto(_raw_output(), "output0")
        items = [postprocess_pb2.PostprocessItem(outputs=[output], transform=_transform())]
    return postprocess_pb2.PostprocessRequest(recipe=YOLO, options=options or types_pb2.DetectOptions(), labels=LABELS,
                                              items=items)


def test_yolo_detect_filters_suppresses_labels_and_maps_to_original_pixels(stub):
    result = stub.Postprocess(_request(), timeout=10).results[0]
    assert result.status.code == 0
    assert [(d.label, d.class_id) for d in result.detections] == [("one", 1), ("two", 2)]
    assert result.detections[0].score == pytest.approx(0.9)
    box = result.detections[0].box
    assert (box.x1, box.y1, box.x2, box.y2) == pytest.approx((160, 160, 240, 240))


def test_request_options_override_the_model_defaults(stub):
    options = types_pb2.DetectOptions(conf=0.05, max_det=2)
    detections = stub.Postprocess(_request(options), timeout=10).results[0].detections
    assert [d.class_id for d in detections] == [1, 2]
    options = types_pb2.DetectOptions(conf=0.05, classes=[0])
    assert [d.class_id for d in stub.Postprocess(_request(options), timeout=10).results[0].detections] == [0]
    options = types_pb2.DetectOptions(iou=0.99)
    assert len(stub.Postprocess(_request(options), timeout=10).results[0].detections) == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (types_pb2.DetectOptions(conf=1.5), "conf must be between 0 and 1"),
        (types_pb2.DetectOptions(iou=-0.1), "iou must be between 0 and 1"),
        (types_pb2.DetectOptions(max_det=0), "max_det must be at least 1"),
        (types_pb2.DetectOptions(classes=[-1]), "class ids must be non-negative"),
    ],
)
def test_invalid_options_are_invalid_argument(stub, options, message):
    with pytest.raises(grpc.RpcError) as raised:
        stub.Postprocess(_request(options), timeout=10)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT and message in raised.value.details()


def test_a_malformed_item_fails_alone(stub):
    good = postprocess_pb2.PostprocessItem(outputs=[tensors.to_proto(_raw_output(), "output0")], transform=_transform())
    wrong_shape = postprocess_pb2.PostprocessItem(outputs=[tensors.to_proto(np.zeros((3, 10), np.float32), "output0")],
                                                  transform=_transform())
    no_transform = postprocess_pb2.PostprocessItem(outputs=[tensors.to_proto(_raw_output(), "output0")])
    results = stub.Postprocess(_request(items=[good, wrong_shape, no_transform]), timeout=10).results
    assert [r.status.code for r in results] == [0, INVALID, INVALID]
    assert "expects a (4 + classes, anchors) output" in results[1].status.message
    assert len(results[0].detections) == 2


def test_unknown_recipe_is_invalid_argument(stub):
    request = _request()
    request.recipe.CopyFrom(Recipe("nope").to_proto())
    with pytest.raises(grpc.RpcError) as raised:
        stub.Postprocess(request, timeout=10)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "nope" in raised.value.details()


def _render_item(image: bytes = b"") -> postprocess_pb2.RenderItem:
    detection = types_pb2.Detection(label="one", class_id=1, score=0.9, box=types_pb2.Box(x1=5, y1=5, x2=40, y2=30))
    return postprocess_pb2.RenderItem(name="x.png", width=64, height=48, detections=[detection], image=image)


def test_render_produces_json_csv_and_png(stub):
    as_json = stub.Render(postprocess_pb2.RenderRequest(format=types_pb2.RENDER_FORMAT_JSON, items=[_render_item()]),
                          timeout=10)
    assert json.loads(as_json.renderings[0].content)["detections"][0]["label"] == "one"
    as_csv = stub.Render(postprocess_pb2.RenderRequest(format=types_pb2.RENDER_FORMAT_CSV, items=[_render_item()]),
                         timeout=10)
    assert as_csv.renderings[0].content.decode().splitlines()[1].startswith("x.png,one,1,0.9")
    as_png = stub.Render(postprocess_pb2.RenderRequest(format=types_pb2.RENDER_FORMAT_PNG,
                                                       items=[_render_item(encoded())]), timeout=10)
    assert as_png.renderings[0].content_type == "image/png"
    assert cv2.imdecode(np.frombuffer(as_png.renderings[0].content, np.uint8), cv2.IMREAD_COLOR).shape == (48, 64, 3)


def test_render_errors_are_invalid_argument(stub):
    for request in (
        postprocess_pb2.RenderRequest(items=[_render_item()]),
        postprocess_pb2.RenderRequest(format=types_pb2.RENDER_FORMAT_PNG, items=[_render_item()]),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            stub.Render(request, timeout=10)
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
