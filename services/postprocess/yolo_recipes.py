"""Postprocessing for ultralytics' YOLOv8 family, without torch: detection and segmentation.

Both follow ultralytics 8.4's predict exactly: ``yolo_detect`` its DetectionPredictor (NMS and
``scale_boxes``, services/postprocess/yolo.py), ``yolo_segment`` its SegmentationPredictor (the
same NMS over the class rows, carrying each box's mask coefficients, then the masks of
services/postprocess/masks.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

from inferline.common.detections import Detection, DetectOptions
from inferline.common.errors import InvalidInput
from inferline.common.masks import Mask
from inferline.common.transform import ImageTransform
from inferline.services.postprocess import device_nms
from inferline.services.postprocess.device_nms import NMS_DEVICE
from inferline.services.postprocess.masks import instance_masks, to_original
from inferline.services.postprocess.recipes import POSTPROCESSORS, label_for
from inferline.services.postprocess.yolo import decode_detections, scale_boxes


@POSTPROCESSORS.register("yolo_detect")
def yolo_detect(
    outputs: Mapping[str, np.ndarray],
    transform: ImageTransform,
    options: DetectOptions,
    params: Mapping[str, Any],
    labels: Sequence[str],
) -> list[Detection]:
    if len(outputs) != 1:
        raise InvalidInput(f"yolo_detect takes one output tensor, got {sorted(outputs)}")
    (output,) = outputs.values()
    if output.ndim != 2 or output.shape[0] < 5:
        raise InvalidInput(f"yolo_detect expects a (4 + classes, anchors) output, got shape {output.shape}")
    rows = _decode(output, options, params)
    boxes = scale_boxes(rows[:, :4], transform)
    return [
        Detection(label_for(int(c), labels), int(c), float(s), _box(box))
        for box, s, c in zip(boxes, rows[:, 4], rows[:, 5], strict=False)
    ]


@POSTPROCESSORS.register("yolo_segment")
def yolo_segment(
    outputs: Mapping[str, np.ndarray],
    transform: ImageTransform,
    options: DetectOptions,
    params: Mapping[str, Any],
    labels: Sequence[str],
) -> list[Detection]:
    """Detections with masks in original-image pixels. As ultralytics does, an instance whose
    mask is empty at the model input's size is dropped, so there may be fewer than the NMS kept."""
    head, protos = _segment_outputs(outputs)
    rows = _decode(head, options, params, nc=head.shape[0] - 4 - protos.shape[0])
    blocks = instance_masks(protos, rows[:, 6:], rows[:, :4], (transform.input_height, transform.input_width))
    kept = [i for i, block in enumerate(blocks) if block is not None]
    boxes = scale_boxes(rows[kept, :4], transform)
    original = (transform.orig_height, transform.orig_width)
    detections = []
    for i, box in zip(kept, boxes, strict=False):
        block = to_original(blocks[i], original)  # type: ignore[arg-type]
        score, class_id = rows[i, 4], int(rows[i, 5])
        detections.append(
            Detection(
                label_for(class_id, labels), class_id, float(score), _box(box),
                mask=Mask.encode(block.pixels, offset=(block.top, block.left), size=original),
            )
        )
    return detections


def _decode(output: np.ndarray, options: DetectOptions, params: Mapping[str, Any], nc: int = 0) -> np.ndarray:
    conf, iou, max_det = options.resolved(params)
    decode = decode_detections
    if params.get(NMS_DEVICE):  # INFERLINE_POSTPROCESS_DEVICE: the same steps on a torch device
        decode = partial(device_nms.decode_detections, device=params[NMS_DEVICE])
    return decode(
        output.astype(np.float32, copy=False),
        conf=conf,
        iou=iou,
        max_det=max_det,
        classes=list(options.classes) or None,
        agnostic=options.agnostic,
        nc=nc,
    )


def _segment_outputs(outputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The head, (4 + classes + mask coefficients, anchors), and the prototypes, (masks, h, w)."""
    by_rank = {array.ndim: array for array in outputs.values()}
    if len(outputs) != 2 or set(by_rank) != {2, 3}:
        shapes = {name: array.shape for name, array in outputs.items()}
        raise InvalidInput(
            f"yolo_segment takes two outputs, the head (4 + classes + masks, anchors) and the prototypes "
            f"(masks, height, width); got {shapes}"
        )
    head, protos = by_rank[2], by_rank[3]
    if protos.shape[0] < 1 or head.shape[0] < 5 + protos.shape[0] or 0 in protos.shape[1:]:
        raise InvalidInput(
            f"yolo_segment: a head of {head.shape[0]} rows cannot hold 4 box rows, classes and "
            f"{protos.shape[0]} mask coefficients for prototypes of shape {protos.shape}"
        )
    return head, protos


def _box(values: np.ndarray) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in values)
    return x1, y1, x2, y2
