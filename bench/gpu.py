"""The GPU path end to end (issue 16): JPEG bytes in, boxes out, at saturation, beside ultralytics.

One run, one machine state, side by side:

* ``ultralytics predict, batched`` (fp16 on a GPU): bench/reference.py in a fresh process;
* ``open_clip, batched``: ViT-B-32 ``encode_image`` over batches, the same way;
* the four-service pipeline with every GPU option this repository has turned on for a GPU run
  (``INFERLINE_DEVICE``, nvJPEG decode and letterbox in preprocess, ``precision: fp16`` for
  YOLOv8n and CLIP, device NMS in postprocess), driven by ``inferline bench``'s load generator
  (services/loadgen.py) at each ``--concurrency`` with ``--batch`` images per request: YOLOv8n
  Detect (images/s, boxes back) and CLIP ViT-B-32 Embed (image embeddings/s).

On a CPU (``--device cpu``) the same script runs the CPU equivalents (OpenCV decode, fp32, numpy
NMS) as a smoke test of the script itself; its figures say nothing about a GPU.

Writes ``<out>/gpu-<device>.json`` and ``.md`` with the command, the machine and the versions.

    python bench/gpu.py --device cuda                       # the GPU run (docs/gpu.md)
    python bench/gpu.py --device cpu --duration 3 --concurrency 2 --batch 2   # smoke
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from inferline.common.settings import Settings
from inferline.services import loadgen
from inferline.services.client import collect_images
from inferline.services.inference.repository import BUILTIN_REPOSITORY
from inferline.services.stack import START_ORDER, LocalStack, free_port_env

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/runs.py, also when loaded by path
from runs import REPO, SHARED, clean_env, commit, versions
from runs import reference as library_loop

YOLO, CLIP = "yolov8n", "clip-vit-b-32"
# The targets, per GPU, for the table's last column.
TARGET_IMAGES_PER_S = 10_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda[:N] for the GPU run, cpu for a smoke run")
    p.add_argument("--images", nargs="+", default=[str(SHARED / "data")], help="JPEG files or folders")
    p.add_argument("--duration", type=float, default=20.0, help="seconds measured per contender")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds not counted before each")
    p.add_argument("--concurrency", type=int, nargs="+", default=None, help="default: 64 256 (GPU), 4 (CPU)")
    p.add_argument("--batch", type=int, default=None, help="images per request; default 16 (GPU), 2 (CPU)")
    p.add_argument("--reference-batch", type=int, default=None, help="ultralytics/open_clip; 64 (GPU), 4 (CPU)")
    p.add_argument("--skip-references", action="store_true", help="the pipeline only")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    gpu = args.device != "cpu"
    args.concurrency = args.concurrency or ([64, 256] if gpu else [4])
    args.batch = args.batch or (16 if gpu else 2)
    args.reference_batch = args.reference_batch or (64 if gpu else 4)
    return args


def reference(library: str, images: list[str], args: argparse.Namespace) -> dict:
    """One library's own batched loop in a fresh process (bench/reference.py), fp16 on a GPU."""
    half = args.device != "cpu" and library == "ultralytics"  # open_clip: fp32
    report = library_loop(library, images, batch=args.reference_batch, duration=args.duration,
                          warmup=args.warmup, device=args.device, half=half)
    report.pop("detections", None)
    return report


def repository(root: Path, device: str) -> Path:
    """The built-in repository; on a GPU YOLOv8n and CLIP's image tower in fp16, batches of up to
    64 (the reference's) and queues deep enough for 256 clients of 16 images each."""
    if device == "cpu":
        return BUILTIN_REPOSITORY
    repo = root / "repo"
    shutil.copytree(BUILTIN_REPOSITORY, repo)
    for model in (YOLO, CLIP):
        path = repo / model / "config.yaml"
        config = yaml.safe_load(path.read_text())
        config["precision"] = "fp16"
        config["max_batch_size"] = 64
        config["dynamic_batching"] = {**config.get("dynamic_batching", {}), "max_queue_size": 16384}
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    return repo


def pipeline_env(device: str, repo: Path) -> dict[str, str]:
    """The stack's environment: every GPU option on for a GPU, the CPU defaults for a smoke run."""
    env = free_port_env(clean_env())
    gpu = device != "cpu"
    env.update(
        INFERLINE_DEVICE=device,
        INFERLINE_PREPROCESS_DEVICE=device if gpu else "opencv",
        INFERLINE_POSTPROCESS_DEVICE=device if gpu else "cpu",
        INFERLINE_MODEL_REPOSITORY=str(repo),
        INFERLINE_MODELS=f"{YOLO},{CLIP}",
        INFERLINE_LOG_LEVEL="WARNING",
        # Saturation needs every request admitted: this run measures throughput, not shedding.
        INFERLINE_ADMISSION="false",
    )
    return env


@contextmanager
def stack(env: dict[str, str]) -> Iterator[LocalStack]:
    running = LocalStack(Settings.from_env(env), env=env, stages=START_ORDER)
    running.start(timeout=600)
    try:
        yield running
    finally:
        running.stop()


def drive(running: LocalStack, model: str, paths: list[Path], concurrency: int, args: argparse.Namespace) -> dict:
    pids = {stage: p.pid for stage, p in running.processes.items()}
    result = loadgen.run(
        running.controller_target,
        model,
        paths,
        concurrency=concurrency,
        batch=args.batch,
        duration=args.duration,
        warmup=args.warmup,
        timeout=120,
        pids=pids,
    )
    return result.to_dict()


def environment(device: str) -> dict:
    """Machine, GPU, versions, commit: what a reader needs to rerun and compare."""
    gpu = "none"
    if device != "cpu":
        import torch  # noqa: PLC0415 - the GPU's name, on a GPU run only

        gpu = torch.cuda.get_device_name(torch.device(device))
    packages = ("torch", "torchvision", "ultralytics", "open-clip-torch", "onnxruntime", "onnxruntime-gpu", "grpcio")
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "gpu": gpu,
        "versions": versions(packages),
        "commit": commit(),
    }


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# GPU path, {meta['device']} ({meta['date']})",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; GPU: {meta['gpu']}; commit {meta['commit']}  ",
        f"{meta['images']} images, {meta['duration_s']} s measured after {meta['warmup_s']} s per contender; "
        "images/s counts images answered without error.",
        "",
        "| model | contender | concurrency | images/request | images/s | p50 ms | p95 ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['contender']} | {r['concurrency'] or ''} | {r['batch']} | {r['img_per_s']:.1f} "
            f"| {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['errors']} |"
        )
    lines += ["", f"The issue's target on one GPU: {TARGET_IMAGES_PER_S} images/s for each model.", ""]
    if meta["device"] == "cpu":
        lines += ["A CPU smoke run of the script: these figures say nothing about the GPU path.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = collect_images(args.images)
    images = [str(p) for p in paths]
    rows: list[dict] = []

    def record(model: str, contender: str, concurrency: int | None, batch: int, report: dict) -> None:
        rows.append({"model": model, "contender": contender, "concurrency": concurrency, "batch": batch, **report})
        print(
            f"{model:14} {contender:44} c={concurrency!s:4} b={batch:<3} {report['img_per_s']:10.1f} img/s "
            f"p50 {report['p50_ms']:8.1f} ms  errors {report['errors']}",
            flush=True,
        )

    fp16 = ", fp16" if args.device != "cpu" else ""
    if not args.skip_references:
        batch = args.reference_batch
        record(YOLO, f"ultralytics predict, batched{fp16}", None, batch, reference("ultralytics", images, args))
        record(CLIP, "open_clip encode_image, batched (fp32)", None, batch, reference("open_clip", images, args))
    with tempfile.TemporaryDirectory(prefix="inferline-gpu-") as tmp:
        with stack(pipeline_env(args.device, repository(Path(tmp), args.device))) as running:
            for model in (YOLO, CLIP):
                for concurrency in args.concurrency:
                    report = drive(running, model, paths, concurrency, args)
                    record(model, f"four services{fp16}", concurrency, args.batch, report)

    arguments = argv if argv is not None else sys.argv[1:]
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": ("python bench/gpu.py " + " ".join(shlex.quote(a) for a in arguments)).strip(),
        "device": args.device,
        **environment(args.device),
        "images": len(images),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
    }
    stem = f"gpu-{args.device.replace(':', '')}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(meta, rows))
    print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
