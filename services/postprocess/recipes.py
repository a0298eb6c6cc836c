"""Postprocessors by recipe name: raw model outputs of one image -> detections.

Model families beyond YOLO register theirs in ``*_recipes.py`` modules of this package.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from inferline.common.detections import Detection, DetectOptions
from inferline.common.errors import InvalidInput
from inferline.common.plugins import import_family_modules
from inferline.common.registry import Registry
from inferline.common.transform import ImageTransform
from inferline.services.postprocess.yolo import decode_detections, scale_boxes

Postprocessor = Callable[
    [Mapping[str, np.ndarray], ImageTransform, DetectOptions, Mapping[str, Any], Sequence[str]], list[Detection]
]
POSTPROCESSORS: Registry[Postprocessor] = Registry("postprocess recipe")


def load_families() -> list[str]:
    return import_family_modules(__package__, __file__, "_recipes")


def label_for(class_id: int, labels: Sequence[str]) -> str:
    return labels[class_id] if 0 <= class_id < len(labels) else str(class_id)


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
    conf, iou, max_det = options.resolved(params)
    rows = decode_detections(
        output.astype(np.float32, copy=False),
        conf=conf,
        iou=iou,
        max_det=max_det,
        classes=list(options.classes) or None,
        agnostic=options.agnostic,
    )
    boxes = scale_boxes(rows[:, :4], transform)
    return [
        Detection(label_for(int(c), labels), int(c), float(s), tuple(float(v) for v in box))
        for box, s, c in zip(boxes, rows[:, 4], rows[:, 5])
    ]
