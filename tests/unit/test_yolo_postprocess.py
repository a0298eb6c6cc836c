"""The torch-free YOLO postprocessing must return exactly what ultralytics' predict returns."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision  # ultralytics' NMS uses torchvision's kernel only once imported, as in predict
from ultralytics import YOLO
from ultralytics.utils import ops
from ultralytics.utils.nms import non_max_suppression

from inferline.common.transform import ImageTransform
from inferline.services.postprocess.yolo import decode_detections, nms, scale_boxes
from inferline.services.preprocess.letterbox import letterbox


@pytest.fixture(scope="module")
def yolo(yolo_weights: Path) -> YOLO:
    return YOLO(str(yolo_weights))


def _reference(
    output: np.ndarray,
    *,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    classes: Sequence[int] | None = None,
    agnostic: bool = False,
) -> np.ndarray:
    prediction = torch.from_numpy(output.copy())[None]
    return non_max_suppression(prediction, conf, iou, classes, agnostic, max_det=max_det)[0].numpy()


def _assert_decodes_like_ultralytics(output: np.ndarray, **options: object) -> np.ndarray:
    ours = decode_detections(output, **options)
    expected = _reference(output, **options)
    assert ours.dtype == np.float32 and ours.shape == (len(expected), 6), options
    np.testing.assert_array_equal(ours, expected, err_msg=str(options))
    return ours


def _raw_output(yolo: YOLO, image: np.ndarray) -> tuple[np.ndarray, ImageTransform]:
    tensor, transform = letterbox(image)
    with torch.no_grad():
        prediction = yolo.model(torch.from_numpy(tensor)[None].float() / 255)
    prediction = prediction[0] if isinstance(prediction, (list, tuple)) else prediction
    return prediction[0].numpy(), transform


def _synthetic_output(
    rng: np.random.Generator, anchors: int, classes: int, clusters: int, *, decimals: int | None = None
) -> np.ndarray:
    """Boxes jittered around a few objects, like a detector's many overlapping anchors; rounding the
    scores to a few decimals creates exact ties, both between boxes and between a box's classes."""
    centres = rng.uniform(0, 640, (clusters, 2))
    sizes = rng.uniform(8, 320, (clusters, 2))
    owner = rng.integers(0, clusters, anchors)
    xy = centres[owner] + rng.normal(0, 6, (anchors, 2))
    wh = sizes[owner] * rng.uniform(0.8, 1.25, (anchors, 2))
    scores = rng.random((anchors, classes)) ** 4
    if decimals is not None:
        scores = np.round(scores, decimals)
    return np.concatenate((xy, wh, scores), axis=1).T.astype(np.float32)


def test_decode_matches_ultralytics_on_real_model_outputs(yolo, sample_images):
    found = 0
    for path in sample_images:
        output, _ = _raw_output(yolo, cv2.imread(str(path)))
        assert output.shape[0] == 84
        found += len(_assert_decodes_like_ultralytics(output))
        _assert_decodes_like_ultralytics(output, conf=0.001, iou=0.5)
        _assert_decodes_like_ultralytics(output, conf=0.01, agnostic=True, max_det=5)
        _assert_decodes_like_ultralytics(output, conf=0.01, classes=[32, 62])
    assert found > 10  # the shapes scenes must really produce detections


def test_decode_matches_ultralytics_when_every_anchor_is_a_candidate(yolo, sample_images):
    output, _ = _raw_output(yolo, cv2.imread(str(sample_images[0])))
    # conf=0 keeps all anchors, with many exactly equal float32 scores: checks the tie order.
    _assert_decodes_like_ultralytics(output, conf=0.0, max_det=100_000)


@pytest.mark.parametrize("decimals", [None, 2])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"conf": 0.05, "iou": 0.45},
        {"conf": 0.05, "agnostic": True},
        {"conf": 0.05, "classes": [0, 3]},
        {"conf": 0.05, "classes": []},
        {"conf": 0.02, "max_det": 7},
        {"conf": 0.1, "iou": 0.0},
        {"conf": 0.1, "iou": 1.0},
    ],
    ids=["defaults", "iou0.45", "agnostic", "classes", "no-classes", "max_det", "iou0", "iou1"],
)
def test_decode_matches_ultralytics_on_synthetic_overlapping_outputs(options, decimals):
    rng = np.random.default_rng(5)
    for anchors, classes, clusters in [(3000, 5, 12), (2000, 80, 40), (500, 1, 3)]:
        output = _synthetic_output(rng, anchors, classes, clusters, decimals=decimals)
        _assert_decodes_like_ultralytics(output, **options)


def test_decode_matches_ultralytics_beyond_max_nms_candidates():
    rng = np.random.default_rng(7)
    anchors, classes, clusters = 40_000, 20, 300
    output = _synthetic_output(rng, anchors, classes, clusters)
    # Distinct scores: past 30000 candidates ultralytics cuts with torch's unstable sort.
    output[4:] = 0
    output[4 + rng.integers(0, classes, anchors), np.arange(anchors)] = 0.3 + 0.7 * rng.permutation(anchors) / anchors
    ours = _assert_decodes_like_ultralytics(output, max_det=100_000)
    assert 0 < len(ours) < 30_000


def test_decode_returns_no_rows_when_nothing_passes_conf():
    output = _synthetic_output(np.random.default_rng(1), 100, 3, 4)
    output[4:] = np.minimum(output[4:], 0.25)  # conf is a strict >
    empty = decode_detections(output, conf=0.25)
    assert empty.shape == (0, 6) and empty.dtype == np.float32
    assert decode_detections(np.zeros((84, 0), np.float32)).shape == (0, 6)
    assert _reference(output, conf=0.25).shape == (0, 6)


@pytest.mark.parametrize("shape", [(84,), (4, 10), (2, 84, 10)])
def test_decode_rejects_malformed_outputs(shape):
    with pytest.raises(ValueError):
        decode_detections(np.zeros(shape, np.float32))


@pytest.mark.parametrize("options", [{"conf": -0.1}, {"conf": 1.5}, {"iou": 1.1}, {"iou": float("nan")}])
def test_decode_rejects_thresholds_outside_unit_interval(options):
    with pytest.raises(ValueError):
        decode_detections(_synthetic_output(np.random.default_rng(2), 50, 2, 2), **options)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_matches_torchvision(threshold):
    rng = np.random.default_rng(int(threshold * 10))
    for count, spread, size in [(1, 100, 10), (200, 100, 60), (2000, 640, 120), (3000, 6000, 40)]:
        xy = rng.uniform(0, spread, (count, 2))
        boxes = np.concatenate((xy, xy + rng.uniform(0, size, (count, 2))), axis=1).astype(np.float32)
        boxes[::17, 2] = boxes[::17, 0]  # zero width
        boxes[::23, 3] = boxes[::23, 1] - 5  # inverted
        scores = np.round(rng.random(count), 2).astype(np.float32)  # many ties
        expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold).numpy()
        np.testing.assert_array_equal(nms(boxes, scores, threshold), expected)


def test_nms_of_nothing_is_empty():
    keep = nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5)
    assert keep.shape == (0,) and keep.dtype == np.int64


def test_nms_matches_batched_nms_on_thirty_thousand_candidates():
    # YOLO's worst case: max_nms candidates over 80 classes. Integer coordinates keep the class
    # offset exact, so torchvision's per-class batched_nms (fast here) is an exact reference.
    rng = np.random.default_rng(30_000)
    count = 30_000
    xy = rng.integers(0, 600, (count, 2))
    boxes = np.concatenate((xy, xy + rng.integers(1, 120, (count, 2))), axis=1).astype(np.float32)
    labels = rng.integers(0, 80, count)
    scores = (rng.permutation(count) / count).astype(np.float32)  # distinct: batched_nms sorts unstably
    ours = nms(boxes + (labels * 7680)[:, None].astype(np.float32), scores, 0.7)
    expected = torchvision.ops.batched_nms(
        torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), 0.7
    ).numpy()
    np.testing.assert_array_equal(ours, expected)


def test_scale_boxes_matches_ultralytics():
    rng = np.random.default_rng(11)
    shapes = [(1, 1), (1, 3000), (3000, 1), (5, 7), (480, 640), (1080, 810), (333, 999), (2001, 1503)]
    shapes += [tuple(int(v) for v in rng.integers(1, 2000, 2)) for _ in range(30)]
    for i, (height, width) in enumerate(shapes):
        size = [(640, 640), (480, 640), (320, 320)][i % 3]
        _, transform = letterbox(np.zeros((height, width, 3), np.uint8), size, auto=bool(i % 2))
        input_shape = (transform.input_height, transform.input_width)
        corners = rng.uniform(-40, max(input_shape) + 40, (50, 2, 2))
        boxes = np.concatenate((corners.min(axis=1), corners.max(axis=1)), axis=1).astype(np.float32)
        original = boxes.copy()
        expected = ops.scale_boxes(input_shape, torch.from_numpy(boxes.copy()), (height, width)).numpy()
        ours = scale_boxes(boxes, transform)
        np.testing.assert_array_equal(ours, expected, err_msg=f"{(height, width)} -> {input_shape}")
        np.testing.assert_array_equal(boxes, original)  # the caller's array is left alone
    assert scale_boxes(np.zeros((0, 4), np.float32), transform).shape == (0, 4)
    with pytest.raises(ValueError):
        scale_boxes(np.zeros((3, 5), np.float32), transform)


def test_pipeline_matches_yolo_predict_end_to_end(yolo, sample_images):
    yolo.predict(np.zeros((64, 64, 3), np.uint8), verbose=False)  # sets up yolo.predictor (fused model)
    for path in sample_images:
        image = cv2.imread(str(path))
        expected = yolo.predict(image, verbose=False)[0].boxes.data.numpy()
        tensor, transform = letterbox(image)
        prediction = yolo.predictor.inference(torch.from_numpy(tensor)[None].float() / 255)
        prediction = prediction[0] if isinstance(prediction, (list, tuple)) else prediction
        rows = decode_detections(prediction[0].numpy())
        ours = np.concatenate((scale_boxes(rows[:, :4], transform), rows[:, 4:]), axis=1)
        np.testing.assert_array_equal(ours, expected, err_msg=path.name)


def test_postprocess_and_preprocess_do_not_import_torch():
    modules = "inferline.services.postprocess.yolo, inferline.services.preprocess.letterbox"
    code = f"import sys, {modules}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_inference_stage_candidate_filter_never_changes_the_detections():
    """Filtering at the request's conf drops only what decode_detections drops first, on scores
    placed right at the threshold (float32 rounding of 0.25 included)."""
    from inferline.services.inference.filters import yolo_candidates  # noqa: PLC0415

    rng = np.random.default_rng(7)
    output = np.zeros((84, 2000), dtype=np.float32)
    output[:2] = rng.uniform(0, 640, (2, 2000))
    output[2:4] = rng.uniform(4, 80, (2, 2000))
    output[4:] = rng.uniform(0, 0.05, (80, 2000))
    output[4 + 7, 100:1000] = rng.uniform(0, 0.35, 900)
    output[4 + 3, :50] = np.float32(0.25)  # exactly at the threshold: dropped by both
    output[4 + 5, 50:100] = np.nextafter(np.float32(0.25), np.float32(1))  # just above: kept by both
    for conf in (0.25, 0.1, 0.29):
        filtered = yolo_candidates({"output0": output}, conf)["output0"]
        assert filtered.shape[1] < output.shape[1]
        np.testing.assert_array_equal(decode_detections(filtered, conf=conf), decode_detections(output, conf=conf))
