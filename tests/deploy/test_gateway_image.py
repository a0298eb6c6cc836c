"""The gateway image: small, unprivileged, without model libraries, live on its own and ready only
with a controller; run read-only in front of the containers of a running stack it answers the
HTTP API (a detect of the shapes image) and serves its /metrics."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.deploy.test_images import ContainerStack
from tests.deploy.tools import (
    assert_detects_shapes_json,
    compressed_size,
    free_port,
    http_detect,
    http_get,
    podman,
    wait_healthy,
    wait_http,
)

pytestmark = pytest.mark.slow

MB = 1_000_000
# FastAPI, uvicorn and pydantic on top of the controller's packages (~215 MB): the controller's
# budget, unpacked.
UNPACKED_BUDGET = 250 * MB


def test_image_is_small_unprivileged_and_has_no_model_libraries(images, tmp_path):
    info = json.loads(podman("image", "inspect", images["gateway"]).stdout)[0]
    unpacked, pulled = int(info["Size"]), compressed_size(images["gateway"], tmp_path)
    print(f"gateway: {unpacked / MB:.0f} MB unpacked, {pulled / MB:.0f} MB compressed")
    assert unpacked <= UNPACKED_BUDGET, f"{unpacked / MB:.0f} MB unpacked > {UNPACKED_BUDGET / MB:.0f} MB"
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"][0].endswith("tini")
    assert config["Cmd"] == ["inferline", "serve", "gateway"]
    assert "8080/tcp" in config["ExposedPorts"]
    assert config["Labels"]["org.opencontainers.image.title"] == "inferline-gateway"
    assert "/opt/inferline/healthcheck.py" in " ".join(info["Healthcheck"]["Test"])  # docker format kept it
    found = podman(
        "run",
        "--rm",
        "--network",
        "none",
        images["gateway"],
        "python",
        "-c",
        "import importlib.util as u; print(*[m for m in ('torch', 'cv2', 'PIL', 'onnxruntime', 'ultralytics')"
        " if u.find_spec(m)])",
    ).stdout.strip()
    assert found == "", f"model or image libraries in the gateway image: {found}"


def _in_container(name: str, path: str) -> int:
    """The HTTP status of GET 127.0.0.1:8080<path>, asked from inside the container."""
    script = ("import urllib.request as r, urllib.error as e\n"
              f"try: print(r.urlopen('http://127.0.0.1:8080{path}', timeout=5).status)\n"
              "except e.HTTPError as x: print(x.code)")
    return int(podman("exec", name, "python", "-c", script).stdout.strip())


def test_alone_it_is_live_not_ready_and_stops_cleanly_on_sigterm(images):
    """The HEALTHCHECK is liveness (HTTP /healthz): no controller makes it unready (/readyz 503),
    not unhealthy, so an orchestrator stops routing to it instead of restarting it."""
    name = f"inferline-gateway-alone-{uuid.uuid4().hex[:8]}"
    podman("run", "-d", "--name", name, "--read-only", "--cap-drop", "ALL", "--network", "none", images["gateway"])
    try:
        wait_healthy(name, timeout=60)
        assert _in_container(name, "/healthz") == 200
        assert _in_container(name, "/readyz") == 503
        podman("stop", "-t", "20", name, timeout=60)
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, state
    finally:
        podman("rm", "-f", name, check=False)


@pytest.fixture(scope="module")
def gateway(images, onnx_models):
    """The four stage containers (test_images' ContainerStack) and the gateway beside them on the
    same network, read-only, dialing the controller by its network alias; yields its base URL."""
    stack = ContainerStack(images, onnx_models)
    port = free_port()
    try:
        stack.up()
        stack.start("gateway", "-p", f"127.0.0.1:{port}:8080", image=images["gateway"],
                    env={"INFERLINE_CONTROLLER_TARGET": "controller:50051"})
        for stage in ("preprocess", "postprocess", "inference", "controller", "gateway"):
            wait_healthy(stack.names[stage])
        yield f"http://127.0.0.1:{port}"
        stats = podman("stats", "--no-stream", "--format", "{{.Name}} {{.MemUsage}}", stack.names["gateway"]).stdout
        print("gateway memory after the requests:", stats.strip())
    finally:
        stack.down()


def test_in_front_of_the_stack_it_is_ready_and_answers_detect(gateway, shapes_image):
    assert http_get(f"{gateway}/healthz") == (200, '{"status":"ok"}')
    assert '"ready"' in wait_http(f"{gateway}/readyz", timeout=60)
    assert_detects_shapes_json(http_detect(gateway, shapes_image))
    status, page = http_get(f"{gateway}/")
    assert status == 200 and "<html" in page.lower()  # the demo page, from the package's static files


def test_metrics_count_the_requests_it_answered(gateway, shapes_image):
    http_detect(gateway, shapes_image)
    status, text = http_get(f"{gateway}/metrics")
    assert status == 200
    detects = [
        line
        for line in text.splitlines()
        if line.startswith("inferline_gateway_requests_total{")
        and 'route="/v1/detect"' in line
        and 'status="200"' in line
    ]
    assert detects and float(detects[0].rsplit(" ", 1)[1]) >= 1, text[:3000]
