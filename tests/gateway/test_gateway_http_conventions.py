"""What REST users expect of the gateway beyond the payloads: stable operationIds for generated
clients, content negotiation with Accept (406 when nothing fits), Retry-After on every 503,
optional API keys declared in OpenAPI, and URLs that hold under a proxy's sub-path."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import httpx
import pytest

from inferline.services.gateway.negotiation import choose, quality
from inferline.services.gateway.prefix import clean_prefix
from inferline.services.gateway.problems import ApiError
from tests.support.gateway import RunningGateway

OPERATION_IDS = {
    ("/v1/detect", "post"): "detect",
    ("/v1/classify", "post"): "classify",
    ("/v1/embed", "post"): "embed",
    ("/v1/models", "get"): "listModels",
    ("/v1/models/{name}", "get"): "getModel",
    ("/v1/stats", "get"): "getStats",
    ("/healthz", "get"): "liveness",
    ("/readyz", "get"): "readiness",
    ("/metrics", "get"): "metrics",
}


def _upload(data_dir, name="shapes_01.jpg"):
    return ("images", (name, (data_dir / name).read_bytes(), "image/jpeg"))


# Operation ids.

def test_every_operation_has_a_short_stable_operation_id(http):
    spec = http.get("/openapi.json").json()
    found = {(path, method): op["operationId"] for path, item in spec["paths"].items() for method, op in item.items()}
    assert found == OPERATION_IDS


# Content negotiation.

@pytest.mark.parametrize(
    ("accept", "requested", "formats", "expected"),
    [
        (None, None, ("json", "csv", "png"), "json"),
        ("*/*", None, ("json", "csv", "png"), "json"),
        ("text/csv", None, ("json", "csv", "png"), "csv"),
        ("image/*", None, ("json", "csv", "png"), "png"),
        ("text/csv;q=0.5, application/json", None, ("json", "csv"), "json"),
        ("application/json;q=0.2, text/csv;q=0.9", None, ("json", "csv"), "csv"),
        ("text/html,application/xhtml+xml,*/*;q=0.8", None, ("json", "csv"), "json"),  # a browser
        ("application/json, text/csv;q=0", "csv", ("json", "csv"), None),  # q=0 is "not acceptable"
        ("text/csv", "csv", ("json", "csv"), "csv"),
        ("*/*", "png", ("json", "csv", "png"), "png"),
    ],
)
def test_the_answer_format_follows_format_then_accept(accept, requested, formats, expected):
    if expected is None:
        with pytest.raises(ApiError) as raised:
            choose(requested, accept, formats)
        assert raised.value.http == 406
    else:
        assert choose(requested, accept, formats) == expected


def test_the_most_specific_range_sets_the_quality():
    assert quality("text/*;q=0.3, text/csv;q=0.9", "text/csv") == 0.9
    assert quality("text/*;q=0.3, text/csv;q=0.9", "text/plain") == 0.3
    assert quality("application/json", "text/csv") == 0.0


def test_accept_text_csv_answers_csv_without_a_format_parameter(http, data_dir):
    response = http.post("/v1/detect", files=[_upload(data_dir)], headers={"Accept": "text/csv"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert response.text.splitlines()[0].startswith("image,")


def test_accept_image_png_answers_the_annotated_image(http, data_dir):
    response = http.post("/v1/detect", files=[_upload(data_dir)], headers={"Accept": "image/png"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG")


def test_an_accept_the_endpoint_cannot_meet_is_406_as_a_problem(http, data_dir):
    response = http.post("/v1/classify", files=[_upload(data_dir)], data={"labels": "a circle"},
                         headers={"Accept": "image/png"})
    assert response.status_code == 406
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 406 and "application/json, text/csv" in body["detail"]


def test_a_format_the_accept_header_refuses_is_406(http, data_dir):
    response = http.post("/v1/detect", params={"format": "csv"}, files=[_upload(data_dir)],
                         headers={"Accept": "application/json"})
    assert response.status_code == 406
    assert "format=csv" in response.json()["detail"]


# Retry-After.

def test_every_503_says_when_to_retry(orphan_gateway, data_dir):
    with httpx.Client(base_url=orphan_gateway.url, timeout=30) as client:
        for response in (client.post("/v1/detect", files=[_upload(data_dir)]), client.get("/v1/models"),
                         client.get("/readyz")):
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"


# API keys.

KEYS = ("k-first", "k-second")


@pytest.fixture(scope="module")
def keyed(stack, tmp_path_factory) -> Iterator[httpx.Client]:
    key_file = tmp_path_factory.mktemp("keys") / "keys"
    key_file.write_text(KEYS[1] + "\n")  # as a mounted Secret holds it
    settings = dataclasses.replace(stack.settings, gateway_api_keys=KEYS[0], gateway_api_keys_file=str(key_file))
    running = RunningGateway(settings, stack.controller)
    with httpx.Client(base_url=running.url, timeout=120) as client:
        yield client
    running.stop()


def test_without_a_key_an_api_call_is_401_saying_how_to_send_one(keyed):
    response = keyed.get("/v1/models")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["code"] == "UNAUTHENTICATED"
    assert "Authorization: Bearer" in response.json()["detail"]


def test_a_wrong_key_is_401_and_each_configured_key_works_either_way(keyed):
    assert keyed.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert keyed.get("/v1/models", headers={"Authorization": f"Bearer {KEYS[0]}"}).status_code == 200
    assert keyed.get("/v1/models", headers={"X-API-Key": KEYS[1]}).status_code == 200
    assert keyed.get("/v2/models/yolov8n", headers={"X-API-Key": KEYS[0]}).status_code == 200
    assert keyed.get("/v2/models/yolov8n").status_code == 401


def test_a_sub_path_does_not_open_a_way_around_the_key(keyed):
    headers = {"X-Forwarded-Prefix": "/p"}
    assert keyed.get("/v1/models", headers=headers).status_code == 401
    assert keyed.get("/p/v1/models", headers=headers).status_code == 401
    assert keyed.get("/p/v1/models", headers={**headers, "X-API-Key": KEYS[0]}).status_code == 200


def test_probes_metrics_docs_and_the_demo_page_need_no_key(keyed):
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/", "/v2/health/live"):
        assert keyed.get(path).status_code == 200, path


def test_openapi_declares_the_key_schemes_and_requires_them_when_keys_are_set(keyed, http):
    spec = keyed.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKeyAuth"]["in"] == "header" and schemes["apiKeyAuth"]["name"] == "X-API-Key"
    detect = spec["paths"]["/v1/detect"]["post"]
    assert detect["security"] == [{"bearerAuth": []}, {"apiKeyAuth": []}] and "401" in detect["responses"]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    # Without keys the operations require nothing (the committed docs/openapi.json is this one).
    assert "security" not in http.get("/openapi.json").json()["paths"]["/v1/detect"]["post"]


# Sub-paths.

def test_x_forwarded_prefix_becomes_the_base_of_the_page_docs_and_spec(http):
    headers = {"X-Forwarded-Prefix": "/tools/inferline"}
    assert '<base href="/tools/inferline/">' in http.get("/", headers=headers).text
    docs = http.get("/docs", headers=headers).text
    assert "'/tools/inferline/openapi.json'" in docs or '"/tools/inferline/openapi.json"' in docs
    assert "/tools/inferline/swagger-ui/swagger-ui-bundle.js" in docs
    assert http.get("/openapi.json", headers=headers).json()["servers"] == [{"url": "/tools/inferline"}]
    assert "servers" not in http.get("/openapi.json").json()
    assert '<base href="/">' in http.get("/").text


@pytest.mark.parametrize("value", ['/a"><script>', "//evil.example", "/a/../b", "relative", "/a b"])
def test_a_prefix_that_is_not_a_plain_path_is_ignored(http, value):
    assert clean_prefix(value) is None
    assert '<base href="/">' in http.get("/", headers={"X-Forwarded-Prefix": value}).text


def test_a_configured_root_path_serves_paths_that_still_carry_it(stack):
    settings = dataclasses.replace(stack.settings, gateway_root_path="/api")
    running = RunningGateway(settings, stack.controller)
    try:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            assert client.get("/api/v1/models").status_code == 200
            assert '<base href="/api/">' in client.get("/api/").text
            assert client.get("/api/openapi.json").json()["servers"] == [{"url": "/api"}]
    finally:
        running.stop()
