"""Issue 16 under faults, on a supervised subprocess stack (as `inferline up` runs it): ~1,000
Detect calls with tiny images through the shm data plane, kill -9 of preprocess, of inference and
of the controller in the middle. Afterwards /dev/shm holds as many pool objects and bytes as
before, the controller's RSS is flat across the stage kills, the restarted stages get the pool
(registered again) and only calls in flight at a kill fail."""

from __future__ import annotations

import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferline.common.settings import Settings
from inferline.common.shm import SHM_ROOT
from inferline.common.shm_pool import PREFIX
from inferline.services.stack import LocalStack, free_ports, wait_serving
from tests.reliability.test_faults import CLIENTS, ClosedLoop, _env
from tests.support.images import encoded

pytestmark = pytest.mark.slow

CALLS_PER_PHASE = 250
# Generous: CI's runners are small and the calls are many.
PHASE_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_ports(1)[0]


@pytest.fixture(scope="module")
def shm_stack(model_dir: Path, metrics_port: int) -> Iterator[LocalStack]:
    env = _env(model_dir, {"INFERLINE_TENSOR_TRANSPORT": "shm", "INFERLINE_CONTROLLER_METRICS_PORT": str(metrics_port)})
    stack = LocalStack(Settings.from_env(env), env=env, supervise=True)
    stack.start(timeout=240)
    yield stack
    stack.stop()


def _pool_objects() -> tuple[int, int]:
    """How many pool objects /dev/shm holds, and the bytes they occupy."""
    entries = [e for e in os.scandir(SHM_ROOT) if e.name.startswith(PREFIX)]
    return len(entries), sum(e.stat(follow_symlinks=False).st_blocks * 512 for e in entries)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _shm_tensors(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("inferline_tensor_transport_total{") and 'stage="inference"' in line and "shm" in line
    )


def _kill(stack: LocalStack, name: str) -> None:
    before = stack.processes[name].pid
    os.kill(before, signal.SIGKILL)
    wait_serving(stack.address(name), timeout=120)
    assert stack.processes[name].pid != before, f"{name} was not restarted"


def test_kill_9_of_each_stage_mid_load_leaves_dev_shm_and_controller_rss_flat(shm_stack, metrics_port):
    image = encoded(48, 64)
    with ClosedLoop(shm_stack.controller_target, shm_stack.settings, image, resilient=True) as load:
        load.wait_ok(CALLS_PER_PHASE, PHASE_TIMEOUT_S)
        objects = _pool_objects()
        rss = _rss_kib(shm_stack.processes["controller"].pid)
        assert objects[0] >= 1, "the controller made its pool"
        for stage in ("preprocess", "inference"):
            _kill(shm_stack, stage)
            shm_before = _shm_tensors(metrics_port)
            load.wait_ok(CALLS_PER_PHASE, PHASE_TIMEOUT_S)
            assert _shm_tensors(metrics_port) - shm_before >= CALLS_PER_PHASE / 2, (
                f"after the {stage} stage restarted, tensors no longer went through shared memory"
            )
        assert _rss_kib(shm_stack.processes["controller"].pid) <= rss * 1.1 + 8 * 1024
        _kill(shm_stack, "controller")
        load.wait_ok(CALLS_PER_PHASE, PHASE_TIMEOUT_S)
        assert _pool_objects() == objects, "the dead controller's pool was not reaped"
    assert len(load.failures) <= 3 * CLIENTS, load.failures
    print(f"shm under kill -9: {load.ok} calls OK, {len(load.failures)} failed (in flight at a kill)")
