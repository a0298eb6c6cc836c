"""A refusal's gRPC RetryInfo reaches HTTP clients as Retry-After, on the 429 (and 503);
every 429 and 503 carries one (one second when the server gave no estimate)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx
import pytest

from inferline.common import errors
from inferline.common.generated import controller_pb2, controller_pb2_grpc
from inferline.common.server import Service
from inferline.common.settings import Settings
from inferline.services.gateway.problems import DEFAULT_RETRY_AFTER_S
from tests.support.gateway import RunningGateway
from tests.support.servers import LoopThread, start_service


def _hinted_unavailable() -> errors.ModelNotReady:
    """A 503 whose server knows when to come back: the trailer carries any error's hint."""
    error = errors.ModelNotReady("still loading")
    error.retry_after_s = 7.5  # type: ignore[attr-defined]
    return error


# Model name -> what the controller raises: a hint, a fractional hint, none, a 503 with and without.
REFUSALS = {
    "hinted": errors.Overloaded("busy", retry_after_s=2.0),
    "fraction": errors.Overloaded("busy", retry_after_s=0.2),
    "unhinted": errors.Overloaded("busy"),
    "loading": errors.ModelNotReady("still loading"),
    "loading-hinted": _hinted_unavailable(),
}


class RefusingController(controller_pb2_grpc.ControllerServiceServicer):
    async def Detect(self, request, context):  # noqa: N802 - gRPC's method name
        raise REFUSALS[request.model]


def _build(settings: Settings) -> Service:
    def register(server: grpc.aio.Server) -> list[str]:
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(RefusingController(), server)
        return [controller_pb2.DESCRIPTOR.services_by_name["ControllerService"].full_name]

    return Service("refusing-controller", register)


@pytest.fixture(scope="module")
def gateway(settings) -> Iterator[httpx.Client]:
    loop = LoopThread()
    controller = start_service(loop, _build, settings)
    running = RunningGateway(settings, controller.address)
    try:
        with httpx.Client(base_url=running.url, timeout=30) as client:
            yield client
    finally:
        running.stop()
        controller.stop()
        loop.close()


def _detect(client: httpx.Client, model: str) -> httpx.Response:
    return client.post("/v1/detect", params={"model": model}, files=[("images", ("a.png", b"any bytes", "image/png"))])


def test_a_refusal_with_a_retry_hint_is_a_429_with_retry_after(gateway):
    response = _detect(gateway, "hinted")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.json()["code"] == "RESOURCE_EXHAUSTED"


def test_a_fractional_hint_rounds_up_to_whole_seconds(gateway):
    response = _detect(gateway, "fraction")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"


def test_a_refusal_without_a_hint_says_retry_after_one_second(gateway):
    response = _detect(gateway, "unhinted")
    assert response.status_code == 429
    assert response.headers["retry-after"] == str(DEFAULT_RETRY_AFTER_S) == "1"


def test_a_503_with_a_retry_hint_carries_retry_after_too(gateway):
    response = _detect(gateway, "loading-hinted")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "8"


def test_a_503_without_a_hint_says_retry_after_one_second(gateway):
    response = _detect(gateway, "loading")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"


def test_errors_that_invite_no_retry_carry_no_retry_after(gateway):
    response = gateway.post("/v1/detect", params={"conf": 7}, files=[("images", ("a.png", b"x", "image/png"))])
    assert response.status_code == 400
    assert "retry-after" not in response.headers
