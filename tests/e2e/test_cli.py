"""The `inferline` command as a user runs it: `up`, then `detect` in every format, then Ctrl-C."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import onnxruntime
import pytest

from inferline.services.stack import free_port_env, wait_http_ready, wait_serving

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "inferline.services.cli"]


@pytest.fixture(scope="module")
def running_up(model_dir, clip_weights, tmp_path_factory):
    env = free_port_env()
    env.update(
        INFERLINE_MODEL_DIR=os.pathsep.join((str(model_dir), str(clip_weights.parent))),
        INFERLINE_ALLOW_DOWNLOAD="false",
        INFERLINE_GRACE_PERIOD_S="2",
    )
    ports = {
        stage: int(env[f"INFERLINE_{stage.upper()}_PORT"])
        for stage in ("controller", "preprocess", "inference", "postprocess")
    }
    log = tmp_path_factory.mktemp("up") / "up.log"
    with log.open("w") as sink:
        process = subprocess.Popen([*CLI, "up"], env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        for port in ports.values():
            wait_serving(f"localhost:{port}", timeout=180, alive=lambda: process.poll() is None)
        wait_http_ready(f"http://localhost:{env['INFERLINE_GATEWAY_PORT']}/readyz", 60, lambda: process.poll() is None)
    except Exception as exc:
        process.kill()
        raise AssertionError(log.read_text()) from exc
    yield process, f"localhost:{ports['controller']}", log
    if process.poll() is None:
        process.kill()


def _detect(target: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "detect", "--target", target, *args], capture_output=True, text=True, timeout=120)


def test_detect_prints_json_in_the_documented_shape(running_up, data_dir):
    _, target, _ = running_up
    done = _detect(target, str(data_dir / "shapes_01.jpg"), str(data_dir / "shapes_02.jpg"))
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)["results"]
    assert [Path(r["image"]).name for r in results] == ["shapes_01.jpg", "shapes_02.jpg"]
    first = results[0]
    assert (first["width"], first["height"]) == (640, 480)
    assert set(first["detections"][0]) == {"label", "class_id", "score", "box"}
    assert len(first["detections"][0]["box"]) == 4
    assert {"preprocess", "inference", "postprocess", "total"} <= set(first["timings_ms"])


def test_detect_takes_a_directory_and_writes_csv(running_up, data_dir, tmp_path):
    _, target, _ = running_up
    out = tmp_path / "dets.csv"
    done = _detect(target, str(data_dir), "--format", "csv", "--out", str(out), "--conf", "0.5")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert {Path(r["image"]).name for r in rows} <= {p.name for p in data_dir.glob("*.jpg")}
    assert rows and all(float(r["score"]) >= 0.5 for r in rows)


def test_detect_writes_annotated_pngs(running_up, data_dir, tmp_path):
    _, target, _ = running_up
    done = _detect(target, str(data_dir / "shapes_03.jpg"), "--format", "png", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "shapes_03.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_grpc_error_exits_non_zero_with_the_status_name(running_up, data_dir):
    _, target, _ = running_up
    done = _detect(target, str(data_dir / "shapes_01.jpg"), "--model", "nope")
    assert done.returncode == 1
    assert "NOT_FOUND" in done.stderr and "nope" in done.stderr


def test_an_unreachable_controller_is_unavailable(data_dir):
    nobody = free_port_env()["INFERLINE_CONTROLLER_PORT"]
    done = _detect(f"localhost:{nobody}", str(data_dir / "shapes_01.jpg"), "--timeout", "5")
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr or "DEADLINE_EXCEEDED" in done.stderr


def test_a_bad_image_is_reported_and_the_rest_still_detected(running_up, data_dir, tmp_path):
    _, target, _ = running_up
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    done = _detect(target, str(data_dir / "shapes_01.jpg"), str(bad))
    assert done.returncode == 2
    good, broken = json.loads(done.stdout)["results"]
    assert good["detections"] and broken["error"]["code"] == "INVALID_ARGUMENT"
    assert "broken.jpg: INVALID_ARGUMENT" in done.stderr


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=180)


def test_detect_with_faster_rcnn_and_clip_relabelling(running_up, data_dir):
    _, target, _ = running_up
    done = _detect(
        target, str(data_dir / "shapes_04.jpg"), "--model", "fasterrcnn-mobilenet-v3-large-320-fpn", "--conf", "0.5",
        "--classify-with", "clip-vit-b-32", "--labels", "a circle,a star",
    )
    assert done.returncode == 0, done.stderr
    detections = json.loads(done.stdout)["results"][0]["detections"]
    assert detections and all(d["zero_shot"]["label"] in ("a circle", "a star") for d in detections)


def test_classify_prints_labels_best_first(running_up, data_dir):
    _, target, _ = running_up
    done = _run("classify", str(data_dir / "shapes_01.jpg"), "--labels", "a bus,a dog,a ball", "--top-k", "2",
                "--target", target)
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)["results"]
    assert Path(result["image"]).name == "shapes_01.jpg"
    assert len(result["labels"]) == 2 and result["labels"][0]["score"] >= result["labels"][1]["score"]


def test_embed_prints_normalised_vectors_and_clusters(running_up, data_dir):
    _, target, _ = running_up
    image = str(data_dir / "shapes_01.jpg")
    done = _run("embed", "--image", image, "--image", image, "--text", "a circle", "--cluster", "2", "--target", target)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["model"] == "clip-vit-b-32"
    vectors = [e["embedding"] for e in body["images"] + body["texts"]]
    assert [len(v) for v in vectors] == [512, 512, 512]
    assert all(abs(sum(x * x for x in v) - 1) < 1e-3 for v in vectors)
    assert len(body["clusters"]) == 3 and body["clusters"][0] == body["clusters"][1]
    assert body["rankings"][0]["text"] == "a circle" and len(body["rankings"][0]["images"]) == 2
    as_csv = _run("embed", "--image", image, "--text", "a circle", "--format", "csv", "--target", target)
    header, *rows = list(csv.reader(io.StringIO(as_csv.stdout)))
    assert header[:4] == ["kind", "name", "cluster", "e0"] and len(header) == 3 + 512
    assert [row[0] for row in rows] == ["image", "text"]


def test_models_lists_every_family(running_up):
    _, target, _ = running_up
    done = _run("models", "--target", target)
    assert done.returncode == 0, done.stderr
    for name in ("yolov8n", "fasterrcnn-mobilenet-v3-large-320-fpn", "clip-vit-b-32", "clip-vit-b-32-text"):
        assert name in done.stdout
    assert json.loads(_run("models", "--json", "--target", target).stdout)["models"]


def test_classify_without_usable_labels_is_refused(running_up, data_dir):
    _, target, _ = running_up
    done = _run("classify", str(data_dir / "shapes_01.jpg"), "--labels", "yolo " * 100, "--target", target)
    assert done.returncode == 1 and "INVALID_ARGUMENT" in done.stderr and "at most 77" in done.stderr


def test_up_serves_the_http_gateway_where_its_log_says(running_up, data_dir):
    _, _, log = running_up
    deadline = time.monotonic() + 30
    while (found := re.search(r"gateway at (http://\S+)", log.read_text())) is None:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    image = data_dir / "shapes_01.jpg"
    files = [("images", (image.name, image.read_bytes(), "image/jpeg"))]
    response = httpx.post(f"{found.group(1)}/v1/detect", files=files, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["detections"]


def test_sigterm_stops_every_stage_cleanly(running_up):
    process, _, log = running_up
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, log.read_text()
    text = log.read_text()
    for stage in ("preprocess", "inference", "postprocess", "controller", "gateway"):
        assert f"{stage}=0" in text, text


def test_missing_weights_are_logged_with_advice_and_stop_the_stage_only_when_strict(tmp_path):
    """By default the model is UNAVAILABLE, its advice logged, and the stage serves on (the
    others, a later load); with INFERLINE_EXIT_ON_ERROR=true (Triton's --exit-on-error) it exits."""
    env = free_port_env()
    env.update(INFERLINE_MODEL_DIR=str(tmp_path), INFERLINE_ALLOW_DOWNLOAD="false", INFERLINE_MODELS="yolov8n")
    advice = ("weights file yolov8n.pt not found", f"put yolov8n.pt in {tmp_path}")
    done = subprocess.run([*CLI, "serve", "inference"], env={**env, "INFERLINE_EXIT_ON_ERROR": "true"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert all(text in done.stderr for text in advice), done.stderr[-2000:]
    log = tmp_path / "stage.log"
    with log.open("w") as sink:
        process = subprocess.Popen([*CLI, "serve", "inference"], env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not all(text in log.read_text() for text in advice) and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        assert all(text in log.read_text() for text in advice), log.read_text()[-2000:]
        wait_serving(f"localhost:{env['INFERLINE_INFERENCE_PORT']}", timeout=60, alive=lambda: process.poll() is None)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_stages_do_not_outlive_a_killed_up(model_dir):
    env = free_port_env()
    env.update(INFERLINE_MODEL_DIR=str(model_dir), INFERLINE_ALLOW_DOWNLOAD="false", INFERLINE_MODELS="yolov8n")
    process = subprocess.Popen([*CLI, "up"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for stage in ("controller", "preprocess", "inference", "postprocess"):
            wait_serving(f"localhost:{env[f'INFERLINE_{stage.upper()}_PORT']}", timeout=180,
                         alive=lambda: process.poll() is None)
        children = [int(pid) for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
        assert len(children) == 5  # the four stages and the gateway
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in children):
            assert time.monotonic() < deadline, "a stage outlived its killed parent"
            time.sleep(0.1)
    finally:
        if process.poll() is None:
            process.kill()


def _state(pid: int) -> str:
    try:
        return next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:"))
    except (FileNotFoundError, StopIteration):
        return "zombie"


def test_export_writes_an_onnx_model_runtime_can_load(model_dir, tmp_path):
    env = {**os.environ, "INFERLINE_MODEL_DIR": str(model_dir), "INFERLINE_ALLOW_DOWNLOAD": "false"}
    out = tmp_path / "yolov8n.onnx"
    done = subprocess.run([*CLI, "export", "--model", "yolov8n", "--dynamic-batch", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    refused = subprocess.run(
        [*CLI, "export", "--model", "fasterrcnn-mobilenet-v3-large-320-fpn", "--dynamic-batch", "--out",
         str(tmp_path / "f.onnx")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert refused.returncode == 1 and "batch of one image" in refused.stderr and not (tmp_path / "f.onnx").exists()
    unknown = subprocess.run([*CLI, "export", "--model", "nope", "--out", str(tmp_path / "n.onnx")], env=env,
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1 and "no model 'nope'" in unknown.stderr and "yolov8n" in unknown.stderr
