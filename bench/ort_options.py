"""ONNX Runtime's session options on the served YOLOv8n export, side by side in one run (issue 17).

Each variant is one session option changed from the backend's defaults (optimisation ``all``,
spinning off, CPU memory arena off, plain ``run``), timed on the same letterboxed scene for
``--duration`` seconds at 1 thread and at every core, in turn, interleaved over ``--rounds``
so the noise of a shared machine falls on all variants alike; the figure is the median ms per
forward pass. Every variant's output is compared to the default's (max abs difference): an
option that changes results is not a speed-up. The OpenVINO execution provider is measured when
this onnxruntime build has it.

    INFERLINE_MODEL_DIR=../shared/models .venv/bin/python bench/ort_options.py --duration 5

writes ``bench/results/ort-options.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

from inferline.common.settings import Settings
from inferline.services.inference.export_cache import cached_export
from inferline.services.inference.repository import BUILTIN_REPOSITORY, load_config
from inferline.services.inference.weights import resolve_weights
from inferline.services.preprocess.letterbox import letterbox

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SCENES = REPO.parent / "shared" / "data"


@dataclass(frozen=True)
class Variant:
    name: str
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    spinning: bool = False
    arena: bool = False
    io_binding: bool = False
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    entries: dict[str, str] = field(default_factory=dict)


VARIANTS = [
    Variant("default (optimisation all, no spinning, no arena, run)"),
    Variant("optimisation basic", level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
    Variant("optimisation extended", level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
    Variant("thread spinning on", spinning=True),
    Variant("memory arena on (ORT's own default)", arena=True),
    Variant("IO binding (CPU OrtValues)", io_binding=True),
    Variant("spinning and arena on (ORT's own defaults, ultralytics' session)", spinning=True, arena=True),
]
if "OpenVINOExecutionProvider" in ort.get_available_providers():
    VARIANTS.append(Variant("OpenVINO EP", providers=("OpenVINOExecutionProvider", "CPUExecutionProvider")))


def session(path: Path, variant: Variant, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = variant.level
    options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = variant.arena
    flag = "1" if variant.spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", flag)
    options.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return ort.InferenceSession(str(path), sess_options=options, providers=list(variant.providers))


def forward(sess: ort.InferenceSession, variant: Variant, image: np.ndarray) -> np.ndarray:
    if not variant.io_binding:
        return sess.run(["output0"], {"images": image})[0]
    binding = sess.io_binding()
    binding.bind_ortvalue_input("images", ort.OrtValue.ortvalue_from_numpy(image))
    binding.bind_output("output0")
    sess.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0]


def timed(
    sess: ort.InferenceSession, variant: Variant, image: np.ndarray, seconds: float, gap_s: float = 0.0
) -> list[float]:
    forward(sess, variant, image)  # warm: the first run allocates
    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        forward(sess, variant, image)
        samples.append((time.perf_counter() - started) * 1000)
        if gap_s:
            # The rest of a request at one client (decode, NMS, the hops): the pass's threads go
            # idle (or spin) and its caches cool, as between a served model's passes.
            time.sleep(gap_s)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per variant, thread count and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--image", type=Path, default=None, help="default: the first shared scene, else bus.jpg")
    parser.add_argument("--gap-ms", type=float, default=0.0,
                        help="idle time between passes (one client's requests spend ~15 ms outside the model)")
    parser.add_argument("--out", type=Path, default=RESULTS / "ort-options")
    parser.add_argument("--write-input", type=Path, default=None, metavar="DIR",
                        help="write the export's path (model.txt) and the letterboxed scene (input.npy) into "
                             "DIR and stop: for bench/openvino.sh, whose venv has another onnxruntime")
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    config = load_config(BUILTIN_REPOSITORY / "yolov8n" / "config.yaml")
    weights = resolve_weights(config.weights, model=config.name, model_dir=settings.model_dir,
                              allow_download=settings.allow_download, trusted=settings.trusted_weights)
    path = cached_export(config, weights.path, weights.sha256,
                         settings.export_cache_dir or Path.home() / ".cache" / "inferline" / "exports")
    source = args.image or next(iter(sorted(SCENES.glob("*.jpg"))), None)
    if source is None:
        import ultralytics  # noqa: PLC0415 - only for its sample image

        source = Path(ultralytics.__file__).parent / "assets" / "bus.jpg"
    decoded = cv2.imread(str(source))
    if decoded is None:
        raise SystemExit(f"error: cannot read {source}")
    image = letterbox(decoded, (640, 640), stride=32, auto=True)[0][None].copy()
    if args.write_input is not None:
        args.write_input.mkdir(parents=True, exist_ok=True)
        np.save(args.write_input / "input.npy", image)
        (args.write_input / "model.txt").write_text(str(path))
        return 0
    cores = len(os.sched_getaffinity(0))
    thread_counts = sorted({1, cores})

    reference = forward(session(path, VARIANTS[0], 1), VARIANTS[0], image)
    samples: dict[tuple[str, int], list[float]] = {}
    difference: dict[str, float] = {}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            for threads in thread_counts:
                sess = session(path, variant, threads)
                runs = timed(sess, variant, image, args.duration, args.gap_ms / 1000)
                samples.setdefault((variant.name, threads), []).extend(runs)
                out = forward(sess, variant, image)
                difference[variant.name] = max(difference.get(variant.name, 0.0),
                                               float(np.abs(out - reference).max()))
    rows: list[dict[str, Any]] = [
        {"variant": v.name, "threads": t, "median_ms": round(statistics.median(samples[(v.name, t)]), 2),
         "runs": len(samples[(v.name, t)]), "max_abs_diff": difference[v.name]}
        for v in VARIANTS for t in thread_counts
    ]
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
        "cpu": platform.processor() or platform.machine(), "cores": cores,
        "image": source.name, "input_shape": list(image.shape), "gap_ms": args.gap_ms,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    base: dict[int, float] = {t: next(r["median_ms"] for r in rows if r["threads"] == t) for t in thread_counts}
    lines = [
        "# ONNX Runtime options on YOLOv8n (one forward pass, batch 1)", "",
        f"`{meta['command']}`, {meta['date']}, onnxruntime {meta['onnxruntime']}, {cores} cores, "
        f"input {meta['input_shape']}, {args.gap_ms:g} ms idle between passes, load average "
        f"{meta['loadavg_at_end']} at the end. Medians; a shared, "
        "noisy machine: differences under ~5% are noise.", "",
        "| variant | threads | median ms | vs default | runs | max abs diff to default |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['variant']} | {r['threads']} | {r['median_ms']:.1f} | {r['median_ms'] / base[r['threads']]:.2f}x "
        f"| {r['runs']} | {r['max_abs_diff']:.2g} |"
        for r in rows
    ]
    if "OpenVINOExecutionProvider" not in ort.get_available_providers():
        lines += ["", "OpenVINO EP: not in this onnxruntime build (onnxruntime-openvino is a separate wheel); "
                  "not measured."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
