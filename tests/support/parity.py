"""Comparing detections with the reference library's, by the issue's rule.

Same count and labels; each reference box matched one-to-one by a box of the same label with
IoU >= 0.9 and a score within 0.03.
"""

from __future__ import annotations

from collections.abc import Sequence

IOU_MIN = 0.9
SCORE_TOLERANCE = 0.03

Row = tuple[str, float, tuple[float, float, float, float]]  # label, score, box


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mismatches(ours: Sequence[Row], reference: Sequence[Row]) -> list[str]:
    problems = []
    if len(ours) != len(reference):
        problems.append(f"{len(ours)} detections, reference has {len(reference)}")
    if sorted(r[0] for r in ours) != sorted(r[0] for r in reference):
        problems.append(f"labels {sorted(r[0] for r in ours)} != {sorted(r[0] for r in reference)}")
    unused = list(ours)
    for label, score, box in reference:
        candidates = [o for o in unused if o[0] == label and abs(o[1] - score) <= SCORE_TOLERANCE]
        best = max(candidates, key=lambda o: iou(o[2], box), default=None)
        if best is None or iou(best[2], box) < IOU_MIN:
            problems.append(f"no match for reference {label} {score:.3f} {tuple(round(v, 1) for v in box)}")
        else:
            unused.remove(best)
    return problems
