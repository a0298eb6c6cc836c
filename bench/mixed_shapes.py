"""Images of different sizes in one dynamic batch: group by shape, or pad to a shared shape?

The inference stage groups queued items by input shape and runs one forward pass per group
(``services/inference/models.py``). The alternative pads every item of a batch to the largest
height and width (bottom and right, with the letterbox grey, so box coordinates keep their
origin) and runs one pass. This measures both on YOLOv8n letterboxed inputs of the shapes real
photos give (640x480 landscape, 480x640 portrait, 640x640 square, 640x384 wide), CPU seconds
per image and wall time per batch, for a batch of 8 with 1, 2 and 4 distinct shapes.

    .venv/bin/python bench/mixed_shapes.py --model-dir ../shared/models     # ~1 min
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
SHAPES = [(480, 640), (640, 480), (640, 640), (384, 640)]


def batch_of(shape_count: int, size: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (3, *SHAPES[i % shape_count]), dtype=np.uint8) for i in range(size)]


def grouped(run, items: list[np.ndarray]) -> None:
    groups: dict[tuple, list[np.ndarray]] = {}
    for item in items:
        groups.setdefault(item.shape, []).append(item)
    for same in groups.values():
        run(np.stack(same))


def padded(run, items: list[np.ndarray]) -> None:
    h = max(i.shape[1] for i in items)
    w = max(i.shape[2] for i in items)
    batch = np.full((len(items), 3, h, w), 114, dtype=np.uint8)
    for k, item in enumerate(items):
        batch[k, :, : item.shape[1], : item.shape[2]] = item
    run(batch)


def measure(strategy, run, items, repeats: int) -> tuple[float, float]:
    strategy(run, items)  # warm-up (shape-specialised kernels, allocator)
    cpu, wall = [], []
    for _ in range(repeats):
        c, t = time.process_time(), time.perf_counter()
        strategy(run, items)
        cpu.append((time.process_time() - c) * 1000 / len(items))
        wall.append((time.perf_counter() - t) * 1000)
    return float(np.median(cpu)), float(np.median(wall))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir",
                   default=os.environ.get("INFERLINE_MODEL_DIR", "../shared/models").split(os.pathsep)[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from inferline.services.inference.backends.ultralytics_loader import build_ultralytics_module  # noqa: PLC0415 - after torch.set_num_threads(1)

    module, _ = build_ultralytics_module(Path(args.model_dir) / "yolov8n.pt")

    def run(batch: np.ndarray) -> None:
        with torch.inference_mode():
            module(torch.from_numpy(batch).float() / 255)

    rows = []
    for shapes in (1, 2, 4):
        items = batch_of(shapes)
        for name, strategy in (("group by shape", grouped), ("pad to shared shape", padded)):
            cpu, wall = measure(strategy, run, items, args.repeats)
            rows.append({"distinct_shapes": shapes, "strategy": name, "cpu_ms_per_image": round(cpu, 1),
                         "wall_ms_per_batch": round(wall, 1)})
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python bench/mixed_shapes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "command": command.strip(),
            "model": "yolov8n (PyTorch, 1 thread)", "batch": 8, "shapes": SHAPES}
    (args.out / "mixed-shapes.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# Mixed shapes in one batch ({meta['date']})", "",
             f"Command: `{meta['command']}`; {meta['model']}, batch of 8; "
             f"shapes (H, W) used in turn: {SHAPES}. Medians of {args.repeats}.", "",
             "| distinct shapes | strategy | CPU ms / image | wall ms / batch |", "|---:|---|---:|---:|"]
    lines += [
        f"| {r['distinct_shapes']} | {r['strategy']} | {r['cpu_ms_per_image']} | {r['wall_ms_per_batch']} |"
        for r in rows
    ]
    (args.out / "mixed-shapes.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
