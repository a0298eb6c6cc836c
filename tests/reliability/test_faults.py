"""Faults under load, on subprocess stacks as `inferline up` runs them (supervised), YOLOv8n:

- SIGTERM of each stage in turn, under load: 0 failed calls (drain order + retries + restart);
- kill -9 of each stage: the stage is back and the stack answers OK within the model load time
  (read from the restarted stage's metric) + 5 s, and the controller is NOT_SERVING, for the
  whole stack and for the model, from when it sees the inference stage gone until it is loaded;
- with two copies of every stage, kill -9 of one copy of each in turn: 0 failed calls.

The load is a few closed-loop clients on loopback. Faults of the three stages behind the
controller are absorbed by the stack alone: those clients are plain (no retries, no waiting).
The controller is the callers' own peer: when it restarts or loses a copy, the clients call it as
a resilient client should, through a channel with inferline's retry policy (common/channels.py)
and waiting for ready.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferline.common.channels import channel_options, channel_target, client_options
from inferline.common.generated import controller_pb2, controller_pb2_grpc, types_pb2
from inferline.common.settings import Settings
from inferline.services.client.calls import CONTROLLER_SERVICE
from inferline.services.stack import START_ORDER, LocalStack, free_port_env, wait_serving

pytestmark = pytest.mark.slow

CLIENTS = 4
BEHIND_CONTROLLER = [stage for stage in START_ORDER if stage != "controller"]
# How late the controller may notice a change of a stage: its poll interval (set below) plus one
# refused health check.
READINESS_LAG_S = 1.0
POLL_S = 0.2  # the controller's readiness poll in these stacks


@dataclass
class ClosedLoop:
    """``clients`` threads calling Detect back to back until ``stop``; every outcome is kept.

    ``resilient``: through inferline's retry policy and waiting for ready; else a plain channel.
    """

    target: str
    settings: Settings
    image: bytes
    resilient: bool = False
    clients: int = CLIENTS
    ok: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> ClosedLoop:
        if self.resilient:
            self.channel = grpc.insecure_channel(
                channel_target(self.target), options=client_options(self.settings, health_service=CONTROLLER_SERVICE)
            )
        else:
            self.channel = grpc.insecure_channel(self.target, options=channel_options(self.settings))
        self.stub = controller_pb2_grpc.ControllerServiceStub(self.channel)
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def _client(self) -> None:
        request = controller_pb2.DetectRequest(model="yolov8n", images=[types_pb2.Image(data=self.image, name="a")])
        while not self._stop.is_set():
            try:
                reply = self.stub.Detect(request, timeout=60, wait_for_ready=self.resilient or None)
                failure = None if reply.results[0].status.code == 0 else f"image {reply.results[0].status.message}"
            except grpc.RpcError as exc:
                failure = f"{exc.code().name}: {exc.details()}"
            with self._changed:
                if failure is None:
                    self.ok += 1
                else:
                    self.failures.append((time.monotonic(), failure))
                self._changed.notify_all()

    def wait_ok(self, calls: int, timeout: float = 60) -> None:
        """Blocks until ``calls`` more calls have answered OK."""
        with self._changed:
            goal = self.ok + calls
            if not self._changed.wait_for(lambda: self.ok >= goal, timeout):
                raise AssertionError(
                    f"{calls} calls did not answer OK within {timeout:.0f} s; failures: {self.failures[-5:]}"
                )

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)
        self.channel.close()


def _env(model_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = free_port_env()
    env.update(
        INFERLINE_MODEL_DIR=str(model_dir),
        INFERLINE_MODELS="yolov8n",
        INFERLINE_ALLOW_DOWNLOAD="false",
        INFERLINE_LOG_FORMAT="text",
        INFERLINE_LOG_LEVEL="WARNING",
        INFERLINE_GRACE_PERIOD_S="10",
        INFERLINE_DRAIN_DELAY_S="0.5",
        INFERLINE_READINESS_POLL_S=str(POLL_S),
        INFERLINE_RESTART_BACKOFF_S="0.2",
        INFERLINE_WORKER_THREADS="1",
        **(extra or {}),
    )
    return env


@pytest.fixture(scope="module")
def inference_metrics_port() -> int:
    """A free port for the inference stage's /metrics, where the test reads its model load time."""
    return int(free_port_env()["INFERLINE_GATEWAY_PORT"])


@pytest.fixture(scope="module")
def supervised(model_dir: Path, inference_metrics_port: int) -> Iterator[LocalStack]:
    """One copy of each stage, restarted when it exits."""
    env = _env(model_dir, {"INFERLINE_INFERENCE_METRICS_PORT": str(inference_metrics_port)})
    stack = LocalStack(Settings.from_env(env), env=env, supervise=True)
    stack.start(timeout=240)
    yield stack
    stack.stop()


def _health(stub: health_pb2_grpc.HealthStub, service: str = "", wait_for_ready: bool = False) -> str:
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1 if not wait_for_ready else 0.3,
                           wait_for_ready=wait_for_ready)
    except grpc.RpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _spells(samples: list[tuple[float, str, str, str]], bad: Callable[[tuple[float, str, str, str]], bool]):
    """The runs of consecutive samples for which ``bad`` holds."""
    spells: list[list[tuple[float, str, str, str]]] = []
    previous = False
    for sample in samples:
        now = bad(sample)
        if now:
            if not previous:
                spells.append([])
            spells[-1].append(sample)
        previous = now
    return spells


def _restarted(stack: LocalStack, name: str, before: int) -> None:
    """Returns once the supervisor restarted ``name`` and the new process is SERVING."""
    wait_serving(stack.address(name), timeout=120)
    assert stack.processes[name].pid != before, f"{name} was not restarted"


def _model_load_seconds(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as reply:  # noqa: S310 - a local http URL
        text = reply.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("inferline_model_load_seconds{")
    )


def _callers_target(stack: LocalStack, resilient: bool) -> str:
    """All copies of the controller for a resilient client, the first for a plain one."""
    return stack.controller_target if resilient else stack.address("controller")


def _faults_under_load(stack: LocalStack, image: bytes, how: signal.Signals, names: list[str],
                       resilient: bool) -> ClosedLoop:
    """Sends ``how`` to each process of ``names`` in turn under load; the next fault once the
    process is back and calls answer again."""
    with ClosedLoop(_callers_target(stack, resilient), stack.settings, image, resilient=resilient) as load:
        load.wait_ok(8)
        for name in names:
            before = stack.processes[name].pid
            os.kill(before, how)
            load.wait_ok(8)
            _restarted(stack, name, before)
    return load


def test_sigterm_of_each_stage_in_turn_under_load_fails_no_call(supervised, data_dir):
    image = (data_dir / "shapes_01.jpg").read_bytes()
    behind = _faults_under_load(supervised, image, signal.SIGTERM, BEHIND_CONTROLLER, resilient=False)
    controller = _faults_under_load(supervised, image, signal.SIGTERM, ["controller"], resilient=True)
    print(
        f"SIGTERM of each stage: {behind.ok + controller.ok} calls OK, "
        f"{len(behind.failures + controller.failures)} failed"
    )
    assert behind.failures == [], behind.failures
    assert controller.failures == [], controller.failures


@dataclass
class HealthSamples:
    """The controller's and the inference stage's health, sampled every 50 ms on a thread."""

    controller: str
    inference: str
    samples: list[tuple[float, str, str, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> HealthSamples:
        def sample() -> None:
            # A channel whose peer died waits out gRPC's reconnect backoff (1 s, growing) before it
            # dials again, answering UNAVAILABLE meanwhile: a restarted stage would look down to
            # the sampler after the controller (which polls on its own channel) saw it SERVING.
            fast = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.min_reconnect_backoff_ms", 20),
                    ("grpc.max_reconnect_backoff_ms", 50)]
            with (
                grpc.insecure_channel(self.controller, options=fast) as controller,
                grpc.insecure_channel(self.inference, options=fast) as inference,
            ):
                of_controller, of_inference = (
                    health_pb2_grpc.HealthStub(controller),
                    health_pb2_grpc.HealthStub(inference),
                )
                while not self._stop.wait(0.05):
                    at = time.monotonic()
                    overall, model = _health(of_controller), _health(of_controller, "model/yolov8n")
                    stage = _health(of_inference)
                    if stage != "SERVING" and "SERVING" in (overall, model):
                        # Ask again, waiting briefly for a connection: the truth about the stage,
                        # not about this channel (kept short, so the loop still samples every 50 ms).
                        stage = _health(of_inference, wait_for_ready=True)
                    self.samples.append((at, overall, model, stage))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def wait_all_serving(self, timeout: float) -> bool:
        """Whether a sample within ``timeout`` s from now shows all three names SERVING."""
        expires = time.monotonic() + timeout
        while time.monotonic() < expires:
            if self.samples and self.samples[-1][1:] == ("SERVING", "SERVING", "SERVING"):
                return True
            time.sleep(0.05)
        return bool(self.samples) and self.samples[-1][1:] == ("SERVING", "SERVING", "SERVING")

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.parametrize("stage", START_ORDER)
def test_kill_9_of_a_stage_is_back_and_answering_within_its_load_time_plus_5s(
    supervised, inference_metrics_port, data_dir, stage
):
    image = (data_dir / "shapes_01.jpg").read_bytes()
    controller = f"localhost:{supervised.settings.port('controller')}"
    inference = f"localhost:{supervised.settings.port('inference')}"
    resilient = stage == "controller"
    with ClosedLoop(_callers_target(supervised, resilient), supervised.settings, image, resilient=resilient) as load, \
            HealthSamples(controller, inference) as health:
        load.wait_ok(4)
        before = supervised.processes[stage].pid
        killed = time.monotonic()
        os.kill(before, signal.SIGKILL)
        _restarted(supervised, stage, before)
        load.wait_ok(1)
        recovered = time.monotonic() - killed
        # Calls wait for a restarting stage, so the first OK answer can come before the
        # controller's next readiness poll: its health catches up within the poll lag.
        serving_again = health.wait_all_serving(READINESS_LAG_S * 3)
    metrics = f"http://127.0.0.1:{inference_metrics_port}/metrics"
    load_time = _model_load_seconds(metrics) if stage == "inference" else 0.0
    print(f"kill -9 {stage}: back and answering OK after {recovered:.2f} s (model load {load_time:.2f} s); "
          f"{len(load.failures)} failed calls of {load.ok + len(load.failures)} {load.failures}")
    assert recovered <= load_time + 5.0
    if stage == "inference":
        # A restart can take about as long as the controller's poll lag: its NOT_SERVING spell may
        # end within READINESS_LAG_S of the kill, so any sample after the kill counts here ...
        gone = [s for s in health.samples if s[0] >= killed and s[1] == "NOT_SERVING"]
        assert gone, "the controller never reported the inference stage gone"
        # ... while a SERVING right after the kill is the poll lag, not a lie; so is a moment's
        # disagreement later (the controller's view is one poll old, and the sampler's re-ask
        # waits for its own connection): a lie is a spell that outlasts one poll and one check.
        after_kill = [s for s in health.samples if s[0] >= killed + READINESS_LAG_S]
        lies = _spells(after_kill, lambda s: s[3] != "SERVING" and "SERVING" in (s[1], s[2]))
        timeline = [(round(s[0] - killed, 2), *s[1:]) for s in health.samples if s[0] >= killed]
        assert all(spell[-1][0] - spell[0][0] < POLL_S + 0.3 for spell in lies), (
            f"the controller was SERVING while the inference stage was not: {lies}; since the kill: {timeline}"
        )
        assert serving_again, f"the controller did not report SERVING again: {health.samples[-1][1:]}"


@pytest.fixture(scope="module")
def replicated(model_dir: Path) -> Iterator[LocalStack]:
    env = _env(model_dir)
    stack = LocalStack(Settings.from_env(env), env=env, supervise=True, replicas={stage: 2 for stage in START_ORDER})
    stack.start(timeout=240)
    yield stack
    stack.stop()


def test_kill_9_of_one_of_two_copies_of_each_stage_fails_no_call(replicated, data_dir):
    image = (data_dir / "shapes_01.jpg").read_bytes()
    behind = _faults_under_load(replicated, image, signal.SIGKILL, BEHIND_CONTROLLER, resilient=False)
    controller = _faults_under_load(replicated, image, signal.SIGKILL, ["controller"], resilient=True)
    print(f"kill -9 of one of two copies of each stage: {behind.ok + controller.ok} calls OK, "
          f"{len(behind.failures + controller.failures)} failed")
    assert behind.failures == [], behind.failures
    assert controller.failures == [], controller.failures
    assert replicated.restarts == {name: 1 if "#" not in name else 0 for name in replicated.processes}
