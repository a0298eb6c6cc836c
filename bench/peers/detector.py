"""The one YOLO detector every peer serves, so that only the serving framework differs.

Runs inside each peer's own venv (bench/peers/install.sh): OpenCV decodes the JPEG as inferline's
preprocess does, inferline's pure-numpy letterbox and YOLO decode (bit-identical to ultralytics'
predict path; reached through the venv's .pth link to this checkout) surround one ONNX Runtime
session on ``inferline export``'s graph (uint8 input, any H and W, /255 inside). The PyTorch
variant is ultralytics' own ``YOLO(weights).predict`` on the decoded images.

A batch is answered with one forward per distinct letterboxed shape: ultralytics' rect
letterbox gives every 640x480 scene the same 640x480 input, so a batch of them is one forward.
Settings come from the environment (``PEER_*``) because BentoML and KServe import the server
module themselves; the driver sets them.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

CONF, IOU, MAX_DET = 0.25, 0.7, 300  # inferline's defaults (model_repository/yolov8n/config.yaml)


@dataclass(frozen=True)
class PeerConfig:
    """What the driver chose for this peer: weights, backend, workers, batching, threads."""

    port: int
    weights: str
    backend: str  # "onnx" or "torch"
    workers: int
    max_batch: int
    batch_wait_ms: float
    threads: int  # ONNX Runtime intra-op threads per worker; 0: its default (one per core)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> PeerConfig:
        env = dict(os.environ if env is None else env)
        return cls(
            port=int(env["PEER_PORT"]),
            weights=env["PEER_WEIGHTS"],
            backend=env.get("PEER_BACKEND", "onnx"),
            workers=int(env.get("PEER_WORKERS", "2")),
            max_batch=int(env.get("PEER_MAX_BATCH", "8")),
            batch_wait_ms=float(env.get("PEER_BATCH_WAIT_MS", "10")),
            threads=int(env.get("PEER_THREADS", "0")),
        )


def decode(jpeg: bytes) -> np.ndarray:
    """HxWx3 BGR, as inferline's preprocess (and ultralytics' cv2.imread) reads it."""
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ValueError("not a decodable image")
    return image


def as_json(xyxy: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> dict[str, Any]:
    return {
        "boxes": np.asarray(xyxy, dtype=np.float64).round(4).tolist(),
        "scores": np.asarray(scores, dtype=np.float64).round(6).tolist(),
        "classes": [int(c) for c in classes],
    }


class OnnxDetector:
    """One ONNX Runtime session per worker process, built once at load."""

    def __init__(self, weights: str, threads: int = 0) -> None:
        import onnxruntime as ort  # noqa: PLC0415 - only the ONNX variant needs it

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(weights, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, jpegs: Sequence[bytes]) -> list[dict[str, Any]]:
        from inferline.services.postprocess.yolo import decode_detections, scale_boxes  # noqa: PLC0415
        from inferline.services.preprocess.letterbox import letterbox  # noqa: PLC0415

        boxed = [letterbox(decode(jpeg), (640, 640), stride=32, auto=True) for jpeg in jpegs]
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, (tensor, _) in enumerate(boxed):
            by_shape[tensor.shape].append(index)
        answers: list[dict[str, Any]] = [{} for _ in jpegs]
        for indices in by_shape.values():
            batch = np.stack([boxed[i][0] for i in indices])
            (output,) = self.session.run(None, {self.input: batch})
            for row, index in enumerate(indices):
                found = decode_detections(output[row], conf=CONF, iou=IOU, max_det=MAX_DET)
                answers[index] = as_json(scale_boxes(found[:, :4], boxed[index][1]), found[:, 4], found[:, 5])
        return answers


class TorchDetector:
    """ultralytics' own predict on the PyTorch weights, the images of a batch in one call."""

    def __init__(self, weights: str) -> None:
        from ultralytics import YOLO  # noqa: PLC0415 - only the PyTorch variant needs it

        self.model = YOLO(weights)

    def __call__(self, jpegs: Sequence[bytes]) -> list[dict[str, Any]]:
        results: Any = self.model.predict(
            [decode(jpeg) for jpeg in jpegs], conf=CONF, iou=IOU, max_det=MAX_DET, device="cpu", verbose=False
        )
        return [as_json(r.boxes.xyxy.numpy(), r.boxes.conf.numpy(), r.boxes.cls.numpy()) for r in results]


def load(config: PeerConfig) -> OnnxDetector | TorchDetector:
    if config.backend == "torch":
        return TorchDetector(config.weights)
    return OnnxDetector(config.weights, config.threads)
