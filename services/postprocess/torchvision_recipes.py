"""Postprocessing for torchvision's detection models, without torch.

torchvision's detectors finish their own detections inside the forward pass (score threshold
``box_score_thresh``, per-class NMS at ``box_nms_thresh``, the best ``box_detections_per_img``,
boxes mapped back to the image they were given), so with the recipe's defaults this returns the
model's rows unchanged: that is torchvision's output. A request can only narrow it:

- ``conf``: keeps ``score > conf``, strictly, as torchvision's own ``scores > box_score_thresh``,
  so a conf equal to the model's threshold (the default, 0.05) changes nothing. A conf below the
  model's threshold cannot bring back what the model already dropped.
- ``classes``: keeps those class ids (torchvision's numbering: 91 COCO slots, 1 = person).
- ``iou``: the model ran class-aware NMS at ``nms_iou`` (reported by the loader). A lower iou
  runs one more class-aware NMS at that iou over the model's detections, computed exactly as
  ``torchvision.ops.batched_nms`` would on them; an iou at or above ``nms_iou`` changes nothing.
  ``agnostic`` runs one class-agnostic NMS at the request's iou (else ``nms_iou``) over them.
- ``max_det``: the best ``max_det`` by score (stable: ties keep the model's order), at most the
  model's ``box_detections_per_img``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from inferline.common.detections import Detection, DetectOptions
from inferline.common.errors import InvalidInput
from inferline.common.transform import ImageTransform
from inferline.services.postprocess.recipes import POSTPROCESSORS, label_for
from inferline.services.postprocess.yolo import nms

# torchvision's defaults for its R-CNN heads: box_score_thresh, box_detections_per_img, box_nms_thresh.
DEFAULTS = {"conf": 0.05, "max_det": 100, "nms_iou": 0.5}


@POSTPROCESSORS.register("torchvision_detect")
def torchvision_detect(
    outputs: Mapping[str, np.ndarray],
    transform: ImageTransform,
    options: DetectOptions,
    params: Mapping[str, Any],
    labels: Sequence[str],
) -> list[Detection]:
    boxes, scores, class_ids = _rows(outputs)
    params = {**DEFAULTS, **params}
    conf, _, max_det = options.resolved(params)
    model_iou = float(params["nms_iou"])

    keep = scores > np.float32(conf)
    if options.classes:
        keep &= np.isin(class_ids, np.asarray(options.classes, dtype=np.int64))
    index = np.flatnonzero(keep)

    if index.size and options.agnostic:
        iou = options.iou if options.iou is not None else model_iou
        index = index[nms(boxes[index], scores[index], iou)]
    elif index.size and options.iou is not None and options.iou < model_iou:
        index = index[_batched_nms(boxes[index], scores[index], class_ids[index], options.iou)]

    index = index[np.argsort(-scores[index], kind="stable")][:max_det]
    mapped = to_original(boxes[index], transform)
    return [
        Detection(label_for(int(c), labels), int(c), float(s), (float(x1), float(y1), float(x2), float(y2)))
        for (x1, y1, x2, y2), s, c in zip(mapped, scores[index], class_ids[index], strict=True)
    ]


def _rows(outputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    missing = sorted({"boxes", "scores", "labels"} - set(outputs))
    if missing:
        raise InvalidInput(f"torchvision_detect needs outputs boxes, scores and labels; missing {missing}")
    boxes = np.asarray(outputs["boxes"], dtype=np.float32)
    scores = np.asarray(outputs["scores"], dtype=np.float32)
    class_ids = np.asarray(outputs["labels"]).astype(np.int64, copy=False)
    count = scores.shape[0] if scores.ndim == 1 else -1
    if boxes.shape != (count, 4) or class_ids.shape != (count,):
        raise InvalidInput(
            f"torchvision_detect expects boxes (K, 4), scores (K,), labels (K,); got "
            f"{boxes.shape}, {scores.shape}, {class_ids.shape}"
        )
    return boxes, scores, class_ids


def _batched_nms(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, iou: float) -> np.ndarray:
    """``torchvision.ops.batched_nms``'s coordinate trick, in the same float32 arithmetic: each
    class is shifted by ``class * (max coordinate + 1)`` so one NMS never compares two classes."""
    offsets = class_ids.astype(np.float32) * (boxes.max() + np.float32(1))
    return nms(boxes + offsets[:, None], scores, iou)


def to_original(boxes: np.ndarray, transform: ImageTransform) -> np.ndarray:
    """Input-pixel xyxy -> original-image pixels (``(x - pad) / scale``), clipped to the image."""
    if transform.scale_x <= 0 or transform.scale_y <= 0:
        raise InvalidInput(f"image transform has a non-positive scale ({transform.scale_x}, {transform.scale_y})")
    mapped = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    mapped[:, [0, 2]] = ((mapped[:, [0, 2]] - transform.pad_x) / transform.scale_x).clip(0, transform.orig_width)
    mapped[:, [1, 3]] = ((mapped[:, [1, 3]] - transform.pad_y) / transform.scale_y).clip(0, transform.orig_height)
    return mapped
