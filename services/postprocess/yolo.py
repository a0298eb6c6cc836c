"""YOLOv8 detection postprocessing without torch, identical to ultralytics' predict path.

The postprocess service runs without torch but its detections must equal ``YOLO.predict``
exactly, so this mirrors ultralytics 8.4 ``non_max_suppression`` (with the torchvision NMS kernel
it picks on CPU) and ``scale_boxes``, float32 operation for float32 operation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from inferline.common.transform import ImageTransform

MAX_NMS = 30000  # ultralytics keeps only this many best candidates before NMS
MAX_WH = 7680  # ultralytics' per-class coordinate offset that turns class-aware NMS into one NMS
_PAIR_BUDGET = 1 << 26  # never list more overlapping pairs than this (memory and time)
_PAIR_CHUNK = 1 << 20  # pairs examined per vectorised step, which bounds the memory used
_PROBE_ROUNDS = 8  # plain greedy rounds between two looks at whether listing pairs is cheaper


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS returning the same indices, in the same order, as ``torchvision.ops.nms``.

    torchvision's CPU kernel sorts by score with a stable sort (ties keep index order), computes
    IoU in float32 as ``inter / (area_i + area_j - inter)``, compares it with the threshold in
    double precision and lets only kept boxes suppress; that is O(kept x candidates). Two
    vectorised ways give the same answer faster: plain greedy rounds (the best box suppresses the
    rest) thin dense piles quickly, while a sort-and-sweep lists the few overlapping pairs of
    sparse sets (for YOLO, the class offset keeps classes apart) and replays the greedy pass on
    them. Rounds run until listing is the cheaper way to finish.
    """
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be within [0, 1], got {iou_threshold}")
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (boxes.shape[0],):
        raise ValueError(f"expected (N, 4) boxes and (N,) scores, got {boxes.shape} and {scores.shape}")

    order = np.argsort(-scores, kind="stable")
    ranked = _Boxes(boxes[order].T, iou_threshold)  # box i is the i-th best
    undecided = np.arange(len(order))
    kept = [undecided[:0]]
    sweep = None
    while undecided.size:
        size_before = len(undecided)
        for _ in range(_PROBE_ROUNDS):  # once nothing is left, these are no-ops on empty arrays
            best, rest = undecided[:1], undecided[1:]
            kept.append(best)
            undecided = rest[~ranked.suppresses(best, rest)]
        if not undecided.size:
            break
        thinned_per_round = (size_before - len(undecided)) / _PROBE_ROUNDS
        if sweep is None or 4 * len(undecided) <= 3 * len(sweep.by_start):  # a sweep costs sorts
            sweep = ranked.sweep(undecided)
        # sweep.pairs only shrinks as boxes go, so it bounds the pairs left to list.
        if sweep.pairs <= min(_PAIR_BUDGET, len(undecided) ** 2 / thinned_per_round):
            if len(sweep.by_start) != len(undecided):
                sweep = ranked.sweep(undecided)
            kept.append(_greedy(undecided, *ranked.suppressing_pairs(sweep)))
            break
    return order[np.sort(np.concatenate(kept))]


class _Sweep(NamedTuple):
    """Boxes sorted by start along one axis: by_start[k] can only overlap by_start[k + 1 : k + 1 + runs[k]]."""

    pairs: int
    by_start: np.ndarray
    runs: np.ndarray


class _Boxes:
    """xyxy boxes as columns, with torchvision's float32 IoU arithmetic."""

    def __init__(self, xyxy: np.ndarray, iou_threshold: float, areas: np.ndarray | None = None) -> None:
        self.x1, self.y1, self.x2, self.y2 = xyxy
        self.areas = (self.x2 - self.x1) * (self.y2 - self.y1) if areas is None else areas
        self.iou_threshold = iou_threshold

    def take(self, index: np.ndarray) -> _Boxes:
        """A reordered copy, so that a sweep reads its boxes nearly sequentially (cache-friendly gathers)."""
        xyxy = np.stack((self.x1, self.y1, self.x2, self.y2))[:, index]
        return _Boxes(xyxy, self.iou_threshold, self.areas[index])

    def suppresses(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Whether IoU(a, b) > threshold, bit for bit as torchvision decides it."""
        zero = np.float32(0)
        width = np.maximum(np.minimum(self.x2[a], self.x2[b]) - np.maximum(self.x1[a], self.x1[b]), zero)
        height = np.maximum(np.minimum(self.y2[a], self.y2[b]) - np.maximum(self.y1[a], self.y1[b]), zero)
        inter = width * height
        with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 for empty boxes is NaN: no suppression
            # A float64 threshold makes NumPy compare in double, as torchvision's C++ does.
            return inter / (self.areas[a] + self.areas[b] - inter) > np.float64(self.iou_threshold)

    def sweep(self, members: np.ndarray) -> _Sweep:
        """Sorted by start, a box can only overlap the boxes that follow it and start before it
        ends: a contiguous run. Of the two axes, the one with fewer such pairs is used."""
        sweeps = []
        for start, end in ((self.x1, self.x2), (self.y1, self.y2)):
            by_start = members[np.argsort(start[members], kind="stable")]
            run_end = np.searchsorted(start[by_start], end[by_start], side="left")
            runs = np.maximum(run_end - np.arange(1, len(by_start) + 1), 0)
            sweeps.append(_Sweep(int(runs.sum()), by_start, runs))
        return min(sweeps, key=lambda sweep: sweep.pairs)

    def suppressing_pairs(self, sweep: _Sweep) -> tuple[np.ndarray, np.ndarray]:
        """(better, worse) pairs, by rank, whose IoU is above the threshold."""
        swept = self.take(sweep.by_start)
        pairs_before = np.cumsum(sweep.runs) - sweep.runs
        # Chunks of whole runs, about _PAIR_CHUNK pairs each (a longer run is one chunk on its own).
        bounds = np.unique(np.searchsorted(pairs_before, np.arange(0, sweep.pairs, _PAIR_CHUNK), side="right") - 1)
        better, worse = [sweep.by_start[:0]], [sweep.by_start[:0]]
        for lo, hi in zip(bounds, np.append(bounds[1:], len(sweep.runs)), strict=False):  # no pairs: no bounds
            first = np.repeat(np.arange(lo, hi), sweep.runs[lo:hi])
            second = first + 1 + np.arange(len(first)) - (pairs_before[first] - pairs_before[lo])
            hit = swept.suppresses(first, second)
            a, b = sweep.by_start[first[hit]], sweep.by_start[second[hit]]
            better.append(np.minimum(a, b))
            worse.append(np.maximum(a, b))
        return np.concatenate(better), np.concatenate(worse)


def _greedy(members: np.ndarray, better: np.ndarray, worse: np.ndarray) -> np.ndarray:
    """Replay the greedy pass on the suppressing pairs: a box is kept unless a kept better box hits it."""
    by_better = np.lexsort((worse, better))
    better, worse = better[by_better], worse[by_better]
    suppressed = np.zeros(members.max() + 1, dtype=bool)
    heads = np.flatnonzero(np.diff(better, prepend=-1))
    for head, stop in zip(heads, np.append(heads[1:], len(better)), strict=False):  # no pairs: no heads
        if not suppressed[better[head]]:
            suppressed[worse[head:stop]] = True
    return members[~suppressed[members]]


def decode_detections(
    output: np.ndarray,
    *,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    classes: Sequence[int] | None = None,
    agnostic: bool = False,
    nc: int = 0,
) -> np.ndarray:
    """Turn one image's raw (4 + nc, N) head output into (K, 6) ``[x1, y1, x2, y2, score, class]`` rows.

    ``nc`` is the number of class rows (0: every row after the 4 box rows). Rows after the class
    rows (a segmentation head's mask coefficients) only ride along: each kept row carries them
    after its 6 values, as ultralytics' ``nc`` argument does.

    Mirrors ``ultralytics.utils.nms.non_max_suppression`` (single label per box): strict ``>``
    confidence filter on the best class (first index on ties), class filter, best ``MAX_NMS``
    candidates, class-aware NMS by offsetting boxes by ``class * MAX_WH`` in float32 (the offset's
    rounding is part of the IoU ultralytics sees), then ``max_det``. Coordinates stay in model-input
    pixels. One known gap: beyond ``MAX_NMS`` candidates ultralytics cuts with torch's unstable
    sort, which may reorder boxes of exactly equal score, so ties there can come out differently.
    """
    if not 0.0 <= conf <= 1.0:
        raise ValueError(f"conf must be within [0, 1], got {conf}")
    if output.ndim != 2 or output.shape[0] < 5:
        raise ValueError(f"expected a (4 + classes, anchors) output, got shape {output.shape}")
    nc = nc or output.shape[0] - 4
    if not 0 < nc <= output.shape[0] - 4:
        raise ValueError(f"nc must be within [1, {output.shape[0] - 4}] for a head of {output.shape[0]} rows, got {nc}")
    candidates = np.asarray(output, dtype=np.float32).T
    class_scores = candidates[:, 4 : 4 + nc]
    best = class_scores.argmax(axis=1) if len(candidates) else np.empty(0, dtype=np.int64)
    score = class_scores[np.arange(len(candidates)), best]
    keep = score > conf
    if classes is not None:
        keep &= np.isin(best, np.asarray(classes))
    xywh, score, label = candidates[keep, :4], score[keep], best[keep].astype(np.float32)
    extra = candidates[keep, 4 + nc :]

    if len(score) > MAX_NMS:
        top = np.argsort(-score, kind="stable")[:MAX_NMS]
        xywh, score, label, extra = xywh[top], score[top], label[top], extra[top]
    half_wh = xywh[:, 2:] / np.float32(2)
    xyxy = np.concatenate((xywh[:, :2] - half_wh, xywh[:, :2] + half_wh), axis=1)

    offset = label * np.float32(0 if agnostic else MAX_WH)
    picked = nms(xyxy + offset[:, None], score, iou)[:max_det]
    return np.column_stack((xyxy[picked], score[picked], label[picked], extra[picked])).astype(np.float32, copy=False)


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
    if scaled.shape[-1:] != (4,):
        raise ValueError(f"expected (K, 4) xyxy boxes, got shape {scaled.shape}")
    scaled[..., [0, 2]] = (scaled[..., [0, 2]] - np.float32(pad_x)) / np.float32(gain_x)
    scaled[..., [1, 3]] = (scaled[..., [1, 3]] - np.float32(pad_y)) / np.float32(gain_y)
    scaled[..., [0, 2]] = scaled[..., [0, 2]].clip(0, orig_w)
    scaled[..., [1, 3]] = scaled[..., [1, 3]].clip(0, orig_h)
    return scaled
