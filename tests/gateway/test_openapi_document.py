"""The committed OpenAPI document is the one the gateway serves."""

from __future__ import annotations

import json
from pathlib import Path

from inferline.services.gateway.app import openapi_document

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
OPERATIONS = {
    ("post", "/v1/detect"), ("post", "/v1/classify"), ("post", "/v1/embed"), ("get", "/v1/models"),
    ("get", "/v1/models/{name}"), ("get", "/v1/stats"), ("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics"),
}


def test_docs_openapi_json_is_not_stale():
    assert COMMITTED.read_text() == openapi_document(), "docs/openapi.json is stale: run `make openapi` and commit it"


def test_document_is_openapi_3_1_with_every_endpoint():
    spec = json.loads(COMMITTED.read_text())
    assert spec["openapi"].startswith("3.1.")
    assert {(method, path) for path, item in spec["paths"].items() for method in item} == OPERATIONS


def test_inference_endpoints_accept_multipart_and_base64_json_and_document_their_errors():
    spec = json.loads(COMMITTED.read_text())
    for path in ("/v1/detect", "/v1/classify", "/v1/embed"):
        operation = spec["paths"][path]["post"]
        assert set(operation["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
        for status in ("400", "404", "413", "429", "500", "503", "504"):
            assert operation["responses"][status]["content"] == {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            }
