"""What a user would otherwise run: the model libraries' own loops, measured like `inferline bench`.

One contender per process (``bench/compare.py`` starts each in a fresh interpreter, so one
library's threading choices never leak into another's), one image per call unless ``--batch``,
the library's defaults otherwise:

* ``ultralytics``  ``YOLO(weights).predict(source=paths, verbose=False, device="cpu")``; ultralytics
                   sets ``OMP_NUM_THREADS=1`` on import, so this is one torch thread, as users get it.
* ``ultralytics-onnx``  ``YOLO("yolov8n.onnx").predict`` one image per call: ultralytics' own ONNX
                   export of the same weights (``export(format="onnx")``, made once beside this
                   script's cache), run by its AutoBackend on ONNX Runtime (its fastest simple CPU setup).
* ``forward``      the model-forward limit's measure: inferline's served export of yolov8n on one
                   ONNX Runtime thread, letterboxed inputs prepared before timing; its
                   ``cpu_ms_per_image`` is the forward pass's CPU cost (compare.py: cores / that).
* ``torchvision``  ``fasterrcnn_mobilenet_v3_large_320_fpn`` with the state dict loaded
                   ``weights_only=True``; ``decode_image`` -> float -> ``model([image])``.
* ``open_clip``    ``create_model_and_transforms("ViT-B-32", pretrained=file)`` and its transform;
                   ``encode_image`` of the batch, L2-normalised.

Prints one JSON object: img_per_s, p50_ms, p95_ms, p99_ms, errors (0), rss_mb, torch_threads,
cpu_ms_per_image (CPU seconds of the process per image: robust to other load on the machine).
ultralytics also reports its own per-image ``Results.speed`` as ``stages_ms`` (preprocess,
inference, postprocess: mean and p50, beside the call's latency as ``client``) and, from one
more pass, the boxes it found per image (``detections``), which compare.py checks the pipeline
against.

    .venv/bin/python bench/reference.py ultralytics --images ../shared/data --duration 10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# The only weight files this script unpickles (ultralytics' .pt needs full unpickling).
KNOWN_YOLO = {
    "33f4216002cafa403a4588a328e025d1542f2acda1e632c2f7ba8a9a95359b3b": "stand-in (../shared/models/MANIFEST.md)",
    "f59b3d833e2ff32e194b5bb8e08d211dc7c5bdf144b90d2c8412c47ccfc83b36": "official ultralytics v8 release",
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def collect(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        found += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
    return found


def find(model_dirs: list[str], name: str) -> Path:
    for folder in model_dirs:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise SystemExit(f"error: {name} is in none of {model_dirs}; set INFERLINE_MODEL_DIR")


def ultralytics_runner(
    weights: Path, batch: int, device: str = "cpu", half: bool = False
) -> Callable[[list[Path]], Any]:
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest not in KNOWN_YOLO:
        raise SystemExit(
            f"error: refusing to unpickle {weights} (sha256 {digest} is neither the stand-in nor the release)"
        )
    from ultralytics import YOLO

    model = YOLO(str(weights))

    def run(paths: list[Path]) -> Any:
        # The Results: measure() reads their .speed, main() their boxes (the detection counts).
        return model.predict(source=[str(p) for p in paths], verbose=False, device=device, batch=batch, half=half)

    return run


def ultralytics_onnx_runner(
    weights: Path, batch: int, device: str = "cpu", half: bool = False
) -> Callable[[list[Path]], Any]:
    """ultralytics' ONNX export of ``weights``, made once into ~/.cache/inferline/reference."""
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest not in KNOWN_YOLO:
        raise SystemExit(f"error: refusing to unpickle {weights} (sha256 {digest} is neither stand-in nor release)")
    from ultralytics import YOLO

    cache = Path.home() / ".cache" / "inferline" / "reference"
    cache.mkdir(parents=True, exist_ok=True)
    onnx_file = cache / f"yolov8n-{digest[:16]}.onnx"
    if not onnx_file.is_file():
        source = cache / f"yolov8n-{digest[:16]}.pt"
        source.write_bytes(weights.read_bytes())
        # simplify=False: onnxslim is not installed here, and its absence would start a pip install.
        YOLO(str(source)).export(format="onnx", dynamic=True, simplify=False, verbose=False)
        source.unlink()
    model = YOLO(str(onnx_file), task="detect")

    def run(paths: list[Path]) -> Any:
        return model.predict(source=[str(p) for p in paths], verbose=False, device=device, batch=batch)

    return run


def forward_runner(
    weights: Path, batch: int, device: str = "cpu", half: bool = False
) -> Callable[[list[Path]], Any]:
    """One ONNX Runtime thread on inferline's own export: the model's forward pass alone."""
    import cv2
    import onnxruntime as ort

    from inferline.services.inference.export_cache import cached_export
    from inferline.services.inference.repository import BUILTIN_REPOSITORY, load_config
    from inferline.services.preprocess.letterbox import letterbox

    config = load_config(BUILTIN_REPOSITORY / "yolov8n" / "config.yaml")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    path = cached_export(config, weights, digest, Path.home() / ".cache" / "inferline" / "exports")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    prepared: dict[Path, np.ndarray] = {}

    def run(paths: list[Path]) -> None:
        for p in paths:
            if p not in prepared:
                image = cv2.imread(str(p))
                if image is None:
                    raise SystemExit(f"error: cannot read {p}")
                prepared[p] = letterbox(image, (640, 640), stride=32, auto=True)[0][None].copy()
            session.run(None, {"images": prepared[p]})

    return run


def torchvision_runner(
    weights: Path, _batch: int, device: str = "cpu", half: bool = False
) -> Callable[[list[Path]], None]:
    import torch
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=91)
    model.load_state_dict(torch.load(str(weights), map_location="cpu", weights_only=True))
    model.eval().to(device)

    def run(paths: list[Path]) -> None:
        with torch.inference_mode():
            model([decode_image(str(p), mode=ImageReadMode.RGB).to(device).float() / 255 for p in paths])
        _sync(device)

    return run


def open_clip_runner(
    weights: Path, _batch: int, device: str = "cpu", half: bool = False
) -> Callable[[list[Path]], None]:
    import open_clip
    import torch
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(
        "ViT-B-32", pretrained=str(weights), force_quick_gelu=True
    )
    model.eval().to(device)

    def run(paths: list[Path]) -> None:
        with torch.inference_mode():
            batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths]).to(device)
            torch.nn.functional.normalize(model.encode_image(batch), dim=-1).cpu()

    return run


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


RUNNERS = {
    "ultralytics": (ultralytics_runner, "yolov8n.pt"),
    "ultralytics-onnx": (ultralytics_onnx_runner, "yolov8n.pt"),
    "forward": (forward_runner, "yolov8n.pt"),
    "torchvision": (torchvision_runner, "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth"),
    "open_clip": (open_clip_runner, "open_clip_vit_b_32_openai.safetensors"),
}


def measure(run: Callable[[list[Path]], Any], images: list[Path], batch: int, duration: float, warmup: float) -> dict:
    groups = [[images[(i + k) % len(images)] for k in range(batch)] for i in range(0, len(images), batch)]
    latencies, done, index = [], 0, 0
    speeds: list[dict[str, float]] = []  # ultralytics' own per-image times
    start = time.perf_counter()
    while time.perf_counter() - start < warmup:
        run(groups[index % len(groups)])
        index += 1
    start, cpu_start = time.perf_counter(), time.process_time()
    while True:
        t0 = time.perf_counter()
        if t0 - start >= duration:
            break
        out = run(groups[index % len(groups)])
        index += 1
        latencies.append(time.perf_counter() - t0)
        done += batch
        speeds += [dict(r.speed) for r in out or () if hasattr(r, "speed")]
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    ms = np.asarray(latencies) * 1000
    report = {
        "img_per_s": round(done / elapsed, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "errors": 0,
        "requests": len(latencies),
        "batch": batch,
        "cpu_ms_per_image": {"reference": round(cpu * 1000 / done, 2)},
    }
    if speeds:
        columns = {key: [s[key] for s in speeds] for key in speeds[0]} | {"client": list(ms)}
        report["stages_ms"] = {
            key: {"mean": round(float(np.mean(v)), 2), "p50": round(float(np.median(v)), 2)}
            for key, v in columns.items()
        }
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("library", choices=sorted(RUNNERS))
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--model-dir", nargs="+", required=True, help="folders searched for the weights file")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--half", action="store_true", help="fp16 (ultralytics predict's half=True; GPU)")
    args = p.parse_args(argv)
    factory, file_name = RUNNERS[args.library]
    run = factory(find(args.model_dir, file_name), args.batch, args.device, args.half)
    images = collect(args.images)
    report = measure(run, images, args.batch, args.duration, args.warmup)
    if args.library.startswith("ultralytics"):
        report["detections"] = {p.name: len(run([p])[0].boxes) for p in images}
    import torch

    report["torch_threads"] = torch.get_num_threads()
    report["rss_mb"] = {"reference": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
