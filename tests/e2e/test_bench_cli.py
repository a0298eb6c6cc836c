"""`inferline bench`: drives a running stack and reports what the issue asks, in text and JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from inferline.services import loadgen
from inferline.services.cli import main


def _bench(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["bench", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bench_json_reports_throughput_latency_errors_and_memory(stack, data_dir, capsys):
    code, out, _ = _bench(
        capsys, "--target", stack.controller, "--images", str(data_dir), "--concurrency", "4",
        "--duration", "2", "--warmup", "0.5", "--json", "--pid", f"controller={os.getpid()}",
    )
    assert code == 0
    report = json.loads(out)
    assert {"img_per_s", "p50_ms", "p95_ms", "p99_ms", "errors", "rss_mb"} <= set(report)
    assert report["img_per_s"] > 0 and report["errors"] == 0 and report["error_codes"] == {}
    assert 0 < report["p50_ms"] <= report["p95_ms"] <= report["p99_ms"]
    assert report["images"] == report["requests"] > 0 and report["concurrency"] == 4
    assert report["rss_mb"]["controller"] > 100  # this process holds the models
    assert report["cpu_ms_per_image"]["controller"] > 0  # ... and does all the work


def test_bench_counts_images_that_fail_as_errors_and_batches_requests(stack, data_dir, tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes((data_dir / "shapes_01.jpg").read_bytes())
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    code, out, _ = _bench(
        capsys, "--target", stack.controller, "--images", str(tmp_path), "--batch", "2",
        "--concurrency", "2", "--duration", "1.5", "--warmup", "0", "--json", "--pid", f"controller={os.getpid()}",
    )
    report = json.loads(out)
    assert code == 0 and report["batch"] == 2
    assert report["errors"] == report["requests"] > 0  # one broken image in every request
    assert report["images"] == report["requests"]


def test_bench_text_output_and_clip_embeddings(stack, data_dir, capsys):
    code, out, _ = _bench(
        capsys, "--target", stack.controller, "--model", "clip-vit-b-32", "--images", str(data_dir / "shapes_01.jpg"),
        "--concurrency", "2", "--duration", "1", "--warmup", "0", "--pid", f"controller={os.getpid()}",
    )
    assert code == 0
    assert "Embed clip-vit-b-32" in out and "images/s" in out and "p99" in out and "peak RSS" in out


def test_bench_names_what_is_wrong(stack, data_dir, capsys):
    code, _, err = _bench(capsys, "--target", stack.controller, "--model", "nope", "--images", str(data_dir),
                          "--duration", "1")
    assert code == 1 and "NOT_FOUND" in err and "yolov8n" in err
    code, _, err = _bench(capsys, "--target", stack.controller, "--images", str(data_dir), "--concurrency", "0")
    assert code == 1 and "--concurrency" in err
    code, _, err = _bench(capsys, "--target", stack.controller, "--images", str(data_dir), "--pid", "controller")
    assert code == 1 and "STAGE=PID" in err
    code, _, err = _bench(capsys, "--target", stack.controller, "--model", "clip-vit-b-32-text", "--images",
                          str(data_dir), "--duration", "1", "--warmup", "0")
    assert code == 1 and "no image was answered" in err  # a text tower takes no images


def test_stage_processes_are_found_by_their_command_lines(tmp_path: Path):
    def process(pid: int, *argv: str, hwm_kb: int = 2048) -> None:
        folder = tmp_path / str(pid)
        folder.mkdir()
        (folder / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        (folder / "status").write_text(f"Name:\tpython\nVmHWM:\t{hwm_kb} kB\nVmRSS:\t1 kB\n")

    process(10, "/venv/bin/python", "-m", "inferline.services.cli", "serve", "inference", hwm_kb=1024 * 1500)
    process(11, "/venv/bin/inferline", "serve", "controller")
    process(12, "/usr/bin/python", "serve.py", "controller")  # not ours
    process(13, "bash", "-c", "sleep 1")
    assert loadgen.find_stage_pids(tmp_path) == {"inference": 10, "controller": 11}
    assert loadgen.peak_rss_mb(10, tmp_path) == pytest.approx(1500)
    assert loadgen.peak_rss_mb(99, tmp_path) is None


def test_cpu_seconds_come_from_utime_and_stime(tmp_path: Path):
    folder = tmp_path / "42"
    folder.mkdir()
    ticks = os.sysconf("SC_CLK_TCK")
    # comm may hold spaces and parentheses; fields after it: state ppid ... utime(14) stime(15)
    (folder / "stat").write_text(f"42 (python (x) y) S 1 2 3 4 5 6 7 8 9 10 {3 * ticks} {ticks} 0 0\n")
    assert loadgen.cpu_seconds({"inference": 42, "gone": 43}, tmp_path) == {"inference": 4.0}
    assert loadgen.cpu_seconds({"me": os.getpid()})["me"] > 0
