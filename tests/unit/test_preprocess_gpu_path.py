"""The preprocess GPU path (nvJPEG + torch letterbox), run on the CPU: same geometry as the
OpenCV path, pixels within interpolation rounding, detections within the parity rule."""

from __future__ import annotations

import dataclasses

import cv2
import grpc
import numpy as np
import pytest

from inferline.common.errors import ConfigError, InvalidInput
from inferline.common.generated import controller_pb2, controller_pb2_grpc, types_pb2
from inferline.services.preprocess import gpu
from inferline.services.preprocess.letterbox import letterbox
from inferline.services.preprocess.service import torch_device
from tests.support.images import encoded
from tests.support.parity import mismatches
from tests.support.servers import InProcessStack

PARAMS = {"size": 640, "stride": 32, "auto": True, "pad_value": 114}


def test_geometry_equals_the_opencv_path_and_pixels_are_within_rounding(sample_images):
    for path in sample_images:
        data = path.read_bytes()
        ours, transform = gpu.letterbox_batch([data], PARAMS, "cpu", 50_000_000)[0]
        reference, expected = letterbox(cv2.imread(str(path)), (640, 640), stride=32, auto=True)
        assert transform == expected and ours.shape == reference.shape and ours.dtype == np.uint8
        diff = np.abs(ours.astype(int) - reference.astype(int))
        assert diff.mean() < 1.5, f"{path.name}: mean pixel difference {diff.mean():.2f}"


def test_resizing_and_odd_padding_keep_the_geometry():
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (301, 517, 3), dtype=np.uint8)
    ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    ours, transform = gpu.letterbox_batch([jpeg.tobytes()], {**PARAMS, "auto": False}, "cpu", 50_000_000)[0]
    _, expected = letterbox(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), (640, 640), stride=32, auto=False)
    assert transform == expected and ours.shape == (3, 640, 640)
    assert (ours[:, 0, :] == 114).all() and (ours[:, -1, :] == 114).all()  # the grey bands


def test_a_bad_jpeg_fails_alone_and_the_pixel_limit_holds(sample_images):
    good = sample_images[0].read_bytes()
    outcomes = gpu.letterbox_batch([good, b"\xff\xd8\xff\xe0 truncated", good], PARAMS, "cpu", 50_000_000)
    assert isinstance(outcomes[1], InvalidInput)
    assert outcomes[0][1] == outcomes[2][1]
    with pytest.raises(InvalidInput, match="over the limit"):
        gpu.letterbox_batch([good], PARAMS, "cpu", 1000)


def test_preprocess_device_is_checked_at_start():
    assert torch_device("opencv") is None and torch_device("torch-cpu") == "cpu"
    with pytest.raises(ConfigError, match="expected opencv, cuda"):
        torch_device("tpu")


@pytest.mark.slow
def test_detect_through_the_gpu_path_on_cpu_keeps_parity(settings, stack, sample_images):
    images = [types_pb2.Image(data=p.read_bytes(), name=p.name) for p in sample_images]
    images.insert(1, types_pb2.Image(data=encoded(fmt=".png"), name="a.png"))  # PNG: the OpenCV path
    request = controller_pb2.DetectRequest(model="yolov8n", images=images)
    local = InProcessStack(dataclasses.replace(settings, preprocess_device="torch-cpu", models=("yolov8n",)))
    try:
        with grpc.insecure_channel(local.controller) as ours, grpc.insecure_channel(stack.controller) as reference:
            got = controller_pb2_grpc.ControllerServiceStub(ours).Detect(request, timeout=120).results
            want = controller_pb2_grpc.ControllerServiceStub(reference).Detect(request, timeout=120).results
    finally:
        local.close()

    def rows(result):
        return [(d.label, d.score, (d.box.x1, d.box.y1, d.box.x2, d.box.y2)) for d in result.detections]

    assert all(r.status.code == 0 for r in got)
    problems = {
        r.name: mismatches(rows(r), rows(w)) for r, w in zip(got, want, strict=True) if mismatches(rows(r), rows(w))
    }
    assert not problems, problems
    assert sum(len(r.detections) for r in got) > 10
