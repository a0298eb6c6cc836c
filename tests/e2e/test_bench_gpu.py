"""bench/gpu.py, the GPU benchmark: it configures every GPU option for a GPU run, and the same
command runs end to end on CPU as a smoke test of the script (its figures mean nothing there)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from inferline.common.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu.py"


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_a_gpu_run_turns_on_every_gpu_option_and_fp16(tmp_path: Path):
    bench = _gpu_bench()
    repo = bench.repository(tmp_path, "cuda")
    for model in (bench.YOLO, bench.CLIP):
        config = yaml.safe_load((repo / model / "config.yaml").read_text())
        assert (config["precision"], config["max_batch_size"]) == ("fp16", 64)
        assert config["dynamic_batching"]["max_queue_size"] >= 256 * 16
    settings = Settings.from_env(bench.pipeline_env("cuda", repo))
    assert not settings.admission
    assert (settings.device, settings.preprocess_device, settings.postprocess_device) == ("cuda",) * 3
    assert settings.models == (bench.YOLO, bench.CLIP) and settings.model_repository == repo


def test_a_cpu_run_keeps_the_cpu_defaults():
    bench = _gpu_bench()
    assert bench.repository(Path("unused"), "cpu") == bench.BUILTIN_REPOSITORY
    settings = Settings.from_env(bench.pipeline_env("cpu", bench.BUILTIN_REPOSITORY))
    assert (settings.preprocess_device, settings.postprocess_device) == ("opencv", "cpu")
    args = bench.parse_args(["--device", "cpu"])
    assert (args.concurrency, args.batch) == ([4], 2)
    assert bench.parse_args([]).concurrency == [64, 256]


@pytest.mark.slow
def test_the_cpu_smoke_run_writes_both_models_figures_with_the_command(tmp_path: Path, yolo_weights, clip_weights):
    command = [
        sys.executable, str(SCRIPT), "--device", "cpu", "--duration", "3", "--warmup", "1",
        "--concurrency", "1", "--batch", "1", "--reference-batch", "2", "--out", str(tmp_path),
    ]
    # The CLIP stand-in may live in the tests' cache (.cache/standins), not beside yolov8n.pt.
    model_dir = os.pathsep.join(dict.fromkeys(str(p.parent) for p in (yolo_weights, clip_weights)))
    subprocess.run(command, check=True, cwd=REPO, timeout=900, env={**os.environ, "INFERLINE_MODEL_DIR": model_dir})
    document = json.loads((tmp_path / "gpu-cpu.json").read_text())
    assert document["meta"]["command"].startswith("python bench/gpu.py --device cpu --duration 3")
    rows = {(r["model"], r["contender"]): r for r in document["rows"]}
    assert {m for m, _ in rows} == {"yolov8n", "clip-vit-b-32"} and len(rows) == 4
    assert all(r["img_per_s"] > 0 and r["errors"] == 0 for r in rows.values())
    table = (tmp_path / "gpu-cpu.md").read_text()
    assert "python bench/gpu.py --device cpu" in table and "say nothing about the GPU" in table
