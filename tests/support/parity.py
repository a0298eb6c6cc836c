"""Comparing detections with the reference library's.

First the matching rule: same count and labels; each reference box matched one-to-one by a box
of the same label with IoU >= 0.9 and a score within 0.03. Then how exact the matches are, which
is what the README claims: every box coordinate within ``BOX_ATOL_PX`` and every score within
``SCORE_ATOL`` of the reference (measured on the stand-ins: 6.1e-5 px, which is float32's spacing
at 512-1024 px, and 5.4e-7; the bounds leave room for another machine's thread count, which
changes the order convolutions sum in).
"""

from __future__ import annotations

from collections.abc import Sequence

IOU_MIN = 0.9
SCORE_TOLERANCE = 0.03
BOX_ATOL_PX = 1e-3
SCORE_ATOL = 1e-5

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


def worst_differences(ours: Sequence[Row], reference: Sequence[Row]) -> tuple[float, float]:
    """The largest absolute difference of a box coordinate (pixels) and of a score between each
    reference detection and its match (same label, best IoU): how exact the parity is, beyond
    the matching rule above. Call after ``mismatches`` found none."""
    worst_box, worst_score = 0.0, 0.0
    unused = list(ours)
    for label, score, box in reference:
        best = max((o for o in unused if o[0] == label), key=lambda o: iou(o[2], box))
        unused.remove(best)
        worst_box = max(worst_box, *(abs(a - b) for a, b in zip(best[2], box, strict=True)))
        worst_score = max(worst_score, abs(best[1] - score))
    return worst_box, worst_score


def inexact(ours: Sequence[Row], reference: Sequence[Row]) -> list[str]:
    """What is further from the reference than the README's claim (boxes to BOX_ATOL_PX, scores
    to SCORE_ATOL); empty when exact to those bounds. Call after ``mismatches`` found none."""
    box, score = worst_differences(ours, reference)
    problems = []
    if box > BOX_ATOL_PX:
        problems.append(f"a box coordinate is {box:.2e} px from the reference (claimed: {BOX_ATOL_PX})")
    if score > SCORE_ATOL:
        problems.append(f"a score is {score:.2e} from the reference (claimed: {SCORE_ATOL})")
    return problems
