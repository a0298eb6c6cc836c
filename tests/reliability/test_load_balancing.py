"""Client-side load balancing (issue 18): three copies of the preprocess and of the inference
stage behind one target (a static ``ipv4:`` list, the stand-in for a headless Service's DNS
records) share a controller's calls evenly; a copy killed with SIGKILL mid-load costs no call; a
copy started at a listed address receives calls within 30 s.

The copies are processes (a SIGKILL must close real sockets); the controller and postprocess run
in this process. Each copy's share is read from its own /metrics.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from inferline.common.channels import channel_target
from inferline.common.settings import Settings
from inferline.services.stack import free_ports, wait_serving
from tests.reliability.test_faults import ClosedLoop
from tests.support.servers import LoopThread, RunningServer, start_stage
from tests.support.standins import STANDIN_PINS

pytestmark = pytest.mark.slow

COPIES = 3
# The data-path method of each balanced stage, whose calls are counted per copy.
METHODS = {"preprocess": "Preprocess", "inference": "ModelInfer"}
TOLERANCE = 0.15
JOIN_WITHIN_S = 30.0


@dataclasses.dataclass
class Copy:
    stage: str
    port: int
    metrics_port: int
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, env: dict[str, str]) -> None:
        child_env = {**env, f"INFERLINE_{self.stage.upper()}_METRICS_PORT": str(self.metrics_port)}
        command = [sys.executable, "-m", "inferline.services.cli", "serve", self.stage,
                   "--exit-with-parent", str(os.getpid()), "--port", str(self.port)]
        self.process = subprocess.Popen(command, env=child_env)
        wait_serving(self.address, 240, lambda: self.process is not None and self.process.poll() is None)

    def calls(self) -> float:
        """Calls of the stage's data-path method this copy answered OK so far."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "inferline_rpc_duration_seconds_count"
            and sample.labels.get("method") == METHODS[self.stage] and sample.labels.get("code") == "OK"
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclasses.dataclass
class Balanced:
    """The copies (the last of each stage listed in the target but not started), and the
    controller's address."""

    copies: dict[str, list[Copy]]
    env: dict[str, str]
    controller: str
    settings: Settings

    def running(self, stage: str) -> list[Copy]:
        return [c for c in self.copies[stage] if c.process is not None and c.process.poll() is None]


@pytest.fixture(scope="module")
def balanced(model_dir: Path) -> Iterator[Balanced]:
    env = dict(os.environ)
    env.update(
        INFERLINE_MODEL_DIR=str(model_dir), INFERLINE_MODELS="yolov8n", INFERLINE_ALLOW_DOWNLOAD="false",
        INFERLINE_LOG_FORMAT="text", INFERLINE_LOG_LEVEL="WARNING", INFERLINE_WORKER_THREADS="1",
        INFERLINE_TORCH_THREADS="1", INFERLINE_DRAIN_DELAY_S="0.5",
    )
    ports = iter(free_ports(4 * (COPIES + 1)))
    copies = {stage: [Copy(stage, next(ports), next(ports)) for _ in range(COPIES + 1)] for stage in METHODS}
    settings = Settings(
        model_dir=(model_dir,), models=("yolov8n",), allow_download=False, trusted_weights=STANDIN_PINS,
        worker_threads=1, readiness_poll_s=0.2, admission_min_limit=64, admission_initial_limit=64,
        **{f"{stage}_target": channel_target(",".join(c.address for c in copies[stage])) for stage in METHODS},
    )
    assert settings.inference_target.startswith("ipv4:127.0.0.1:")
    loop = LoopThread()
    servers: list[RunningServer] = []
    try:
        for stage in METHODS:
            for copy in copies[stage][:COPIES]:
                copy.start(env)
        servers.append(start_stage(loop, "postprocess", settings))
        settings = dataclasses.replace(settings, postprocess_target=servers[0].address)
        servers.append(start_stage(loop, "controller", settings))
        wait_serving(servers[-1].address, 60)
        yield Balanced(copies, env, servers[-1].address, settings)
    finally:
        for server in reversed(servers):
            server.stop()
        loop.close()
        for stage_copies in copies.values():
            for copy in stage_copies:
                copy.stop()


@pytest.fixture(scope="module")
def image(data_dir: Path) -> bytes:
    return (data_dir / "shapes_01.jpg").read_bytes()


def _counts(copies: list[Copy]) -> list[float]:
    return [copy.calls() for copy in copies]


def test_calls_spread_over_three_copies_of_each_stage_within_15_percent(balanced, image):
    before = {stage: _counts(balanced.running(stage)) for stage in METHODS}
    with ClosedLoop(balanced.controller, balanced.settings, image, clients=6) as load:
        load.wait_ok(150, timeout=240)
    assert load.failures == []
    for stage in METHODS:
        shares = [after - start for after, start in zip(_counts(balanced.running(stage)), before[stage], strict=True)]
        mean = sum(shares) / len(shares)
        assert mean >= 40, (stage, shares)
        assert all(abs(share - mean) <= TOLERANCE * mean for share in shares), (stage, shares)


def test_a_copy_killed_mid_load_costs_no_call(balanced, image):
    with ClosedLoop(balanced.controller, balanced.settings, image, clients=6) as load:
        load.wait_ok(20, timeout=120)
        for stage in METHODS:
            victim = balanced.running(stage)[-1]
            assert victim.process is not None
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait(10)
        survivors = {stage: _counts(balanced.running(stage)) for stage in METHODS}
        load.wait_ok(60, timeout=240)
    assert load.failures == []
    for stage in METHODS:
        assert len(survivors[stage]) == COPIES - 1
        # Every survivor keeps taking its share of the calls.
        now = _counts(balanced.running(stage))
        gained = [after - start for after, start in zip(now, survivors[stage], strict=True)]
        assert all(g >= 10 for g in gained), (stage, gained)


def test_a_copy_started_at_a_listed_address_receives_calls_within_30_s(balanced, image):
    """A static list's new member: an address listed from the start whose copy starts now (with
    ``dns:///`` a new pod's record joins at the next resolution instead, which the servers'
    max_connection_age forces every ~30 s; docs/deployment.md)."""
    newcomers = [balanced.copies[stage][COPIES] for stage in METHODS]
    with ClosedLoop(balanced.controller, balanced.settings, image, clients=6) as load:
        for copy in newcomers:
            copy.start(balanced.env)
        serving = time.monotonic()
        waiting = list(newcomers)
        while waiting and time.monotonic() - serving < JOIN_WITHIN_S:
            waiting = [copy for copy in waiting if copy.calls() == 0]
            time.sleep(0.5)
        joined_after = time.monotonic() - serving
        load.wait_ok(10, timeout=120)
    assert waiting == [], f"{[c.stage for c in waiting]} got no call within {JOIN_WITHIN_S:.0f} s"
    assert joined_after < JOIN_WITHIN_S
    assert load.failures == []
