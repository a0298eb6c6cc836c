"""What a second OpenMP team costs a torch pass on the CPU (services/inference/cpu_threads.py).

Faster R-CNN (torchvision, the stand-in weights), one shared scene per pass, timed on the main
thread in a fresh process per mode, the modes alternated over ``--rounds``:

* ``one team``: only the main thread has ever run torch;
* ``second team alive``: another thread ran one pass first and is still alive (what the
  inference stage had: the thread that loaded the model, then the model's pass thread);
* ``second team gone``: that thread ran one pass and exited before the timing.

Each row is the median ms per pass and the voluntary context switches per pass (getrusage):
libgomp stops spinning at its barriers once the process holds more OpenMP threads than cores,
and every barrier then sleeps in the kernel.

    .venv/bin/python bench/openmp_teams.py --passes 30 --rounds 3

writes ``bench/results/openmp-teams.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/runs.py
from runs import REPO, SHARED, model_dirs

RESULTS = REPO / "bench" / "results"
MODES = {"one": "one team", "stays": "second team alive", "exits": "second team gone"}
WEIGHTS = "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth"


def measure(mode: str, passes: int) -> dict:
    """One mode, in this process (run in a fresh one by ``main``)."""
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=91).eval()
    found = next((Path(d) / WEIGHTS for d in model_dirs() if (Path(d) / WEIGHTS).is_file()), None)
    if found is not None:
        model.load_state_dict(torch.load(str(found), map_location="cpu", weights_only=True))
    scenes = sorted((SHARED / "data").glob("*.jpg")) or sorted((REPO / "tests" / "data").glob("*.jpg"))
    images = [decode_image(str(p), mode=ImageReadMode.RGB).float() / 255 for p in scenes[:8]]

    def one(index: int = 0) -> None:
        with torch.inference_mode():
            model([images[index % len(images)]])

    if mode in ("stays", "exits"):
        ran, hold = threading.Event(), threading.Event()

        def other() -> None:
            one()
            ran.set()
            if mode == "stays":
                hold.wait()

        thread = threading.Thread(target=other, daemon=True)
        thread.start()
        ran.wait()
        if mode == "exits":
            thread.join()
    one()  # this thread's own team, and a warm model
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for index in range(passes):
        started = time.perf_counter()
        one(index)
        times.append((time.perf_counter() - started) * 1000)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"median_ms": round(statistics.median(times), 1),
            "switches_per_pass": round((after.ru_nvcsw - before.ru_nvcsw) / passes, 1),
            "torch_threads": torch.get_num_threads(), "weights": found is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)  # one measurement, here
    parser.add_argument("--out", type=Path, default=RESULTS / "openmp-teams")
    args = parser.parse_args(argv)
    if args.mode:
        print(json.dumps(measure(args.mode, args.passes)))
        return 0
    measured: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in MODES if round_ % 2 == 0 else reversed(MODES):
            done = subprocess.run([sys.executable, __file__, "--mode", mode, "--passes", str(args.passes)],
                                  capture_output=True, text=True, check=True)
            measured[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = [{"mode": MODES[mode], "median_ms": statistics.median(r["median_ms"] for r in runs),
             "switches_per_pass": statistics.median(r["switches_per_pass"] for r in runs),
             "rounds_ms": [r["median_ms"] for r in runs], "torch_threads": runs[0]["torch_threads"]}
            for mode, runs in measured.items()]
    meta = {"command": "python bench/openmp_teams.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cores": len(os.sched_getaffinity(0)), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "weights": measured["one"][0]["weights"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    base = rows[0]["median_ms"]
    lines = [
        "# A second OpenMP team and a torch pass on the CPU (Faster R-CNN, one image)", "",
        f"`{meta['command'].strip()}`, {meta['date']}, {meta['cores']} cores, torch intra-op threads "
        f"{rows[0]['torch_threads']}, load average {meta['loadavg_at_end']} at the end; a fresh process per "
        "measure, modes alternated, medians of the rounds.", "",
        "| main thread's passes | median ms | vs one team | voluntary context switches per pass | rounds (ms) |",
        "|---|---:|---:|---:|---|",
    ]
    lines += [f"| {r['mode']} | {r['median_ms']:.1f} | {r['median_ms'] / base:.2f}x | {r['switches_per_pass']:.1f} "
              f"| {', '.join(f'{x:.1f}' for x in r['rounds_ms'])} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
