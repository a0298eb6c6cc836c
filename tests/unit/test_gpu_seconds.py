"""GPU seconds and their cost (issue 18): a request's share of the passes that ran on a GPU.

No GPU here: a fake backend's passes are declared to run on one (``on_gpu``), which is all the
accounting looks at; which real backends count as on a GPU is ``runs_on_gpu``'s job, tested too.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from inferline.common.telemetry.context import CPU, GPU, CpuMeter
from inferline.common.telemetry.interceptors import TelemetryServerInterceptor
from inferline.services.inference.batching import BatchingConfig, DynamicBatcher
from inferline.services.inference.models import runs_on_gpu

PASS_S = 0.05


def _slow(items: list) -> list:
    time.sleep(PASS_S)
    return items


def _meters_after_passes(on_gpu: bool, requests: int = 3) -> list[tuple[CpuMeter, CpuMeter]]:
    """``requests`` requests of one item each through a batcher of batch size 1; their meters."""

    async def main() -> list[tuple[CpuMeter, CpuMeter]]:
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(f"gpu-seconds-{on_gpu}", _slow, pool, BatchingConfig(max_batch_size=1),
                                     on_gpu=on_gpu)

            async def one(i: int) -> tuple[CpuMeter, CpuMeter]:
                cpu, gpu = CpuMeter(), CpuMeter()
                CPU.set(cpu)
                GPU.set(gpu)  # as the server interceptor does per request
                await batcher.submit([("a", i)])
                return cpu, gpu

            meters = await asyncio.gather(*(one(i) for i in range(requests)))
            await batcher.close()
            return list(meters)

    return asyncio.run(main())


def test_each_request_on_a_gpu_model_gets_the_wall_time_of_its_pass_as_gpu_seconds():
    for _, gpu in _meters_after_passes(on_gpu=True):
        assert PASS_S * 0.9 <= gpu.seconds <= PASS_S * 10


def test_a_cpu_model_counts_no_gpu_seconds():
    assert all(gpu.seconds == 0.0 for _, gpu in _meters_after_passes(on_gpu=False))


def test_backends_on_cuda_are_the_ones_that_count():
    assert runs_on_gpu(SimpleNamespace(on_cuda=True))
    assert not runs_on_gpu(SimpleNamespace(on_cuda=False))
    assert runs_on_gpu(SimpleNamespace(device=SimpleNamespace(type="cuda")))
    assert not runs_on_gpu(SimpleNamespace(device=SimpleNamespace(type="cpu")))
    assert not runs_on_gpu(SimpleNamespace())


def test_cost_adds_cpu_and_gpu_time_at_their_prices():
    interceptor = TelemetryServerInterceptor("inference", cost_per_core_hour=3600.0, cost_per_gpu_hour=7200.0)
    assert interceptor._cost(0.5, 0.25) == pytest.approx(0.5 * 1 + 0.25 * 2)
    assert TelemetryServerInterceptor("inference")._cost(0.5, 0.25) == 0.0
