"""ONNX Runtime's OpenVINO execution provider against its CPU provider on the served YOLOv8n
export, side by side in one process (issue 17's list of forward-pass options).

The OpenVINO provider ships in its own wheel (``onnxruntime-openvino``), which replaces
``onnxruntime`` in a virtual environment, so this script needs only onnxruntime and numpy and
runs in the venv ``bench/openvino.sh`` makes; that script hands it the export and a letterboxed
scene that ``bench/ort_options.py --write-input`` prepared with inferline's own code. Both
providers run in that one wheel, so the CPU provider's row is the baseline of the same build.

Each variant runs for ``--duration`` seconds at one thread and at every core, the variants
interleaved over ``--rounds``; the figure is the median ms per pass. Every variant's output is
compared with the CPU provider's at one thread (max abs difference) and by what the pipeline
keeps of it: the anchors whose best class score passes 0.25, and the best class of each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

CPU, OPENVINO = "CPUExecutionProvider", "OpenVINOExecutionProvider"
CONFIDENCE = 0.25  # yolov8n's default (the model repository's postprocess conf)


@dataclass(frozen=True)
class Variant:
    name: str
    provider: str = CPU
    # OpenVINO's own options (its precision and thread count; threads are filled in per row).
    options: dict[str, str] = field(default_factory=dict)


VARIANTS = [
    Variant("CPU provider (as served: no spinning, no arena)"),
    # OpenVINO's CPU plugin picks its inference precision itself: bf16 where the CPU has it.
    Variant("OpenVINO provider, CPU, its default precision", OPENVINO, {"device_type": "CPU"}),
    # ACCURACY keeps the model's own precision (fp32) whatever the CPU offers.
    Variant("OpenVINO provider, CPU, precision ACCURACY", OPENVINO, {"device_type": "CPU", "precision": "ACCURACY"}),
]


def session(model: Path, variant: Variant, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if variant.provider == CPU:
        options.intra_op_num_threads = threads
        return ort.InferenceSession(str(model), sess_options=options, providers=[CPU])
    provider_options = {**variant.options, "num_of_threads": str(threads)}
    return ort.InferenceSession(str(model), sess_options=options, providers=[(variant.provider, provider_options), CPU])


def timed(sess: ort.InferenceSession, image: np.ndarray, seconds: float) -> list[float]:
    sess.run(None, {"images": image})  # warm: the first run compiles and allocates
    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        sess.run(None, {"images": image})
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def kept(output: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the pipeline keeps of one [1, 84, N] output: the anchors over the confidence, and
    each one's best class."""
    scores = output[0, 4:, :]
    best = scores.max(axis=0)
    anchors = np.flatnonzero(best > CONFIDENCE)
    return anchors, scores[:, anchors].argmax(axis=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--input", type=Path, required=True, help=".npy of the letterboxed uint8 scene")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True, help="writes <out>.json and <out>.md")
    parser.add_argument("--command", default="", help="the command line to record (bench/openvino.sh's)")
    args = parser.parse_args(argv)

    image = np.load(args.input)
    cores = len(os.sched_getaffinity(0))
    thread_counts = sorted({1, cores})
    variants = [v for v in VARIANTS if v.provider in ort.get_available_providers()]
    reference = session(args.model, VARIANTS[0], 1).run(None, {"images": image})[0]
    anchors, classes = kept(reference)
    samples: dict[tuple[str, int], list[float]] = {}
    checks: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for variant in variants:
            for threads in thread_counts:
                sess = session(args.model, variant, threads)
                samples.setdefault((variant.name, threads), []).extend(timed(sess, image, args.duration))
                out = sess.run(None, {"images": image})[0]
                mine, my_classes = kept(out)
                same = np.array_equal(mine, anchors) and np.array_equal(my_classes, classes)
                previous = checks.get(variant.name, {"max_abs_diff": 0.0, "same_kept": True})
                checks[variant.name] = {
                    "max_abs_diff": max(previous["max_abs_diff"], float(np.abs(out - reference).max())),
                    "same_kept": previous["same_kept"] and same,
                    "kept": int(len(mine)),
                }
    rows = [
        {"variant": v.name, "threads": t, "median_ms": round(statistics.median(samples[(v.name, t)]), 2),
         "runs": len(samples[(v.name, t)]), **checks[v.name]}
        for v in variants for t in thread_counts
    ]
    meta = {
        "command": args.command or "bench/openvino_ep.py",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "cores": cores,
        "input_shape": list(image.shape), "reference_kept": int(len(anchors)),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    base = {t: next(r["median_ms"] for r in rows if r["threads"] == t) for t in thread_counts}
    lines = [
        "# ONNX Runtime's OpenVINO provider on YOLOv8n (one forward pass, batch 1)", "",
        f"`{meta['command']}`, {meta['date']}, onnxruntime-openvino {meta['onnxruntime']} (both providers from "
        f"that wheel), {cores} cores, input {meta['input_shape']}, load average {meta['loadavg_at_end']} at the "
        "end. Medians of interleaved rounds; differences under ~5% are noise on this shared machine.", "",
        f"'same kept': the anchors over confidence {CONFIDENCE} and their best classes are the CPU provider's "
        f"({meta['reference_kept']} anchors); the max abs difference is over all 84 x N outputs.", "",
        "| variant | threads | median ms | vs CPU provider | runs | max abs diff | same kept |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['variant']} | {r['threads']} | {r['median_ms']:.1f} | {r['median_ms'] / base[r['threads']]:.2f}x "
        f"| {r['runs']} | {r['max_abs_diff']:.2g} | {'yes' if r['same_kept'] else 'no'} |"
        for r in rows
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
