"""The HTTP gateway against the in-process stack: every endpoint's happy path, every error code,
and answers equal to the CLI's for the same image."""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from inferline.services import cli
from inferline.services.gateway.problems import Problem
from inferline.services.gateway.schemas import ClassifyResponse, DetectResponse, EmbedResponse, Stats
from tests.support.gateway import RunningGateway
from tests.support.images import encoded

LABELS = "a circle,a triangle,a square,a star"


def _upload(path: Path, name: str | None = None) -> tuple[str, tuple[str, bytes, str]]:
    return ("images", (name or path.name, path.read_bytes(), "image/jpeg"))


def _problem(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = Problem.model_validate(response.json()).model_dump()
    assert body["code"] == code
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def _without_timing_values(document: dict) -> dict:
    for result in document["results"]:
        result["timings_ms"] = sorted(result["timings_ms"])
    return document


# Happy paths.


def test_detect_multipart_finds_the_circle_in_shapes_01(http, data_dir):
    response = http.post("/v1/detect", files=[_upload(data_dir / "shapes_01.jpg")])
    assert response.status_code == 200, response.text
    result = DetectResponse.model_validate(response.json()).results[0]
    assert (result.image, result.width, result.height) == ("shapes_01.jpg", 640, 480)
    assert [d.label for d in result.detections] == ["sports ball"]
    assert {"preprocess", "inference", "postprocess", "total"} <= set(result.timings_ms)


def test_detect_json_equals_the_cli_s_json_for_the_same_image(http, stack, data_dir, tmp_path):
    image = data_dir / "shapes_05.jpg"
    out = tmp_path / "cli.json"
    assert cli.main(["detect", str(image), "--target", stack.controller, "--conf", "0.5", "--out", str(out)]) == 0
    response = http.post("/v1/detect", params={"conf": 0.5}, files=[_upload(image, name=str(image))])
    assert response.status_code == 200
    assert _without_timing_values(response.json()) == _without_timing_values(json.loads(out.read_text()))


def test_detect_csv_equals_the_cli_s_csv(http, stack, data_dir, tmp_path):
    images = [data_dir / "shapes_01.jpg", data_dir / "shapes_02.jpg"]
    out = tmp_path / "cli.csv"
    assert cli.main(["detect", *map(str, images), "--target", stack.controller, "--format", "csv", "--out",
                     str(out)]) == 0
    response = http.post("/v1/detect", params={"format": "csv"}, files=[_upload(p, name=str(p)) for p in images])
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert response.text == out.read_text()
    assert len(list(csv.reader(io.StringIO(response.text)))) > 2


def test_detect_base64_json_body_with_options_in_the_body(http, data_dir):
    image = data_dir / "shapes_05.jpg"
    payload = {"images": [{"name": "five.jpg", "data": base64.b64encode(image.read_bytes()).decode()}], "conf": 0.9}
    response = http.post("/v1/detect", json=payload)
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["image"] == "five.jpg"
    assert result["detections"] and all(d["score"] >= 0.9 for d in result["detections"])


def test_detect_png_is_the_annotated_image(http, data_dir):
    response = http.post("/v1/detect", params={"format": "png"}, files=[_upload(data_dir / "shapes_01.jpg")])
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    pixels = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR)
    assert pixels.shape == (480, 640, 3)
    original = cv2.imread(str(data_dir / "shapes_01.jpg"))
    assert np.abs(pixels.astype(int) - original.astype(int)).max() > 100  # boxes were drawn


def test_detect_with_clip_relabels_each_box_from_form_labels(http, data_dir):
    response = http.post(
        "/v1/detect",
        params={"classify_with": "clip-vit-b-32"},
        data={"labels": ["a circle, a star", "a square"]},
        files=[_upload(data_dir / "shapes_01.jpg")],
    )
    assert response.status_code == 200, response.text
    detection = response.json()["results"][0]["detections"][0]
    assert detection["zero_shot"]["label"] in {"a circle", "a star", "a square"}


def test_classify_equals_the_cli_s_json(http, stack, data_dir, tmp_path):
    image = data_dir / "shapes_04.jpg"
    out = tmp_path / "cli.json"
    assert cli.main(["classify", str(image), "--labels", LABELS, "--top-k", "2", "--target", stack.controller, "--out",
                     str(out)]) == 0
    response = http.post("/v1/classify", params={"labels": LABELS, "top_k": 2}, files=[_upload(image, name=str(image))])
    assert response.status_code == 200, response.text
    ClassifyResponse.model_validate(response.json())
    assert response.json() == json.loads(out.read_text())
    stages = [entry.split(";")[0] for entry in response.headers["server-timing"].split(", ")]
    assert {"inference", "text_inference", "total"} <= set(stages)


def test_embed_texts_and_images_ranks_images_per_text(http, data_dir):
    response = http.post(
        "/v1/embed",
        params={"texts": ["a circle", "a star"], "cluster": 2},
        files=[_upload(data_dir / "shapes_01.jpg"), _upload(data_dir / "shapes_02.jpg")],
    )
    assert response.status_code == 200, response.text
    body = EmbedResponse.model_validate(response.json())
    assert [len(e.embedding) for e in body.images + body.texts] == [512] * 4
    assert len(body.clusters) == 4
    assert {r.text for r in body.rankings} == {"a circle", "a star"}
    assert sorted(body.rankings[0].images) == ["shapes_01.jpg", "shapes_02.jpg"]


def test_embed_csv_has_a_row_per_item(http):
    response = http.post("/v1/embed", params={"format": "csv"}, json={"texts": ["a circle", "a dog"]})
    assert response.status_code == 200, response.text
    rows = list(csv.reader(io.StringIO(response.text)))
    assert [row[:2] for row in rows[1:]] == [["text", "a circle"], ["text", "a dog"]]


def test_models_lists_every_served_model_and_one_model_by_name(http):
    listed = http.get("/v1/models")
    assert listed.status_code == 200
    names = {m["name"] for m in listed.json()["models"]}
    assert {"yolov8n", "fasterrcnn-mobilenet-v3-large-320-fpn", "clip-vit-b-32"} <= names
    one = http.get("/v1/models/yolov8n")
    assert one.status_code == 200
    assert one.json()["task"] == "detect"


def test_health_and_readiness_with_the_controller_up(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json() == {"status": "ready"}


def test_metrics_count_requests_by_route_template_method_and_status(http):
    http.get("/v1/models/nope")
    text = http.get("/metrics").text
    assert 'inferline_gateway_requests_total{method="GET",route="/v1/models/{name}",status="404"}' in text
    assert "inferline_gateway_request_duration_seconds_bucket" in text
    assert "nope" not in text  # the path's value is never a label


def test_stats_report_rate_and_p95_of_the_last_minute(http):
    http.get("/v1/models")
    stats = Stats.model_validate(http.get("/v1/stats").json())
    assert stats.window_s == 60
    assert stats.requests >= 1 and stats.rate_per_s == pytest.approx(stats.requests / 60, abs=1e-3)
    assert stats.p95_ms is not None and stats.p95_ms > 0


def test_request_id_is_kept_when_sane_and_replaced_when_not(http):
    assert http.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    replaced = http.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"]
    assert replaced != "bad id\twith spaces" and len(replaced) == 32


def test_request_id_is_in_the_access_log(http, caplog):
    with caplog.at_level("INFO", logger="inferline.gateway.access"):
        http.get("/v1/models", headers={"X-Request-ID": "find-me-in-the-log"})
        http.get("/healthz", headers={"X-Request-ID": "probe-at-debug-only"})
    messages = [r.getMessage() for r in caplog.records]
    assert any("GET /v1/models -> 200" in m and "request_id=find-me-in-the-log" in m for m in messages)
    assert not any("probe-at-debug-only" in m for m in messages)


def test_demo_page_and_swagger_ui_load_only_from_the_gateway(http):
    page = http.get("/")
    assert page.status_code == 200 and "inferline demo" in page.text
    docs = http.get("/docs")
    assert docs.status_code == 200
    for html in (page.text, docs.text):
        assert "http://" not in html.replace("http://localhost", "") and "https://" not in html
    for asset in ("/swagger-ui/swagger-ui-bundle.js", "/swagger-ui/swagger-ui.css", "/static/demo.js",
                  "/static/demo.css"):
        assert http.get(asset).status_code == 200, asset
    assert http.get("/openapi.json").json()["openapi"].startswith("3.1")


# Errors.


def test_corrupt_image_is_400_invalid_argument(http):
    body = _problem(http.post("/v1/detect", files=[("images", ("bad.jpg", b"not an image", "image/jpeg"))]), 400,
                    "INVALID_ARGUMENT")
    assert "not a decodable image" in body["detail"]


def test_one_corrupt_image_among_good_ones_fails_only_its_result(http, data_dir):
    response = http.post(
        "/v1/detect", files=[_upload(data_dir / "shapes_01.jpg"), ("images", ("bad.jpg", b"garbage", "image/jpeg"))]
    )
    assert response.status_code == 200
    good, bad = response.json()["results"]
    assert good["detections"] and "error" not in good
    assert bad["error"]["code"] == "INVALID_ARGUMENT"


def test_unknown_model_is_404_naming_the_served_models(http, data_dir):
    body = _problem(http.post("/v1/detect", params={"model": "nope"}, files=[_upload(data_dir / "shapes_01.jpg")]), 404,
                    "NOT_FOUND")
    assert "yolov8n" in body["detail"]
    _problem(http.get("/v1/models/nope"), 404, "NOT_FOUND")


@pytest.mark.parametrize(
    "params,needle",
    [({"conf": 2}, "conf"), ({"iou": -0.1}, "iou"), ({"max_det": 0}, "max_det"), ({"format": "gif"}, "format"),
     ({"classes": "x"}, "classes")],
)
def test_bad_options_are_400_naming_the_field(http, data_dir, params, needle):
    body = _problem(http.post("/v1/detect", params=params, files=[_upload(data_dir / "shapes_01.jpg")]), 400,
                    "INVALID_ARGUMENT")
    assert needle in body["detail"]


def test_no_images_is_400(http):
    _problem(http.post("/v1/detect", files=[], data={"conf": "0.5"}), 400, "INVALID_ARGUMENT")
    _problem(http.post("/v1/embed", json={}), 400, "INVALID_ARGUMENT")


def test_bad_base64_and_bad_json_are_400(http):
    body = _problem(http.post("/v1/detect", json={"images": [{"data": "%%%"}]}), 400, "INVALID_ARGUMENT")
    assert "base64" in body["detail"]
    _problem(http.post("/v1/detect", content=b"{not json", headers={"content-type": "application/json"}), 400,
             "INVALID_ARGUMENT")
    _problem(http.post("/v1/detect", json=[1, 2]), 400, "INVALID_ARGUMENT")


def test_an_image_url_is_refused_not_fetched(http):
    body = _problem(http.post("/v1/detect", json={"images": [{"url": "http://127.0.0.1:1/a.jpg"}]}), 400,
                    "INVALID_ARGUMENT")
    assert "images.0.data" in body["detail"]


def test_png_for_two_images_is_400(http, data_dir):
    images = [_upload(data_dir / "shapes_01.jpg"), _upload(data_dir / "shapes_02.jpg")]
    body = _problem(http.post("/v1/detect", params={"format": "png"}, files=images), 400, "INVALID_ARGUMENT")
    assert "exactly one image" in body["detail"]


def test_unsupported_content_type_is_415(http):
    _problem(http.post("/v1/detect", content=b"raw bytes", headers={"content-type": "image/jpeg"}), 415,
             "INVALID_ARGUMENT")


def test_classify_without_labels_is_400(http, data_dir):
    _problem(http.post("/v1/classify", files=[_upload(data_dir / "shapes_01.jpg")]), 400, "INVALID_ARGUMENT")


def test_deadline_from_the_header_is_504_when_it_passes(http, data_dir):
    response = http.post("/v1/detect", headers={"X-Request-Timeout": "0.001"},
                         files=[_upload(data_dir / "shapes_01.jpg")])
    _problem(response, 504, "DEADLINE_EXCEEDED")


def test_bad_deadline_header_is_400(http, data_dir):
    body = _problem(http.get("/v1/models", headers={"X-Request-Timeout": "soon"}), 400, "INVALID_ARGUMENT")
    assert "X-Request-Timeout" in body["detail"]


def test_unknown_path_and_wrong_method_are_problems_too(http):
    _problem(http.get("/v2/detect"), 404, "NOT_FOUND")
    _problem(http.get("/v1/detect"), 405, "UNIMPLEMENTED")


@pytest.fixture(scope="module")
def small_gateway(stack) -> Iterator[httpx.Client]:
    running = RunningGateway(dataclasses.replace(stack.settings, gateway_max_upload_mb=1), stack.controller)
    try:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            yield client
    finally:
        running.stop()


def test_oversize_upload_is_413_from_content_length(small_gateway):
    big = encoded(1200, 1200, ".png", seed=1)
    assert len(big) > 1024 * 1024
    body = _problem(small_gateway.post("/v1/detect", files=[("images", ("big.png", big, "image/png"))]), 413,
                    "RESOURCE_EXHAUSTED")
    assert "INFERLINE_GATEWAY_MAX_UPLOAD_MB" in body["detail"]


def test_oversize_streamed_upload_is_413_without_content_length(small_gateway):
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536

    response = small_gateway.post("/v1/detect", content=chunks(), headers={"content-type": "application/json"})
    _problem(response, 413, "RESOURCE_EXHAUSTED")


def test_controller_down_is_503_and_not_ready(orphan_gateway, data_dir):
    with httpx.Client(base_url=orphan_gateway.url, timeout=30) as client:
        body = _problem(client.post("/v1/detect", files=[_upload(data_dir / "shapes_01.jpg")]), 503, "UNAVAILABLE")
        assert "controller" in body["detail"]
        _problem(client.get("/v1/models"), 503, "UNAVAILABLE")
        _problem(client.get("/readyz"), 503, "UNAVAILABLE")
        assert client.get("/healthz").status_code == 200
