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
from typing import Any

import numpy as np

from inferline.common.recipes import Recipe
from inferline.common.registry import Registry

# One item's outputs: numpy arrays on the host, or torch tensors still on the model's device.
Outputs = Mapping[str, Any]
# (one item's outputs, min_score, **the config's params) -> the outputs with only the candidates that may survive.
CandidateFilter = Callable[..., dict[str, Any]]
# One item's filter with its request's min_score bound: what a forward pass applies per item.
Shrink = Callable[[Outputs], dict[str, Any]]
FILTERS: Registry[CandidateFilter] = Registry("candidate filter")


@FILTERS.register("yolo")
def yolo_candidates(
    outputs: Outputs, min_score: float, output: str = "output0", classes: int | None = None
) -> dict[str, Any]:
    """Keeps the anchors (columns) of the ``output`` head, (4 + classes + extra rows, N), whose
    best class score is above ``min_score``; ``classes``: the class rows after the 4 box rows
    (default: all the rest). Extra rows (a segmentation head's mask coefficients) are kept for
    the kept anchors and never compared; the other outputs (its prototypes) pass unchanged.

    The comparison is the one ``services/postprocess/yolo.decode_detections`` (and ultralytics'
    ``non_max_suppression``) applies first: ``max(class scores) > conf``, on float32 values. The
    kept columns stay in their order, so the NMS that follows sees the same candidates.

    The head may be a float32 torch tensor on the model's device: the same comparison runs
    there (a Python float against float32 values compares in float32 in both libraries), so
    only the kept columns are copied to the host, not the whole head (2 MB per image).
    """
    filtered = dict(outputs)
    head = outputs.get(output)
    if head is None or head.ndim != 2 or head.shape[0] < 5:
        return filtered
    scores = head[4 : 4 + classes] if classes else head[4:]
    if isinstance(head, np.ndarray):
        filtered[output] = np.ascontiguousarray(head[:, scores.max(axis=0) > min_score])
    else:
        filtered[output] = head[:, scores.amax(dim=0) > min_score].contiguous()
    return filtered


def candidate_filter(declared: Recipe | None) -> Callable[[Outputs, float], dict[str, Any]] | None:
    """The model config's filter with its params bound, or None when it declares none."""
    if declared is None:
        return None
    return partial(FILTERS.get(declared.name), **declared.params)


def shrink_for(declared: Recipe | None, min_score: float) -> Shrink | None:
    """One request's filter (its ``min_score`` bound), or None: no filter declared, or
    ``min_score`` 0 (every candidate may survive)."""
    if declared is None or min_score <= 0:
        return None
    return partial(FILTERS.get(declared.name), min_score=min_score, **declared.params)
