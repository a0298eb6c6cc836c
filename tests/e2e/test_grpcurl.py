"""The services as grpcurl sees them: reflection only, no proto files, plaintext.

grpcurl 1.8.6 comes from the project's own installer (deploy/tools/install-grpcurl.sh), so
these tests also check that a user who runs that script can list, describe and call every
service exactly as documented.

grpcurl 1.8.6 reads request JSON in either spelling but writes responses with the proto's own
field names (``timings_ms``, ``class_id``, ``model_version``), not proto3 JSON's lowerCamelCase
(``timingsMs``), and leaves out fields at their zero value; the assertions below follow that.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / "deploy" / "tools" / "install-grpcurl.sh"
TIMEOUT_S = 60
STAGE_SERVICES = {
    "preprocess": "inferline.v1.PreprocessService",
    "inference": "inference.GRPCInferenceService",
    "postprocess": "inferline.v1.PostprocessService",
    "controller": "inferline.v1.ControllerService",
}


@pytest.fixture(scope="module")
def grpcurl() -> Path:
    try:
        done = subprocess.run(
            ["bash", str(INSTALLER)], cwd=REPO, capture_output=True, text=True, timeout=300, env=os.environ.copy()
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{INSTALLER} timed out: {exc}")
    if done.returncode != 0:
        pytest.fail(f"{INSTALLER} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    lines = done.stdout.strip().splitlines()
    if not lines:
        pytest.fail(f"{INSTALLER} printed no path:\n{done.stderr}")
    binary = Path(lines[-1])
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"{INSTALLER} printed {binary}, which is not an executable file")
    return binary


def run_grpcurl(binary: Path, *args: str, data: str | None = None) -> subprocess.CompletedProcess:
    """``grpcurl -plaintext [-d @] ARGS``; a request body goes on stdin so big images fit."""
    command = [str(binary), "-plaintext"]
    if data is not None:
        command += ["-d", "@"]
    return subprocess.run([*command, *args], input=data, capture_output=True, text=True, timeout=TIMEOUT_S)


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"grpcurl {done.args[1:]} exited {done.returncode}:\n{done.stderr}"
    return done.stdout


def detect_request(model: str, data: bytes, name: str) -> str:
    # Protobuf's JSON mapping carries a bytes field as standard base64.
    return json.dumps({"model": model, "images": [{"data": base64.b64encode(data).decode("ascii"), "name": name}]})


def test_installer_is_idempotent_and_reports_1_8_6(grpcurl):
    again = subprocess.run(["bash", str(INSTALLER)], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == str(grpcurl)
    assert "already" in again.stderr
    version = subprocess.run([str(grpcurl), "-version"], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert "1.8.6" in version.stdout + version.stderr


def test_list_on_the_controller_shows_its_service_health_and_reflection(grpcurl, stack):
    services = ok(run_grpcurl(grpcurl, stack.controller, "list")).split()
    assert "inferline.v1.ControllerService" in services
    assert "grpc.health.v1.Health" in services
    assert "grpc.reflection.v1alpha.ServerReflection" in services


@pytest.mark.parametrize("stage", ["preprocess", "inference", "postprocess"])
def test_list_on_each_stage_shows_its_service(grpcurl, stack, stage):
    services = ok(run_grpcurl(grpcurl, stack.servers[stage].address, "list")).split()
    assert STAGE_SERVICES[stage] in services
    assert "grpc.health.v1.Health" in services


@pytest.mark.parametrize("stage", list(STAGE_SERVICES))
def test_list_of_each_service_resolves_its_methods_by_reflection(grpcurl, stack, stage):
    # Listing methods makes grpcurl fetch the service's file and every import it has, so a
    # descriptor the server cannot serve shows up here.
    methods = ok(run_grpcurl(grpcurl, stack.servers[stage].address, "list", STAGE_SERVICES[stage])).split()
    assert methods, f"{STAGE_SERVICES[stage]} lists no methods"
    assert all(m.startswith(STAGE_SERVICES[stage] + ".") for m in methods)


def test_describe_controller_service_shows_detect_and_list_models(grpcurl, stack):
    text = ok(run_grpcurl(grpcurl, stack.controller, "describe", "inferline.v1.ControllerService"))
    assert "inferline.v1.ControllerService is a service" in text
    assert "rpc Detect ( .inferline.v1.DetectRequest ) returns ( .inferline.v1.DetectResponse )" in text
    assert "rpc ListModels ( .inferline.v1.ListModelsRequest ) returns ( .inferline.v1.ListModelsResponse )" in text


def test_describe_detect_request_shows_its_fields(grpcurl, stack):
    text = ok(run_grpcurl(grpcurl, stack.controller, "describe", "inferline.v1.DetectRequest"))
    assert "inferline.v1.DetectRequest is a message" in text
    assert "string model = 1;" in text
    assert "repeated .inferline.v1.Image images = 2;" in text
    assert ".inferline.v1.DetectOptions options = 3;" in text
    assert "repeated .inferline.v1.RenderFormat render = 4;" in text


@pytest.mark.parametrize("stage", list(STAGE_SERVICES))
def test_health_check_reports_serving_on_every_stage(grpcurl, stack, stage):
    out = ok(run_grpcurl(grpcurl, stack.servers[stage].address, "grpc.health.v1.Health/Check", data='{"service":""}'))
    assert json.loads(out) == {"status": "SERVING"}


def test_list_models_shows_yolov8n_as_a_detect_model(grpcurl, stack):
    out = ok(run_grpcurl(grpcurl, stack.controller, "inferline.v1.ControllerService/ListModels", data="{}"))
    models = {m["name"]: m for m in json.loads(out)["models"]}
    assert "yolov8n" in models
    assert models["yolov8n"]["task"] == "detect"


def test_detect_with_a_base64_image_returns_boxes_in_original_pixels(grpcurl, stack, data_dir):
    path = data_dir / "shapes_01.jpg"
    with Image.open(path) as image:
        width, height = image.size
    assert (width, height) == (640, 480)

    request = detect_request("yolov8n", path.read_bytes(), path.name)
    response = json.loads(ok(run_grpcurl(grpcurl, stack.controller, "inferline.v1.ControllerService/Detect",
                                         data=request)))

    assert response["model"] == "yolov8n"
    assert len(response["results"]) == 1
    result = response["results"][0]
    assert result.get("status", {}).get("code", 0) == 0, result.get("status")
    assert result["name"] == path.name
    assert (result["width"], result["height"]) == (width, height)
    assert result["detections"], "no detections on shapes_01.jpg"
    for detection in result["detections"]:
        assert detection["label"]
        assert isinstance(detection.get("class_id", 0), int)
        assert 0 < detection["score"] <= 1
        box = detection["box"]
        # Zero-valued fields are left out of proto3 JSON, so a box edge at 0 may be absent.
        x1, y1, x2, y2 = (box.get(k, 0.0) for k in ("x1", "y1", "x2", "y2"))
        assert 0 <= x1 < x2 <= width
        assert 0 <= y1 < y2 <= height
    assert response["model_version"]
    assert "total" in response["timings_ms"]


def test_detect_with_an_unknown_model_fails_the_call_with_not_found(grpcurl, stack, data_dir):
    request = detect_request("nope", (data_dir / "shapes_01.jpg").read_bytes(), "shapes_01.jpg")
    done = run_grpcurl(grpcurl, stack.controller, "inferline.v1.ControllerService/Detect", data=request)
    assert done.returncode != 0
    assert "NotFound" in done.stderr


def test_detect_with_garbage_bytes_fails_only_that_image_with_invalid_argument(grpcurl, stack):
    request = detect_request("yolov8n", b"this is not an image", "garbage.jpg")
    response = json.loads(ok(run_grpcurl(grpcurl, stack.controller, "inferline.v1.ControllerService/Detect",
                                         data=request)))
    assert len(response["results"]) == 1
    result = response["results"][0]
    assert result["name"] == "garbage.jpg"
    assert result["status"]["code"] == 3
    assert result["status"].get("message")
    assert not result.get("detections")


# ---- the README's grpcurl session is what grpcurl shows ----------------------------------------

README = REPO / "README.md"


def readme_transcript(command: str) -> str:
    """The output the README's grpcurl section shows under ``$ <command>``: the lines after it,
    up to the blank line that ends them."""
    text = README.read_text()
    section = text[text.index("## grpcurl") :]
    lines = section.splitlines()
    start = lines.index(f"$ {command}") + 1
    end = lines.index("", start)
    return "\n".join(lines[start:end])


@pytest.mark.parametrize("args", [["list"], ["describe", "inferline.v1.ControllerService"]], ids=["list", "describe"])
def test_the_readme_shows_exactly_what_grpcurl_lists_and_describes_on_the_controller(grpcurl, stack, args):
    shown = readme_transcript(" ".join(["grpcurl -plaintext localhost:50051", *args]))
    assert ok(run_grpcurl(grpcurl, stack.controller, *args)).strip() == shown


def test_the_readme_describes_every_method_of_the_controller(grpcurl, stack):
    methods = ok(run_grpcurl(grpcurl, stack.controller, "list", "inferline.v1.ControllerService")).split()
    shown = readme_transcript("grpcurl -plaintext localhost:50051 describe inferline.v1.ControllerService")
    described = [line.split()[1] for line in shown.splitlines() if line.strip().startswith("rpc ")]
    assert sorted(f"inferline.v1.ControllerService.{name}" for name in described) == sorted(methods)


@pytest.mark.parametrize("port, server", [("50051", "controller"), ("50053", "inference")])
def test_the_readme_shows_what_oip_model_ready_answers_on_the_controller_and_the_stage(grpcurl, stack, port, server):
    """Both speak Triton's protocol: the controller's pipelines and the stage's models."""
    body = '{"name": "yolov8n"}'
    command = f"grpcurl -plaintext -d '{body}' localhost:{port} inference.GRPCInferenceService/ModelReady"
    target = stack.controller if server == "controller" else stack.servers["inference"].address
    got = ok(run_grpcurl(grpcurl, target, "inference.GRPCInferenceService/ModelReady", data=body))
    assert got.strip() == readme_transcript(command)
