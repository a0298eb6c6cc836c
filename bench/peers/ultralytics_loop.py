"""ultralytics' own in-process loop: the reference detections and the reference speed.

Run by run.py in a fresh interpreter of inferline's venv (one library's threading choices never
leak into another contender's). ``YOLO(weights).predict(path)`` one image per call, at inferline's
default thresholds, on the PyTorch weights or ultralytics' own ONNX export of them. Prints one
JSON object: ``detections`` (per image file name: boxes, scores, classes, the peers' answer
shape) and, with ``--duration``, ``img_per_s``, ``p50_ms``, ``p95_ms``, ``p99_ms``,
``cpu_ms_per_image``.

    .venv/bin/python bench/peers/ultralytics_loop.py yolov8n.pt ../shared/data/*.jpg --duration 5
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

CONF, IOU, MAX_DET = 0.25, 0.7, 300  # inferline's defaults, as bench/peers/detector.py


def detections(model: Any, path: Path) -> dict[str, Any]:
    (result,) = model.predict(str(path), conf=CONF, iou=IOU, max_det=MAX_DET, device="cpu", verbose=False)
    boxes = result.boxes
    return {
        "boxes": boxes.xyxy.numpy().astype(np.float64).round(4).tolist(),
        "scores": boxes.conf.numpy().astype(np.float64).round(6).tolist(),
        "classes": [int(c) for c in boxes.cls.numpy()],
    }


def measure(model: Any, images: list[Path], duration: float, warmup: float) -> dict[str, float]:
    """Closed loop of one: the next image as soon as the last answered, as a c=1 client."""
    end_warmup = time.perf_counter() + warmup
    while time.perf_counter() < end_warmup:
        detections(model, images[0])
    latencies, i = [], 0
    cpu0, start = _cpu_s(), time.perf_counter()
    while time.perf_counter() - start < duration:
        t0 = time.perf_counter()
        detections(model, images[i % len(images)])
        latencies.append(time.perf_counter() - t0)
        i += 1
    elapsed, cpu = time.perf_counter() - start, _cpu_s() - cpu0
    ms = np.asarray(latencies) * 1000
    return {
        "img_per_s": round(len(latencies) / elapsed, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "requests": len(latencies),
        "errors": 0,
        "cpu_ms_per_image": round(1000 * cpu / len(latencies), 1),
    }


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", type=Path, help="yolov8n.pt or ultralytics' yolov8n.onnx export")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--duration", type=float, default=0.0, help="seconds measured; 0: detections only")
    p.add_argument("--warmup", type=float, default=3.0)
    args = p.parse_args(argv)

    from ultralytics import YOLO  # noqa: PLC0415 - after argument parsing: its import is slow

    model = YOLO(str(args.weights), task="detect")
    out: dict[str, Any] = {"detections": {path.name: detections(model, path) for path in args.images}}
    if args.duration > 0:
        out.update(measure(model, args.images, args.duration, args.warmup))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
