"""Instance masks through the four services equal ultralytics' own predict on the same weights.

The reference is ``YOLO(path).predict`` with the YOLOv8n-seg stand-in. Its ``result.masks.data``
are at the letterboxed input size; they are taken to the original image the way ultralytics'
own annotator does before drawing them (``Results.plot`` -> ``Annotator.masks``):
``ops.scale_masks(masks[None].float(), result.orig_shape)[0] > 0.5`` (letterbox padding cropped,
bilinear resize, threshold). inferline's Detect returns masks at the original size already.
Instances are matched in order (both sort by score): same count and classes, scores within
1e-4, box IoU >= 0.99 and mask IoU >= 0.99 each.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from inferline.common.detections import Detection
from inferline.common.generated import controller_pb2, controller_pb2_grpc, types_pb2
from tests.support.parity import iou

MODEL = "yolov8n-seg"
SCORE_TOLERANCE = 1e-4
BOX_IOU_MIN = 0.99
MASK_IOU_MIN = 0.99


@pytest.fixture(scope="module")
def reference(seg_weights):
    from ultralytics import YOLO  # noqa: PLC0415 - after the weights' sha256 check (seg_weights)

    return YOLO(str(seg_weights))


def _detect(channel: grpc.Channel, paths: list[Path], render=(), **options) -> controller_pb2.DetectResponse:
    stub = controller_pb2_grpc.ControllerServiceStub(channel)
    request = controller_pb2.DetectRequest(
        model=MODEL,
        images=[types_pb2.Image(data=p.read_bytes(), name=p.name) for p in paths],
        options=types_pb2.DetectOptions(**options),
        render=render,
    )
    response = stub.Detect(request, timeout=120)
    assert all(r.status.code == 0 for r in response.results), [r.status for r in response.results]
    return response


def _theirs(model, path: Path, **options) -> list[tuple[int, float, list[float], np.ndarray]]:
    from ultralytics.utils import ops  # noqa: PLC0415 - ultralytics only where the reference runs

    result = model.predict(source=str(path), verbose=False, device="cpu", **options)[0]
    if result.masks is None:
        return []
    masks = (ops.scale_masks(result.masks.data[None].float(), result.orig_shape)[0] > 0.5).numpy()
    boxes = result.boxes
    return list(zip(map(int, boxes.cls.tolist()), boxes.conf.tolist(), boxes.xyxy.tolist(), masks, strict=False))


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _compare(response: controller_pb2.DetectResponse, reference, paths: list[Path], **options) -> list[float]:
    """Every instance's mask IoU; fails with every mismatch listed."""
    problems, mask_ious = [], []
    for path, result in zip(paths, response.results, strict=False):
        ours = [Detection.from_proto(d) for d in result.detections]
        theirs = _theirs(reference, path, **options)
        if len(ours) != len(theirs):
            problems.append(f"{path.name}: {len(ours)} instances, ultralytics {len(theirs)}")
            continue
        for k, (detection, (class_id, score, box, mask)) in enumerate(zip(ours, theirs, strict=False)):
            where = f"{path.name}[{k}]"
            if detection.class_id != class_id or abs(detection.score - score) > SCORE_TOLERANCE:
                problems.append(
                    f"{where}: class {detection.class_id} score {detection.score}, ultralytics {class_id} {score}"
                )
            if iou(detection.box, box) < BOX_IOU_MIN:
                problems.append(f"{where}: box IoU {iou(detection.box, box):.4f}")
            if detection.mask is None or (detection.mask.height, detection.mask.width) != mask.shape:
                problems.append(f"{where}: mask missing or not at the original size {mask.shape}")
                continue
            mask_ious.append(_mask_iou(detection.mask.decode(), mask))
            if mask_ious[-1] < MASK_IOU_MIN:
                problems.append(f"{where}: mask IoU {mask_ious[-1]:.4f}")
    assert not problems, problems
    return mask_ious


def test_shared_images_and_ultralytics_samples_match_predict_with_default_thresholds(stack, reference, sample_images):
    with grpc.insecure_channel(stack.controller) as channel:
        response = _detect(channel, sample_images)
    mask_ious = _compare(response, reference, sample_images)
    assert len(mask_ious) > 10, "the reference finds instances, so parity means something"
    print(f"\n{len(mask_ious)} instances, mask IoU min {min(mask_ious):.6f}")


def test_lower_thresholds_match_predict_with_the_same_thresholds(stack, reference, sample_images):
    """conf 0.05 finds instances on the photos too (bus.jpg, zidane.jpg), whose masks are scaled
    down from the letterboxed input to the original size."""
    options = {"conf": 0.05, "iou": 0.5}
    with grpc.insecure_channel(stack.controller) as channel:
        response = _detect(channel, sample_images, **options)
    mask_ious = _compare(response, reference, sample_images, **options)
    photos = [r for r in response.results if r.name in ("bus.jpg", "zidane.jpg")]
    assert sum(len(r.detections) for r in photos) > 0, "a photo's masks are rescaled, so check one"
    print(f"\n{len(mask_ious)} instances, mask IoU min {min(mask_ious):.6f}")


def test_json_carries_rle_masks_and_png_paints_them(stack, data_dir):
    path = data_dir / "shapes_02.jpg"
    with grpc.insecure_channel(stack.controller) as channel:
        response = _detect(channel, [path], render=[types_pb2.RENDER_FORMAT_JSON, types_pb2.RENDER_FORMAT_PNG])
    result = response.results[0]
    as_json, as_png = result.renderings
    detections = json.loads(as_json.content)["detections"]
    assert detections and all(d["mask"]["size"] == [result.height, result.width] for d in detections)
    assert all(sum(d["mask"]["counts"]) == result.height * result.width for d in detections)

    original = cv2.imread(str(path))
    drawn = cv2.imdecode(np.frombuffer(as_png.content, np.uint8), cv2.IMREAD_COLOR)
    masks = [Detection.from_proto(d).mask.decode() for d in result.detections]
    inside = np.logical_or.reduce(masks)
    assert inside.sum() > 1000
    changed = (drawn != original).any(axis=2)
    assert changed[inside].mean() > 0.95, "mask pixels are tinted"
