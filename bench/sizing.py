"""Replicas and $ per million images, derived from a benchmark's measured CPU cost per stage.

``docs/deployment.md``'s sizing table is this script's output for the committed
``bench/results/compare-cpu.json``, so the table changes only when a measurement does (a test
checks that the committed table is what the committed figures give)::

    .venv/bin/python bench/sizing.py                       # the table for docs/deployment.md
    .venv/bin/python bench/sizing.py --contender "ONNX Runtime, 2 instances" --concurrency 32

The figures are CPU milliseconds per answered image for each stage's process, measured by
``inferline bench`` from /proc over a closed-loop window at saturation (the same work whatever
else the machine runs), and each process's peak resident memory. The only assumptions are the
ones stated in the output: replicas are loaded to the HPA's 70 % CPU target, throughput grows
linearly with replicas (the stages share nothing), an inference replica has as many vCPUs as
the measuring machine had, at least two replicas per stage for availability, and the price per
vCPU-hour given. No GPU row: none has been measured (``bench/gpu.py`` measures one).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO / "bench" / "results" / "compare-cpu.json"
STAGES = ("controller", "preprocess", "inference", "postprocess")
LOADS = (100, 1_000, 10_000)
TARGET_UTILISATION = 0.7
MIN_REPLICAS = 2
# c7i.xlarge on demand, us-east-1 ($0.1785/h for 4 vCPU), as of mid-2025: re-check before use.
DEFAULT_VCPU_HOUR_USD = 0.0446


@dataclass(frozen=True)
class Measured:
    contender: str
    concurrency: int
    images_per_s: float
    cpu_ms: dict[str, float]
    rss_mb: dict[str, float]
    cores: int
    date: str
    command: str


def pick(results: dict[str, Any], contender: str, concurrency: int | None) -> Measured:
    """The YOLO four-service row whose contender contains ``contender`` (at ``concurrency``, or its
    busiest measured concurrency): the figures to size from."""
    rows = [
        r for r in results["rows"]
        if r.get("family") == "yolo" and contender in r.get("contender", "")
        and set(STAGES) <= set(r.get("cpu_ms_per_image") or {})
        and (concurrency is None or r.get("concurrency") == concurrency)
    ]
    if not rows:
        raise SystemExit(f"error: no four-service yolo row matching {contender!r} with per-stage CPU figures")
    row = max(rows, key=lambda r: (r.get("concurrency", 0), r.get("img_per_s", 0)))
    machine = str(results.get("meta", {}).get("machine", ""))  # "x86_64, 2 CPUs, CPython 3.11.7"
    cores = re.search(r"(\d+) CPUs?", machine)
    return Measured(
        contender=row["contender"],
        concurrency=int(row.get("concurrency", 0)),
        images_per_s=float(row["img_per_s"]),
        cpu_ms={s: float(row["cpu_ms_per_image"][s]) for s in STAGES},
        rss_mb={s: float(v) for s, v in (row.get("rss_mb") or {}).items() if s in STAGES},
        cores=int(cores.group(1)) if cores else 1,
        date=str(results.get("meta", {}).get("date", "")),
        command=str(results.get("meta", {}).get("command", "")),
    )


def replicas(load: float, cpu_ms: float, vcpus: int) -> int:
    """Replicas of ``vcpus`` each for ``load`` images/s at ``cpu_ms`` CPU per image, at 70 % CPU."""
    return max(MIN_REPLICAS, math.ceil(load * cpu_ms / 1000 / (vcpus * TARGET_UTILISATION)))


def table(measured: Measured, vcpu_hour_usd: float) -> str:
    vcpus = {"controller": 1, "preprocess": 1, "postprocess": 1, "inference": measured.cores}
    lines = [
        f"Measured: {measured.contender}, concurrency {measured.concurrency}, {measured.images_per_s:.2f} images/s "
        f"on {measured.cores} vCPUs ({measured.date}; `{measured.command}`).",
        "",
        "| stage | CPU ms / image (measured) | vCPUs per replica | images/s per replica at 70 % | peak RSS |",
        "|---|---:|---:|---:|---:|",
    ]
    for stage in STAGES:
        ms = measured.cpu_ms[stage]
        rss = measured.rss_mb.get(stage)
        lines.append(
            f"| {stage} | {ms:.1f} | {vcpus[stage]} | {1000 / ms * vcpus[stage] * TARGET_UTILISATION:.1f} | "
            f"{f'{rss:.0f} MB' if rss else '-'} |"
        )
    lines += ["", "| load | " + " | ".join(f"{s} replicas" for s in STAGES) + " | vCPUs in all |",
              "|---|" + "---:|" * (len(STAGES) + 1)]
    for load in LOADS:
        counts = {s: replicas(load, measured.cpu_ms[s], vcpus[s]) for s in STAGES}
        total = sum(counts[s] * vcpus[s] for s in STAGES)
        lines.append(f"| {load:,} images/s | " + " | ".join(str(counts[s]) for s in STAGES) + f" | {total:,} |")
    per_image_vcpu_s = sum(measured.cpu_ms.values()) / 1000
    model_share = measured.cpu_ms["inference"] / sum(measured.cpu_ms.values())
    per_million = per_image_vcpu_s * 1e6 / 3600 / TARGET_UTILISATION * vcpu_hour_usd
    lines += [
        "",
        f"CPU per image, all four stages: {per_image_vcpu_s * 1000:.1f} ms, of which the inference stage "
        f"{model_share:.0%}. At {TARGET_UTILISATION:.0%} utilisation and ${vcpu_hour_usd:.4f} per vCPU-hour: "
        f"**${per_million:.2f} per million images** on CPU (steady load, no idle capacity, storage or traffic).",
        "GPU: not measured (no GPU was lent to the measuring task); `bench/gpu.py --device cuda` measures it.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--contender", default="four services, as shipped",
                        help="a substring of the contender's label (default: the layout `inferline up` serves)")
    parser.add_argument("--concurrency", type=int, default=None, help="default: the busiest measured")
    parser.add_argument("--vcpu-hour-usd", type=float, default=DEFAULT_VCPU_HOUR_USD)
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    sys.stdout.write(table(pick(results, args.contender, args.concurrency), args.vcpu_hour_usd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
