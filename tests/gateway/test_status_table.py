"""The one status table also gives the gateway's HTTP codes, and the gateway answers by it."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx
import pytest

from inferline.common.status import INTERNAL_MESSAGE, STATUS_TABLE, http_status_for
from tests.support import failing_controller
from tests.support.gateway import RunningGateway
from tests.support.servers import LoopThread, start_service

ISSUE_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def test_table_gives_the_issue_s_http_code_for_each_grpc_code():
    for code, http in ISSUE_CODES.items():
        assert http_status_for(code) == http


def test_every_other_grpc_code_is_a_500():
    for code in grpc.StatusCode:
        if code not in ISSUE_CODES and code is not grpc.StatusCode.OK:
            assert http_status_for(code) == 500, code


def test_rows_sharing_a_grpc_code_share_its_http_code():
    seen: dict[grpc.StatusCode, int] = {}
    for _, code, http in STATUS_TABLE:
        assert seen.setdefault(code, http) == http, code


@pytest.fixture(scope="module")
def failing_gateway(settings) -> Iterator[httpx.Client]:
    loop = LoopThread()
    controller = start_service(loop, failing_controller.build_service, settings)
    gateway = RunningGateway(settings, controller.address)
    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            yield client
    finally:
        gateway.stop()
        controller.stop()
        loop.close()


@pytest.mark.parametrize("kind,code,http", STATUS_TABLE, ids=[row[0].__name__ for row in STATUS_TABLE])
def test_a_domain_error_in_the_controller_reaches_http_by_the_table(failing_gateway, kind, code, http):
    response = failing_gateway.post(
        "/v1/detect", params={"model": kind.__name__}, files=[("images", ("a.png", b"any bytes", "image/png"))]
    )
    assert response.status_code == http
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == code.name
    assert problem["status"] == http
    assert problem["request_id"] == response.headers["x-request-id"]
    if http == 500:
        assert problem["detail"] == INTERNAL_MESSAGE
    else:
        assert f"raised {kind.__name__} on purpose" in problem["detail"]


def test_an_unexpected_controller_failure_is_a_500_with_a_fixed_message(failing_gateway):
    response = failing_gateway.get("/v1/models/KeyError")
    assert response.status_code == 500
    assert response.json()["code"] == "INTERNAL"
    assert response.json()["detail"] == INTERNAL_MESSAGE
    assert "secret" not in response.text
