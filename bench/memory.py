"""Resident memory of each stage with every model of the repository loaded.

Starts the four stages as local processes (as `inferline up` does) on free ports, sends one
Detect per detector and one Classify and one Embed per zero-shot model, then reads each
process's VmRSS and VmHWM (peak) from /proc. Writes bench/results/memory.{json,md}.

    INFERLINE_MODEL_DIR=../shared/models:.cache/standins .venv/bin/python bench/memory.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

from inferline.common.api import ClassifyRequest, DetectRequest, EmbedRequest
from inferline.common.recipes import Recipe
from inferline.common.settings import STAGES, Settings
from inferline.common.tasks import tasks_for
from inferline.services.client import Client, image_inputs
from inferline.services.stack import LocalStack, free_port_env


def _memory_mib(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss_mib": round(fields["VmRSS"], 1), "peak_rss_mib": round(fields["VmHWM"], 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "data" / "shapes_01.jpg")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()

    env = free_port_env()
    env.setdefault("INFERLINE_LOG_LEVEL", "WARNING")
    settings = Settings.from_env(env)
    image = image_inputs([args.image])
    with LocalStack(settings, env=env) as stack, Client(stack.controller_target, settings, timeout=120) as client:
        models = client.models(timeout=30)
        for model in models:
            if model.task in tasks_for("Detect"):
                client.detect(DetectRequest(model.name, image))
            elif Recipe.from_proto(model.postprocess).params.get("text_model"):
                client.classify(ClassifyRequest(model.name, image, ("a circle", "a square")))
                client.embed(EmbedRequest(model.name, image, ("a circle",)))
        memory = {stage: _memory_mib(stack.processes[stage].pid) for stage in STAGES}
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "models": [m.name for m in models],
        "memory": memory,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Resident memory per stage, every model loaded",
        "",
        f"Measured {result['date']} on {result['machine']} with {', '.join(result['models'])} loaded, after one",
        "request per model. Command: "
        "`INFERLINE_MODEL_DIR=../shared/models:.cache/standins .venv/bin/python bench/memory.py`.",
        "",
        "| stage | resident (MiB) | peak resident (MiB) |",
        "|---|---:|---:|",
        *(f"| {stage} | {m['rss_mib']} | {m['peak_rss_mib']} |" for stage, m in memory.items()),
        f"| **total** | {round(sum(m['rss_mib'] for m in memory.values()), 1)} | |",
        "",
    ]
    (args.out / "memory.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
