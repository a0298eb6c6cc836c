"""Under overload the stack refuses early and cheaply, and runs nothing for callers who left.

A real stack (four `inferline serve` processes, YOLOv8n only, free ports) driven far past its
saturation by closed-loop clients that retry at once (the worst client). Behaviour, not speed:
the performance goals (goodput, refusal p99) are measured by bench/overload.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from inferline.common.generated import controller_pb2, controller_pb2_grpc, types_pb2
from inferline.common.settings import STAGES, Settings
from inferline.services import loadgen
from inferline.services.stack import LocalStack, free_ports

pytestmark = pytest.mark.slow

MODEL = "yolov8n"
# Far past what any CPU runner saturates at (about 4 on two cores), and cheap for the client.
CLIENTS = 48
GENEROUS_DEADLINE_S = 30.0


class Stack:
    def __init__(self, settings: Settings, env: dict[str, str], running: LocalStack):
        self.settings = settings
        self.env = env
        self.running = running

    @property
    def target(self) -> str:
        return self.running.controller_target

    def metric(self, stage: str, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` on a stage's /metrics whose labels include ``labels``."""
        port = self.env[f"INFERLINE_{stage.upper()}_METRICS_PORT"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        total = 0.0
        for line in text.splitlines():
            match = re.match(rf"{name}(?:{{(.*)}})? (\S+)$", line)
            if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
                total += float(match.group(2))
        return total


@pytest.fixture(scope="module")
def stack(model_dir: Path) -> Iterator[Stack]:
    ports = free_ports(2 * len(STAGES) + 1)
    env = dict(os.environ)
    env.update(INFERLINE_MODELS=MODEL, INFERLINE_MODEL_DIR=str(model_dir), INFERLINE_ALLOW_DOWNLOAD="false",
               INFERLINE_LOG_LEVEL="WARNING", INFERLINE_GRACE_PERIOD_S="2",
               # Half a second of queued work, not the default 3 s: the clients must overload
               # the stack on a runner of any speed (3 s is ~50 images on two cores).
               INFERLINE_ADMISSION_QUEUE_S="0.5",
               # Refuse at once rather than wait up to 1 s for room (the default): what these
               # tests specify is the refusal itself, at its cheapest. The wait, which keeps
               # callers that retry at once from storming, is specified in tests/unit/test_admission.py.
               INFERLINE_ADMISSION_WAIT_S="0")
    for stage, port, metrics in zip(STAGES, ports, ports[len(STAGES):], strict=False):
        env[f"INFERLINE_{stage.upper()}_PORT"] = str(port)
        env[f"INFERLINE_{stage.upper()}_TARGET"] = f"localhost:{port}"
        env[f"INFERLINE_{stage.upper()}_METRICS_PORT"] = str(metrics)
    env["INFERLINE_GATEWAY_PORT"] = str(ports[-1])
    settings = Settings.from_env(env)
    with LocalStack(settings, env=env) as running:
        yield Stack(settings, env, running)


@pytest.fixture(scope="module")
def overload(stack: Stack, sample_images: list[Path]) -> loadgen.BenchResult:
    """One closed-loop run far past saturation; the tests below read what it did."""
    return asyncio.run(loadgen.drive(
        stack.target, MODEL, sample_images, concurrency=CLIENTS, duration=8.0, warmup=2.0, timeout=GENEROUS_DEADLINE_S,
    ))


def test_under_overload_every_non_ok_call_is_resource_exhausted_with_a_retry_hint(overload):
    calls = overload.calls
    assert calls.get("OK", 0) > 0, calls
    assert calls.get(loadgen.REFUSED, 0) > 0, f"{CLIENTS} clients did not overload the stack: {calls}"
    assert set(calls) == {"OK", loadgen.REFUSED}, calls
    assert overload.hinted == calls[loadgen.REFUSED], "every refusal carries a RetryInfo hint"
    assert overload.failed_image_codes == {}, "no image failed inside an OK call (no DEADLINE_EXCEEDED item)"


def test_with_a_generous_deadline_no_call_exceeds_it(overload):
    assert "DEADLINE_EXCEEDED" not in overload.calls


def test_refusals_are_decided_before_any_preprocess_call(stack, overload):
    detect = {code: stack.metric("controller", "inferline_rpc_duration_seconds_count", method="Detect", code=code)
              for code in ("OK", loadgen.REFUSED)}
    preprocess_calls = stack.metric("preprocess", "inferline_rpc_duration_seconds_count", method="Preprocess")
    assert detect[loadgen.REFUSED] > 0
    # One image per call: every admitted call made exactly one preprocess call, no refused one did
    # (the warm-up's ModelInfo makes none either).
    assert preprocess_calls == detect["OK"]


def test_refusals_cost_less_than_the_work_they_spare(overload):
    assert overload.percentile_ms(50, loadgen.REFUSED) < overload.percentile_ms(50, "OK") / 2


def test_the_model_ran_nothing_for_callers_already_gone(stack, overload):
    assert stack.metric("inference", "inferline_wasted_items_total", model=MODEL) == 0


def test_cancelled_callers_leave_no_admitted_or_queued_work_behind(stack, sample_images):
    """Callers that go away free what they held in the controller and queued downstream, and
    nothing runs beyond what was admitted. (That a cancelled caller's queued items never run is
    specified exactly, with a fake slow model, in tests/unit/test_batching.py.)"""
    image = types_pb2.Image(data=sample_images[0].read_bytes(), name=sample_images[0].name)
    ran_before = stack.metric("inference", "inferline_batch_size_sum", model=MODEL)
    callers = 24

    async def go_away() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(stack.target) as channel:
            stub = controller_pb2_grpc.ControllerServiceStub(channel)
            calls = [stub.Detect(controller_pb2.DetectRequest(model=MODEL, images=[image]),
                                 timeout=60) for _ in range(callers)]
            await asyncio.sleep(0.2)
            for call in calls:
                call.cancel()
            return [await call.code() for call in calls]

    codes = asyncio.run(go_away())
    # Refused at once, answered within the 0.2 s, or cancelled while admitted.
    assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OK, grpc.StatusCode.CANCELLED}, codes
    assert grpc.StatusCode.CANCELLED in codes
    admitted = codes.count(grpc.StatusCode.CANCELLED) + codes.count(grpc.StatusCode.OK)
    expires = time.monotonic() + 30
    while (stack.metric("controller", "inferline_admission_in_flight", model=MODEL)
           or stack.metric("inference", "inferline_queue_depth", model=MODEL)):
        assert time.monotonic() < expires, "admitted or queued work stayed behind after its callers left"
        time.sleep(0.05)
    ran = stack.metric("inference", "inferline_batch_size_sum", model=MODEL) - ran_before
    assert ran <= admitted, f"{ran:g} images ran for {admitted} admitted callers"
