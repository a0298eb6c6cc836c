"""Candidate filters: shrink a detector's raw outputs before they cross the wire.

A YOLOv8n head at 640x480 answers 84 x 6300 float32 values per image (2 MB), nearly all of
them candidates that the postprocess NMS drops at once because their best class score is not
above the confidence threshold. Dropping exactly those columns here, with the same comparison
the NMS makes, leaves the detections unchanged and the response a few kB. Filters are keyed by
the model's postprocess recipe, because that names the output format they understand.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from inferline.common.registry import Registry

Outputs = Mapping[str, np.ndarray]
# (one item's outputs, min_score) -> the outputs with only the candidates that may survive.
CandidateFilter = Callable[[Outputs, float], dict[str, np.ndarray]]
FILTERS: Registry[CandidateFilter] = Registry("candidate filter")


@FILTERS.register("yolo_detect")
def yolo_candidates(outputs: Outputs, min_score: float) -> dict[str, np.ndarray]:
    """Keeps the anchors whose best class score is above ``min_score`` (a (4 + nc, N) head).

    The comparison is the one ``services/postprocess/yolo.decode_detections`` (and ultralytics'
    ``non_max_suppression``) applies first: ``max(class scores) > conf``, on float32 values. The
    kept columns stay in their order, so the NMS that follows sees the same candidates.
    """
    filtered = {}
    for name, output in outputs.items():
        if output.ndim != 2 or output.shape[0] < 5:
            filtered[name] = output
            continue
        keep = output[4:].max(axis=0) > min_score
        filtered[name] = np.ascontiguousarray(output[:, keep])
    return filtered


def candidate_filter(postprocess: str) -> CandidateFilter | None:
    return FILTERS.get(postprocess) if postprocess in FILTERS else None
