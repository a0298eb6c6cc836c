"""YOLOv8 detection postprocessing without torch, identical to ultralytics' predict path.

The postprocess service runs without torch but its detections must equal ``YOLO.predict``
exactly, so this mirrors ultralytics 8.4 ``non_max_suppression`` (with the torchvision NMS kernel
it picks on CPU) and ``scale_boxes``, float32 operation for float32 operation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from inferline.common.transform import ImageTransform

MAX_NMS = 30000  # ultralytics keeps only this many best candidates before NMS
MAX_WH = 7680  # ultralytics' per-class coordinate offset that turns class-aware NMS into one NMS


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS returning the same indices, in the same order, as ``torchvision.ops.nms``.

    torchvision's CPU kernel sorts by score with a stable sort (ties keep index order), computes
    IoU in float32 as ``inter / (area_i + area_j - inter)``, compares it with the threshold in
    double precision and lets only kept boxes suppress. Boxes that do not intersect can never
    suppress each other (for a threshold >= 0), so the boxes are first cut into groups that are
    separated along x (for YOLO, at least one per class thanks to the class offset); then every
    round keeps the best remaining box of each group and suppresses with it, all groups at once.
    That is torchvision's O(kept x candidates) work, vectorised across groups.
    """
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be within [0, 1], got {iou_threshold}")
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (boxes.shape[0],):
        raise ValueError(f"expected (N, 4) boxes and (N,) scores, got {boxes.shape} and {scores.shape}")

    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (np.ascontiguousarray(c) for c in boxes[order].T)
    areas = (x2 - x1) * (y2 - y1)

    # Positions (= score ranks) grouped by x-separated cluster, best first within each group.
    by_x1 = np.argsort(x1, kind="stable")
    starts_group = x1[by_x1][1:] >= np.maximum.accumulate(x2[by_x1])[:-1]
    group_of = np.empty(len(order), dtype=np.int64)
    group_of[by_x1] = np.concatenate(([0], np.cumsum(starts_group)))
    remaining = np.argsort(group_of, kind="stable")
    group = group_of[remaining]

    kept = []
    threshold = np.float64(iou_threshold)  # a float64 scalar makes NumPy compare in double, as torchvision
    while remaining.size:
        is_head = np.ones(remaining.size, dtype=bool)
        is_head[1:] = group[1:] != group[:-1]
        heads = remaining[is_head]
        kept.append(heads)
        head = heads[np.cumsum(is_head)[~is_head] - 1]
        rest = remaining[~is_head]
        inter = np.maximum(np.minimum(x2[head], x2[rest]) - np.maximum(x1[head], x1[rest]), np.float32(0)) * (
            np.maximum(np.minimum(y2[head], y2[rest]) - np.maximum(y1[head], y1[rest]), np.float32(0))
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            survives = ~(inter / (areas[head] + areas[rest] - inter) > threshold)
        remaining = rest[survives]
        group = group[~is_head][survives]
    return order[np.sort(np.concatenate(kept))] if kept else np.empty(0, dtype=np.int64)


def decode_detections(
    output: np.ndarray,
    *,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    classes: Sequence[int] | None = None,
    agnostic: bool = False,
) -> np.ndarray:
    """Turn one image's raw (4 + nc, N) head output into (K, 6) ``[x1, y1, x2, y2, score, class]`` rows.

    Mirrors ``ultralytics.utils.nms.non_max_suppression`` (single label per box): strict ``>``
    confidence filter on the best class (first index on ties), class filter, best ``MAX_NMS``
    candidates, class-aware NMS by offsetting boxes by ``class * MAX_WH`` in float32 (the offset's
    rounding is part of the IoU ultralytics sees), then ``max_det``. Coordinates stay in model-input
    pixels. One known gap: beyond ``MAX_NMS`` candidates ultralytics cuts with torch's unstable
    sort, so among exactly equal scores at the cut it may keep other boxes than this stable cut.
    """
    if not 0.0 <= conf <= 1.0:
        raise ValueError(f"conf must be within [0, 1], got {conf}")
    if output.ndim != 2 or output.shape[0] < 5:
        raise ValueError(f"expected a (4 + classes, anchors) output, got shape {output.shape}")
    candidates = np.asarray(output, dtype=np.float32).T
    class_scores = candidates[:, 4:]
    best = class_scores.argmax(axis=1) if len(candidates) else np.empty(0, dtype=np.int64)
    score = class_scores[np.arange(len(candidates)), best]
    keep = score > conf
    if classes is not None:
        keep &= np.isin(best, np.asarray(classes))
    xywh, score, label = candidates[keep, :4], score[keep], best[keep].astype(np.float32)

    if len(score) > MAX_NMS:
        top = np.argsort(-score, kind="stable")[:MAX_NMS]
        xywh, score, label = xywh[top], score[top], label[top]
    half_wh = xywh[:, 2:] / np.float32(2)
    xyxy = np.concatenate((xywh[:, :2] - half_wh, xywh[:, :2] + half_wh), axis=1)

    offset = label * np.float32(0 if agnostic else MAX_WH)
    picked = nms(xyxy + offset[:, None], score, iou)[:max_det]
    return np.column_stack((xyxy[picked], score[picked], label[picked])).astype(np.float32, copy=False)


def scale_boxes(boxes: np.ndarray, transform: ImageTransform) -> np.ndarray:
    """Recompute gain and padding from the shapes, as ultralytics' predict does, so boxes match it exactly."""
    # Not transform.scale_*/pad_*: ultralytics uses a per-axis gain round(side * gain) / side and a
    # centred padding derived from the shapes, which can differ slightly from the letterbox's own r.
    input_h, input_w = transform.input_height, transform.input_width
    orig_h, orig_w = transform.orig_height, transform.orig_width
    gain = min(input_h / orig_h, input_w / orig_w)
    new_h, new_w = max(round(orig_h * gain), 1), max(round(orig_w * gain), 1)
    gain_y, gain_x = new_h / orig_h, new_w / orig_w
    pad_x, pad_y = round((input_w - new_w) / 2 - 0.1), round((input_h - new_h) / 2 - 0.1)

    scaled = np.array(boxes, dtype=np.float32)  # a copy: ultralytics scales its tensor in place
    scaled[..., [0, 2]] = (scaled[..., [0, 2]] - np.float32(pad_x)) / np.float32(gain_x)
    scaled[..., [1, 3]] = (scaled[..., [1, 3]] - np.float32(pad_y)) / np.float32(gain_y)
    scaled[..., [0, 2]] = scaled[..., [0, 2]].clip(0, orig_w)
    scaled[..., [1, 3]] = scaled[..., [1, 3]].clip(0, orig_h)
    return scaled
