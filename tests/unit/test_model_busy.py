"""Model busy time and lone passes (issue 17): measured from what the batcher ran."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import REGISTRY

from inferline.services.inference.batching import BatchingConfig, BusyMeter, DynamicBatcher


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_busy_ratio_is_instance_seconds_in_passes_over_the_window():
    clock = Clock()
    meter = BusyMeter(instances=2, window_s=10.0, clock=clock)
    clock.now += 10.0
    meter.started(0)
    clock.now += 3.0
    assert meter.ended(0) == 3.0
    clock.now += 2.0
    # 3 busy instance-seconds of 2 instances x 10 s.
    assert meter.ratio() == 0.15


def test_busy_ratio_counts_a_running_pass_and_forgets_passes_older_than_the_window():
    clock = Clock()
    meter = BusyMeter(instances=1, window_s=10.0, clock=clock)
    clock.now += 20.0
    meter.started(0)
    clock.now += 4.0
    meter.ended(0)  # ended at 124: in the window until 134
    clock.now += 20.0
    meter.started(0)  # running since 144
    clock.now += 5.0
    assert meter.ratio() == 0.5


def test_busy_ratio_of_a_young_model_is_over_its_age_not_the_whole_window():
    clock = Clock()
    meter = BusyMeter(instances=1, window_s=60.0, clock=clock)
    meter.started(0)
    clock.now += 2.0
    meter.ended(0)
    clock.now += 2.0
    assert meter.ratio() == 0.5


class SlowModel:
    """A fake backend whose pass takes a known time (its work, not synchronisation)."""

    def __init__(self, seconds: float, gate: threading.Event | None = None):
        self.seconds = seconds
        self.gate = gate
        self.alone: list[int] = []
        self.shared: list[int] = []

    def run(self, items: list) -> list:
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.seconds)
        self.shared.append(len(items))
        return items

    def run_alone(self, items: list) -> list:
        time.sleep(self.seconds)
        self.alone.append(len(items))
        return items


def _busy_seconds(model: str, instance: str) -> float:
    labels = {"model": model, "model_instance": instance}
    return REGISTRY.get_sample_value("inferline_model_busy_seconds_total", labels) or 0.0


def test_busy_seconds_per_instance_measure_the_passes_time():
    model = SlowModel(0.05)

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher("busy-measured", model.run, pool, BatchingConfig(max_batch_size=1))
            for i in range(3):
                await batcher.submit([("a", i)])
            await batcher.close()
        return batcher

    started = time.monotonic()
    batcher = asyncio.run(main())
    wall = time.monotonic() - started
    busy = _busy_seconds("busy-measured", "0")
    assert 0.15 <= busy <= wall
    ratio = REGISTRY.get_sample_value("inferline_model_busy_ratio", {"model": "busy-measured"})
    age = time.monotonic() - started  # the model's life as the scrape saw it is at most this
    # Read at scrape time: the same meter's figure, the passes' share of the model's life.
    assert ratio is not None and 0.15 / age * 0.9 <= ratio <= 1
    assert batcher.busy.instances == 1


def test_a_pass_with_nothing_beside_it_runs_alone():
    model = SlowModel(0.0)

    async def main():
        with ThreadPoolExecutor(2) as pool:
            batcher = DynamicBatcher(
                "alone-one", model.run, pool, BatchingConfig(max_batch_size=1, instances=2), run_alone=model.run_alone
            )
            assert await batcher.submit([("a", 1)]) == [1]
            assert await batcher.submit([("a", 2)]) == [2]
            await batcher.close()

    asyncio.run(main())
    assert model.alone == [1, 1] and model.shared == []


def test_a_deep_queue_runs_parallel_passes_not_alone_ones():
    gate = threading.Event()
    model = SlowModel(0.0, gate)

    async def main():
        with ThreadPoolExecutor(2) as pool:
            batcher = DynamicBatcher(
                "alone-deep", model.run, pool, BatchingConfig(max_batch_size=1, instances=2), run_alone=model.run_alone
            )
            # Six requests at once: the queue is never empty when a pass forms, until the last.
            calls = [asyncio.ensure_future(batcher.submit([("a", i)])) for i in range(6)]
            while batcher.passes_running < 2:
                await asyncio.sleep(0)
            assert batcher.passes_alone == 0
            gate.set()
            results = await asyncio.gather(*calls)
            await batcher.close()
            return results

    results = asyncio.run(main())
    assert [r[0] for r in results] == list(range(6))
    assert len(model.shared) >= 4
