"""Pieces of the gateway on their own: the one-minute window, option parsing, a crash inside it."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from inferline.common.settings import Settings
from inferline.services.gateway.app import create_app
from inferline.services.gateway.inputs import validated
from inferline.services.gateway.metrics import RecentRequests
from inferline.services.gateway.problems import ApiError
from inferline.services.gateway.schemas import ClassifyParams, DetectParams


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_window_p95_is_the_nearest_rank_of_the_last_minute():
    clock = Clock()
    window = RecentRequests(window_s=60, clock=clock)
    for ms in range(1, 101):  # 1..100 ms
        window.add(ms / 1000, failed=ms > 98)
    stats = window.stats()
    assert (stats.requests, stats.p95_ms, stats.errors) == (100, 95.0, 2)
    assert stats.rate_per_s == pytest.approx(100 / 60, abs=1e-3)


def test_window_forgets_requests_older_than_a_minute():
    clock = Clock()
    window = RecentRequests(window_s=60, clock=clock)
    window.add(5.0, failed=True)
    clock.now += 61
    window.add(0.010, failed=False)
    stats = window.stats()
    assert (stats.requests, stats.p95_ms, stats.errors) == (1, 10.0, 0)
    clock.now += 61
    assert window.stats().p95_ms is None and window.stats().requests == 0


def test_labels_may_be_repeated_or_comma_separated_and_blanks_are_dropped():
    params = validated(ClassifyParams, {"labels": ["a cat, a dog", " ", "a bus"]})
    assert params.labels == ["a cat", "a dog", "a bus"]


@pytest.mark.parametrize(
    "raw,field",
    [({"conf": 1.5}, "conf"), ({"classes": [2**31]}, "classes"), ({"model": "\ud800"}, "model"),
     ({"format": "gif"}, "format")],
)
def test_out_of_range_or_unencodable_options_are_refused_by_name(raw, field):
    with pytest.raises(ApiError) as refused:
        validated(DetectParams, raw)
    assert refused.value.http == 400 and field in refused.value.detail


def test_a_crash_inside_the_gateway_is_a_500_problem_with_its_request_id():
    app = create_app(Settings())

    @app.get("/crash")
    async def crash() -> None:
        raise RuntimeError("secret detail")

    response = TestClient(app).get("/crash", headers={"X-Request-ID": "crash-1"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "crash-1"
    assert response.json()["code"] == "INTERNAL" and "secret" not in response.text
