"""Detections in the files other tools read: YOLO label lines, COCO results, and crops.

Each follows ultralytics' own writer so files made here drop into a YOLO workflow unchanged:
label lines as ``Results.save_txt`` writes them (``class xc yc w h [conf]``, normalised, ``%g``,
in float32 as its tensors are), COCO entries as its validator's ``pred_to_json`` (``bbox`` as
x, y, w, h in pixels rounded to 3 places, ``score`` to 5), crops as ``save_one_box`` cuts them
(the box grown by 2 % and 10 px, clipped to the image).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from inferline.common.detections import Detection

CROP_GAIN = 1.02
CROP_PAD = 10


def _xywh(detections: Sequence[Detection]) -> np.ndarray:
    """Centre x, centre y, width, height in float32, as ultralytics' ``xyxy2xywh``."""
    xyxy = np.array([d.box for d in detections], dtype=np.float32).reshape(-1, 4)
    xywh = np.empty_like(xyxy)
    xywh[:, 0] = (xyxy[:, 0] + xyxy[:, 2]) / np.float32(2)
    xywh[:, 1] = (xyxy[:, 1] + xyxy[:, 3]) / np.float32(2)
    xywh[:, 2] = xyxy[:, 2] - xyxy[:, 0]
    xywh[:, 3] = xyxy[:, 3] - xyxy[:, 1]
    return xywh


def yolo_lines(detections: Sequence[Detection], width: int, height: int, *, save_conf: bool = False) -> list[str]:
    """One ``class xc yc w h [conf]`` line per detection, normalised by the image's size."""
    xywhn = _xywh(detections)
    xywhn[:, [0, 2]] /= np.float32(width)
    xywhn[:, [1, 3]] /= np.float32(height)
    lines = []
    for detection, coords in zip(detections, xywhn.tolist(), strict=True):
        line: tuple[float, ...] = (detection.class_id, *coords) + ((float(np.float32(detection.score)),) * save_conf)
        lines.append(("%g " * len(line)).rstrip() % line)
    return lines


def image_id(stem: str) -> int | str:
    """COCO's image id for a file: its stem as a number when it is one (COCO's own file names),
    else the stem, as ultralytics' validator does."""
    return int(stem) if stem.isnumeric() else stem


def coco_entries(stem: str, file_name: str, detections: Sequence[Detection]) -> list[dict[str, Any]]:
    """COCO results (the ``loadRes`` list) for one image; ``category_id`` is the model's class id."""
    xywh = _xywh(detections)
    xywh[:, :2] -= xywh[:, 2:] / np.float32(2)
    return [
        {
            "image_id": image_id(stem),
            "file_name": file_name,
            "category_id": detection.class_id,
            "bbox": [round(v, 3) for v in box],
            "score": round(float(np.float32(detection.score)), 5),
        }
        for detection, box in zip(detections, xywh.tolist(), strict=True)
    ]


def crop(image: np.ndarray, detection: Detection, gain: float = CROP_GAIN, pad: int = CROP_PAD) -> np.ndarray:
    """The detection's box, grown by ``gain`` and ``pad`` pixels and clipped, cut from ``image``."""
    (xc, yc, w, h) = _xywh([detection])[0]
    w, h = w * np.float32(gain) + np.float32(pad), h * np.float32(gain) + np.float32(pad)
    x1, y1, x2, y2 = (int(v) for v in (xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2))
    height, width = image.shape[:2]
    x1, x2 = (min(max(v, 0), width) for v in (x1, x2))
    y1, y2 = (min(max(v, 0), height) for v in (y1, y2))
    return image[y1:y2, x1:x2]
