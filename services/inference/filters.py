"""Candidate filters: shrink a detector's raw outputs before they cross the wire.

A YOLOv8n head at 640x480 answers 84 x 6300 float32 values per image (2 MB), nearly all of
them candidates that the postprocess NMS drops at once because their best class score is not
above the confidence threshold. Dropping exactly those columns here, with the same comparison
the NMS makes, leaves the detections unchanged and the response a few kB. A model's config
declares its filter (``candidate_filter: {name, params}``), because only the model knows which
output holds the candidates and which of its rows are class scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import numpy as np

from inferline.common.recipes import Recipe
from inferline.common.registry import Registry

Outputs = Mapping[str, np.ndarray]
# (one item's outputs, min_score, **the config's params) -> the outputs with only the candidates that may survive.
CandidateFilter = Callable[..., dict[str, np.ndarray]]
FILTERS: Registry[CandidateFilter] = Registry("candidate filter")


@FILTERS.register("yolo")
def yolo_candidates(
    outputs: Outputs, min_score: float, output: str = "output0", classes: int | None = None
) -> dict[str, np.ndarray]:
    """Keeps the anchors (columns) of the ``output`` head, (4 + classes + extra rows, N), whose
    best class score is above ``min_score``; ``classes``: the class rows after the 4 box rows
    (default: all the rest). Extra rows (a segmentation head's mask coefficients) are kept for
    the kept anchors and never compared; the other outputs (its prototypes) pass unchanged.

    The comparison is the one ``services/postprocess/yolo.decode_detections`` (and ultralytics'
    ``non_max_suppression``) applies first: ``max(class scores) > conf``, on float32 values. The
    kept columns stay in their order, so the NMS that follows sees the same candidates.
    """
    filtered = dict(outputs)
    head = outputs.get(output)
    if head is None or head.ndim != 2 or head.shape[0] < 5:
        return filtered
    scores = head[4 : 4 + classes] if classes else head[4:]
    filtered[output] = np.ascontiguousarray(head[:, scores.max(axis=0) > min_score])
    return filtered


def candidate_filter(declared: Recipe | None) -> Callable[[Outputs, float], dict[str, np.ndarray]] | None:
    """The model config's filter with its params bound, or None when it declares none."""
    if declared is None:
        return None
    return partial(FILTERS.get(declared.name), **declared.params)
