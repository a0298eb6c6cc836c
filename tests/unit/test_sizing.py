"""The sizing in docs/deployment.md is what bench/sizing.py derives from the committed measurement."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import sizing  # noqa: E402 - bench/ is not a package

ROW = {
    "family": "yolo", "contender": "pipeline: four services, as shipped", "concurrency": 32, "img_per_s": 20.0,
    "cpu_ms_per_image": {"controller": 5.0, "preprocess": 10.0, "inference": 100.0, "postprocess": 2.0},
    "rss_mb": {"controller": 100.0, "preprocess": 110.0, "inference": 900.0, "postprocess": 60.0},
}
RESULTS = {"meta": {"machine": "x86_64, 2 CPUs, CPython 3.11.7", "date": "d", "command": "c"}, "rows": [ROW]}


def test_replicas_carry_the_load_at_seventy_percent_and_never_fewer_than_two():
    assert sizing.replicas(100, 100.0, 2) == 8  # 100 img/s x 0.1 vCPU-s = 10 vCPU / (2 x 0.7) = 7.1
    assert sizing.replicas(1, 100.0, 2) == 2
    assert sizing.replicas(10_000, 5.0, 1) == 72  # 50 vCPU / 0.7


def test_the_table_uses_the_measured_cores_and_prices_the_cpu():
    text = sizing.table(sizing.pick(RESULTS, "as shipped", None), vcpu_hour_usd=0.05)
    assert "| inference | 100.0 | 2 | 14.0 | 900 MB |" in text
    assert "| 100 images/s | 2 | 2 | 8 | 2 | 22 |" in text
    # 0.117 vCPU-s per image x 1e6 / 3600 / 0.7 x $0.05
    assert "**$2.32 per million images**" in text


def test_a_contender_without_per_stage_cpu_figures_is_refused():
    with pytest.raises(SystemExit, match="no four-service yolo row"):
        sizing.pick(RESULTS, "ultralytics", None)


def test_docs_deployment_sizing_is_the_committed_measurement_s(capsys):
    docs = (REPO / "docs" / "deployment.md").read_text()
    found = re.search(r"<!-- sizing: bench/sizing.py (.*?) -->\n(.*?)<!-- /sizing -->", docs, re.S)
    assert found, "docs/deployment.md has no generated sizing block"
    sizing.main(shlex.split(found.group(1)))
    assert found.group(2) == capsys.readouterr().out, "stale: rerun bench/sizing.py and paste its output"
