"""bench/compare.py, the one benchmark of the pipeline against the libraries: its entry point
runs and writes what bench/README.md says, and its checks and tables say what they measure."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "compare.py"


def _compare():
    spec = importlib.util.spec_from_file_location("bench_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _row(contender: str, concurrency: int | None, stages: dict[str, float]) -> dict:
    return {
        "family": "yolo", "contender": contender, "concurrency": concurrency, "batch": 1, "img_per_s": 10.0,
        "p50_ms": stages["client"], "p95_ms": 1.0, "p99_ms": 1.0, "errors": 0,
        "stages_ms": {key: {"mean": value, "p50": value} for key, value in stages.items()},
    }


def test_parity_names_each_image_where_a_variant_finds_another_number_of_boxes():
    compare = _compare()
    counts = {
        compare.ULTRALYTICS: {"a.jpg": 2, "b.jpg": 0},
        "pipeline: same": {"a.jpg": 2, "b.jpg": 0},
        "pipeline: off": {"a.jpg": 3, "b.jpg": 0},
    }
    assert compare.parity(counts) == {
        "checked": True,
        "ultralytics": {"a.jpg": 2, "b.jpg": 0},
        "mismatches": {"pipeline: off": {"a.jpg": {"pipeline": 3, "ultralytics": 2}}},
    }
    assert compare.parity({"pipeline: same": {"a.jpg": 2}})["checked"] is False


def test_stage_table_splits_the_pipeline_s_latency_and_the_reference_s_call():
    compare = _compare()
    rows = [
        _row(compare.ULTRALYTICS, None, {"preprocess": 1.0, "inference": 90.0, "postprocess": 1.0, "client": 100.0}),
        _row("pipeline: x", 1,
             {"preprocess": 5.0, "inference": 100.0, "postprocess": 5.0, "total": 115.0, "client": 120.0}),
    ]
    table = compare.stage_table(rows)
    assert table[-2] == f"| {compare.ULTRALYTICS} | - | 1.0 | 90.0 | 1.0 | - | 8.0 | 100.0 |"
    assert table[-1] == "| pipeline: x | 1 | 5.0 | 100.0 | 5.0 | 5.0 | 5.0 | 120.0 |"


def test_rounds_become_one_row_per_contender_with_the_median_of_each_figure():
    compare = _compare()

    def measured(contender: str, round_: int, img_per_s: float, p50: float, errors: int = 0) -> dict:
        return {**_row(contender, 1, {"client": p50}), "img_per_s": img_per_s, "p50_ms": p50, "errors": errors,
                "cpu_ms_per_image": {"inference": img_per_s}, "round": round_}

    rows = compare.median_rows([
        measured("a", 1, 10.0, 100.0), measured("b", 1, 20.0, 50.0),
        measured("b", 2, 24.0, 40.0, errors=1), measured("a", 2, 12.0, 90.0),
        measured("a", 3, 30.0, 95.0), measured("b", 3, 22.0, 45.0),
    ])
    assert [r["contender"] for r in rows] == ["a", "b"]
    a, b = rows
    assert (a["img_per_s"], a["p50_ms"], a["errors"]) == (12.0, 95.0, 0)
    assert (b["img_per_s"], b["p50_ms"], b["errors"]) == (22.0, 45.0, 1)
    # The rest of a row is its median round's (by throughput), whole; the spread is kept.
    assert a["cpu_ms_per_image"] == {"inference": 12.0} and "round" not in a
    assert a["rounds_img_per_s"] == [10.0, 12.0, 30.0] and a["rounds_p50_ms"] == [100.0, 90.0, 95.0]
    # One round: the row as measured.
    (single,) = compare.median_rows([measured("c", 1, 5.0, 7.0)])
    assert single["img_per_s"] == 5.0 and "rounds_img_per_s" not in single


def test_faster_rcnn_and_clip_are_compared_at_saturation_and_at_one_client():
    compare = _compare()

    def row(contender: str, concurrency: int | None, img_per_s: float, p50: float) -> dict:
        return {**_row(contender, concurrency, {"client": p50}), "family": "frcnn", "img_per_s": img_per_s,
                "p50_ms": p50}

    summary = compare.summarise([
        row("torchvision loop, 1 image/call", None, 8.0, 120.0),
        row("pipeline: x", 1, 6.0, 150.0),
        row("pipeline: x", 8, 9.0, 800.0),
    ])
    assert summary["frcnn_vs_reference"] == 1.12  # the best pipeline row's throughput, 9 / 8
    assert summary["frcnn_c1_p50_vs_reference"] == 1.25  # one client's p50 against the loop's
    assert "clip_vs_reference" not in summary


@pytest.mark.slow
def test_compare_runs_one_pipeline_variant_and_writes_its_results(model_dir, data_dir, tmp_path):
    env = {**os.environ, "INFERLINE_MODEL_DIR": str(model_dir), "INFERLINE_ALLOW_DOWNLOAD": "false"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--images", str(data_dir), "--skip-references", "--only", "inprocess",
         "--duration", "1", "--warmup", "0.5", "--concurrency", "1", "--rounds", "2",
         "--out", str(tmp_path), "--stem", "smoke"],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    (row,) = result["rows"]  # two interleaved rounds, one median row
    assert row["contender"].startswith("pipeline: --inprocess") and row["concurrency"] == 1
    assert len(row["rounds_img_per_s"]) == 2 and [r["round"] for r in result["rounds"]] == [1, 2]
    assert row["img_per_s"] > 0 and row["errors"] == 0
    # Read from the controller's /metrics (the model runs in its process with --inprocess).
    assert 0 < row["model_busy"] <= 1
    assert {"preprocess", "inference", "postprocess", "total", "client"} <= set(row["stages_ms"])
    assert result["summary"]["detection_counts"]["checked"] is False  # no ultralytics in this run
    assert result["meta"]["commit"] and result["meta"]["versions"]["grpcio"]
    text = (tmp_path / "smoke.md").read_text()
    assert "Where the time goes" in text and row["contender"] in text
    assert (tmp_path / "smoke-latency-throughput.png").read_bytes()[:4] == b"\x89PNG"
