"""YOLO decode and NMS on a torch device keep exactly what the numpy path keeps (issue 16).

On CPU the device path runs on torch CPU tensors ("torch-cpu"); the gpu-marked test runs it on
CUDA. Same rows, same order: indices identical, boxes and scores to float32 rounding.
"""

from __future__ import annotations

import asyncio
import dataclasses

import cv2
import numpy as np
import pytest
import torch
from ultralytics import YOLO

from inferline.common.detections import DetectOptions
from inferline.common.errors import ConfigError
from inferline.common.recipes import Recipe
from inferline.common.settings import Settings
from inferline.services.postprocess import device_nms
from inferline.services.postprocess.service import Postprocessor
from inferline.services.postprocess.yolo import decode_detections
from inferline.services.postprocess.yolo_recipes import yolo_detect
from inferline.services.preprocess.letterbox import letterbox
from tests.unit.test_yolo_postprocess import _synthetic_output

OPTIONS = [
    {},
    {"conf": 0.05, "iou": 0.45},
    {"conf": 0.05, "agnostic": True},
    {"conf": 0.05, "classes": [0, 3]},
    {"conf": 0.05, "classes": []},
    {"conf": 0.02, "max_det": 7},
    {"conf": 0.1, "iou": 0.0},
]


def _assert_same_rows(output: np.ndarray, device: str, **options) -> int:
    expected = decode_detections(output, **options)
    ours = device_nms.decode_detections(output, device=device, **options)
    assert ours.dtype == np.float32 and ours.shape == expected.shape, options
    np.testing.assert_array_equal(ours[:, 5:], expected[:, 5:], err_msg=f"classes differ: {options}")
    np.testing.assert_allclose(ours[:, :5], expected[:, :5], rtol=1e-6, atol=1e-4, err_msg=str(options))
    return len(expected)


@pytest.fixture(scope="module")
def real_outputs(yolo_weights, sample_images) -> list[np.ndarray]:
    model = YOLO(str(yolo_weights)).model
    outputs = []
    for path in sample_images:
        tensor, _ = letterbox(cv2.imread(str(path)))
        with torch.no_grad():
            prediction = model(torch.from_numpy(tensor)[None].float() / 255)
        prediction = prediction[0] if isinstance(prediction, (list, tuple)) else prediction
        outputs.append(prediction[0].numpy())
    return outputs


@pytest.mark.parametrize("decimals", [None, 2])
@pytest.mark.parametrize("options", OPTIONS, ids=[str(o) for o in OPTIONS])
def test_device_path_keeps_the_numpy_paths_rows_on_overlapping_outputs(options, decimals):
    rng = np.random.default_rng(5)
    for anchors, classes, clusters in [(3000, 5, 12), (2000, 80, 40), (500, 1, 3)]:
        _assert_same_rows(_synthetic_output(rng, anchors, classes, clusters, decimals=decimals), "cpu", **options)


def test_device_path_keeps_the_numpy_paths_rows_on_real_model_outputs(real_outputs):
    found = sum(_assert_same_rows(output, "cpu") for output in real_outputs)
    assert found > 10  # the scenes really produce detections
    # Every anchor a candidate: thousands of exactly equal float32 scores check the tie order.
    _assert_same_rows(real_outputs[0], "cpu", conf=0.0, max_det=100_000)


def test_device_path_cuts_to_the_best_candidates_as_the_numpy_path_does():
    rng = np.random.default_rng(7)
    anchors, classes = 40_000, 20
    output = _synthetic_output(rng, anchors, classes, 300)
    output[4:] = 0
    output[4 + rng.integers(0, classes, anchors), np.arange(anchors)] = 0.3 + 0.7 * rng.permutation(anchors) / anchors
    assert 0 < _assert_same_rows(output, "cpu", max_det=100_000) < 30_000


def test_mask_coefficients_ride_along_on_the_device_path():
    rng = np.random.default_rng(11)
    head = np.concatenate((_synthetic_output(rng, 1500, 8, 10), rng.normal(size=(32, 1500)).astype(np.float32)))
    assert _assert_same_rows(head, "cpu", nc=8) > 0


@pytest.mark.parametrize("shape", [(4, 10), (84,), (84, 10, 1)])
def test_device_path_rejects_malformed_outputs(shape):
    with pytest.raises(ValueError, match="4 \\+ classes, anchors"):
        device_nms.decode_detections(np.zeros(shape, np.float32), device="cpu")


def test_the_setting_names_a_torch_device_or_the_numpy_path():
    assert device_nms.torch_device("cpu") is None
    assert device_nms.torch_device("torch-cpu") == "cpu"
    assert device_nms.torch_device("cuda:1") == "cuda:1"
    for bad in ("gpu", "cuda:x", ""):
        with pytest.raises(ConfigError, match="INFERLINE_POSTPROCESS_DEVICE"):
            device_nms.torch_device(bad)


def test_the_postprocess_stage_runs_the_yolo_recipe_on_the_configured_device(real_outputs, monkeypatch):
    """The hook: with postprocess_device set, the yolo recipe's NMS goes through device_nms, and
    the stage's detections are the numpy path's."""
    calls = []
    real = device_nms.decode_detections
    monkeypatch.setattr(device_nms, "decode_detections", lambda *a, **k: calls.append(k["device"]) or real(*a, **k))
    _, transform = letterbox(np.zeros((480, 640, 3), np.uint8))
    items = [({"output0": output}, transform) for output in real_outputs]

    def detect(device: str) -> list:
        stage = Postprocessor(dataclasses.replace(Settings(), postprocess_device=device, worker_threads=1))
        try:
            return asyncio.run(stage.detections(Recipe("yolo_detect"), DetectOptions(), ("a",) * 80, items))
        finally:
            asyncio.run(stage.close())

    numpy_path = detect("cpu")
    assert calls == []
    assert detect("torch-cpu") == numpy_path and calls == ["cpu"] * len(items)
    assert sum(len(d) for d in numpy_path) > 10


def test_the_yolo_recipe_without_the_parameter_stays_on_numpy(real_outputs):
    _, transform = letterbox(np.zeros((480, 640, 3), np.uint8))
    plain = yolo_detect({"output0": real_outputs[0]}, transform, DetectOptions(), {}, ())
    device = yolo_detect({"output0": real_outputs[0]}, transform, DetectOptions(), {"nms_device": "cpu"}, ())
    assert device == plain


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_nms_on_cuda_keeps_the_numpy_paths_rows(real_outputs):
    for output in real_outputs:
        _assert_same_rows(output, "cuda")
        _assert_same_rows(output, "cuda", conf=0.01, agnostic=True)
    rng = np.random.default_rng(5)
    for options in OPTIONS:
        _assert_same_rows(_synthetic_output(rng, 3000, 5, 12), "cuda", **options)
