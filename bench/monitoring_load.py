"""The monitoring picture of docs/monitoring.md, drawn from real Prometheus data of a load run.

Starts the four stages (YOLOv8n only) and a real Prometheus scraping them every second with
the real rule file, drives Detect load in phases (1, then 4, then 2 concurrent clients, with
some unknown-model calls and broken images), then asks Prometheus for every panel query of
deploy/grafana/dashboards/inferline.json over the run and draws each panel with matplotlib.
Grafana is not installable here; the queries and panel titles are the dashboard's own.

    .venv/bin/python bench/monitoring_load.py [--seconds 90] [--out docs/monitoring-dashboard.png]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.observability.harness import (  # noqa: E402 - the repo root goes on the path first
    DASHBOARD,
    Prometheus,
    Stages,
    install_prometheus,
    stage_env,
    wait_for,
    with_all_selected,
)
from tests.observability.test_prometheus import drive_load  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="load duration, split in three phases")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "monitoring-dashboard.png")
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()

    model_dirs = os.environ.get("INFERLINE_MODEL_DIR", str(REPO.parent / "shared" / "models")).split(os.pathsep)
    images = [p.read_bytes() for p in sorted(args.images.glob("*.jpg"))]
    if not images:
        parser.error(f"no .jpg images in {args.images}; pass --images DIR")
    tools = install_prometheus()
    with tempfile.TemporaryDirectory(prefix="inferline-monitoring-") as tmp:
        work = Path(tmp)
        stages = Stages.start(stage_env(Path(model_dirs[0]), Path(model_dirs[-1]), INFERLINE_MODELS="yolov8n"),
                              work / "logs")
        prometheus = None
        try:
            prometheus = Prometheus(tools, stages, work)
            wait_for(lambda: len(prometheus.query('up{job=~"inferline-.*"} == 1')) == 4, 30, "all four targets up")
            started = time.time()
            phases = []
            for workers in (1, 4, 2):
                counts = drive_load(stages.target("controller"), images, args.seconds / 3, workers=workers)
                phases.append({"clients": workers, **counts})
                print(f"phase with {workers} client(s): {counts}", flush=True)
            time.sleep(5)
            ended = time.time()
            panels = collect(prometheus, started, ended)
        finally:
            if prometheus is not None:
                prometheus.stop()
            stages.stop()
    draw(panels, args.out, started, phases)
    print(f"wrote {args.out}")
    return 0


def collect(prometheus: Prometheus, start: float, end: float) -> list[dict]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = []
    for panel in dashboard["panels"]:
        series = []
        for target in panel["targets"]:
            for result in prometheus.query_range(with_all_selected(target["expr"]), start, end, step=2):
                legend = target.get("legendFormat", "")
                for key, value in result["metric"].items():
                    legend = legend.replace("{{" + key + "}}", value)
                legend = legend.replace("{{", "").replace("}}", "")
                points = [(float(t) - start, float(v)) for t, v in result["values"]]
                series.append({"legend": legend, "points": points})
        panels.append({"title": panel["title"], "unit": panel["fieldConfig"]["defaults"].get("unit", ""),
                       "series": series})
    return panels


def draw(panels: list[dict], out: Path, started: float, phases: list[dict]) -> None:
    import matplotlib  # noqa: PLC0415 - not a dependency: only the picture needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after matplotlib.use

    columns = 3
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.6 * rows))
    for axis, panel in zip(axes.flat, panels, strict=False):
        axis.set_title(panel["title"], fontsize=9)
        axis.tick_params(labelsize=7)
        if not panel["series"]:
            axis.text(0.5, 0.5, "no data\n(no GPU on this machine)", ha="center", va="center", transform=axis.transAxes)
        for series in panel["series"][:10]:
            xs, ys = zip(*series["points"], strict=True)
            axis.plot(xs, ys, label=series["legend"][:40], linewidth=1)
        if panel["series"]:
            axis.legend(fontsize=6, loc="upper left")
        axis.set_xlabel("seconds into the run", fontsize=7)
        axis.set_ylabel(panel["unit"], fontsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    when = dt.datetime.fromtimestamp(started, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{p['clients']} client(s)" for p in phases)
    figure.suptitle(
        f"inferline dashboard panels, rendered with matplotlib from Prometheus range queries "
        f"({when}, {platform.machine()} CPU, YOLOv8n stand-in; load phases: {load})",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)


if __name__ == "__main__":
    raise SystemExit(main())
