"""Dynamic batching: Triton's semantics, checked by what ran together, not by the clock."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import REGISTRY

from inferline.common.errors import DeadlineExceeded, Overloaded
from inferline.services.inference.batching import RECENT_BATCHES, BatchingConfig, DynamicBatcher


class Recorder:
    """A fake model: doubles each item and remembers every batch it ran."""

    def __init__(self, gate: threading.Event | None = None, fail_on: object = None):
        self.batches: list[list] = []
        self.gate = gate
        self.fail_on = fail_on

    def __call__(self, items: list) -> list:
        if self.gate is not None:
            self.gate.wait(10)
        self.batches.append(list(items))
        if self.fail_on in items:
            raise RuntimeError("boom")
        return [item * 2 for item in items]


def _run(coro):
    return asyncio.run(coro)


async def _occupy(batcher: DynamicBatcher) -> asyncio.Future:
    """Submits one item and returns once its pass has started, so the model is busy."""
    running = asyncio.ensure_future(batcher.submit([("a", 0)]))
    while not batcher.batch_sizes:
        await asyncio.sleep(0)
    return running


@pytest.fixture()
def executor():
    with ThreadPoolExecutor(1) as pool:
        yield pool


def test_results_come_back_in_order_per_caller(executor):
    async def main():
        batcher = DynamicBatcher("m", Recorder(), executor, BatchingConfig(max_batch_size=8))
        assert await batcher.submit([("a", 1), ("a", 2), ("a", 3)]) == [2, 4, 6]
        await batcher.close()

    _run(main())


def test_concurrent_requests_share_one_forward_pass(executor):
    async def main():
        model = Recorder()
        batcher = DynamicBatcher("m", model, executor, BatchingConfig(max_batch_size=4, max_queue_delay_s=5.0))
        # A full batch (4) runs at once, without waiting the 5 s delay.
        results = await asyncio.gather(*(batcher.submit([("a", i)]) for i in range(4)))
        assert results == [[0], [2], [4], [6]]
        assert model.batches == [[0, 1, 2, 3]]
        await batcher.close()

    _run(main())


def test_items_queued_while_the_model_runs_form_the_next_batch(executor):
    async def main():
        gate = threading.Event()
        model = Recorder(gate)
        batcher = DynamicBatcher("m", model, executor, BatchingConfig(max_batch_size=3))
        first = await _occupy(batcher)
        rest = [asyncio.ensure_future(batcher.submit([("a", i)])) for i in (1, 2, 3, 4)]
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(first, *rest)
        assert model.batches == [[0], [1, 2, 3], [4]]
        await batcher.close()

    _run(main())


def test_different_shapes_never_share_a_batch(executor):
    async def main():
        model = Recorder()
        batcher = DynamicBatcher("m", model, executor, BatchingConfig(max_batch_size=8, max_queue_delay_s=0.01))
        assert await batcher.submit([("small", 1), ("large", 10), ("small", 2), ("large", 20)]) == [2, 20, 4, 40]
        assert sorted(model.batches) == [[1, 2], [10, 20]]
        await batcher.close()

    _run(main())


def test_a_preferred_batch_size_runs_without_waiting_for_a_full_batch(executor):
    async def main():
        model = Recorder()
        batcher = DynamicBatcher("m", model, executor,
                                 BatchingConfig(max_batch_size=8, max_queue_delay_s=5.0, preferred_batch_sizes=(2,)))
        assert await batcher.submit([("a", 1), ("a", 2)]) == [2, 4]
        assert model.batches == [[1, 2]]
        await batcher.close()

    _run(main())


def test_a_full_queue_refuses_at_once_with_overloaded(executor):
    async def main():
        gate = threading.Event()
        batcher = DynamicBatcher("m", Recorder(gate), executor, BatchingConfig(max_batch_size=1, max_queue_size=3))
        held = asyncio.ensure_future(batcher.submit([("a", 0), ("a", 1), ("a", 2)]))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="limit 3"):
            await batcher.submit([("a", 3), ("a", 4)])
        gate.set()
        assert await held == [0, 2, 4], "what was queued still runs"
        await batcher.close()

    _run(main())


def test_items_whose_deadline_passed_in_the_queue_are_dropped_before_running(executor):
    async def main():
        gate = threading.Event()
        model = Recorder(gate)
        batcher = DynamicBatcher("m", model, executor, BatchingConfig(max_batch_size=1))
        blocker = await _occupy(batcher)
        late = asyncio.ensure_future(batcher.submit([("a", 1)], timeout=0.0))
        await asyncio.sleep(0)
        gate.set()
        await blocker
        (outcome,) = await late
        assert isinstance(outcome, DeadlineExceeded)
        assert model.batches == [[0]], "the expired item never reached the model"
        await batcher.close()

    _run(main())


def test_a_failed_pass_fails_its_items_and_the_batcher_goes_on(executor):
    async def main():
        batcher = DynamicBatcher("m", Recorder(fail_on=13), executor, BatchingConfig(max_batch_size=2))
        outcomes = await batcher.submit([("a", 13), ("a", 1)])
        assert all(isinstance(o, RuntimeError) for o in outcomes)
        assert await batcher.submit([("a", 5)]) == [10]
        await batcher.close()

    _run(main())


def test_a_cancelled_caller_costs_no_model_run(executor):
    async def main():
        gate = threading.Event()
        model = Recorder(gate)
        batcher = DynamicBatcher("m", model, executor, BatchingConfig(max_batch_size=1))
        blocker = await _occupy(batcher)
        gone = asyncio.ensure_future(batcher.submit([("a", 1)]))
        await asyncio.sleep(0)
        gone.cancel()
        gate.set()
        await blocker
        assert await batcher.submit([("a", 2)]) == [4]
        assert model.batches == [[0], [2]]
        await batcher.close()

    _run(main())


def test_instances_run_that_many_batches_at_once():
    """Two instances: two passes meet inside the model (a barrier only both together can cross);
    the items that queued meanwhile still form batches."""
    both_inside = threading.Barrier(2, timeout=10)
    ran: list[list] = []

    def model(items: list) -> list:
        ran.append(list(items))
        if len(ran) <= 2:
            both_inside.wait()
        return [item * 2 for item in items]

    async def main():
        with ThreadPoolExecutor(2) as pool:
            batcher = DynamicBatcher("m", model, pool, BatchingConfig(max_batch_size=4, instances=2))
            first = asyncio.ensure_future(batcher.submit([("a", 1)]))
            while not batcher.batch_sizes:
                await asyncio.sleep(0)
            second = asyncio.ensure_future(batcher.submit([("a", 2)]))
            assert await asyncio.gather(first, second) == [[2], [4]]
            assert await batcher.submit([("a", n) for n in range(3)]) == [0, 2, 4]
            await batcher.close()

    _run(main())
    assert sorted(map(len, ran[:2])) == [1, 1] and not both_inside.broken


def test_one_instance_never_runs_two_batches_at_once():
    inside = 0
    most = 0
    lock = threading.Lock()

    def model(items: list) -> list:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        threading.Event().wait(0.01)
        with lock:
            inside -= 1
        return items

    async def main():
        with ThreadPoolExecutor(4) as pool:
            batcher = DynamicBatcher("m", model, pool, BatchingConfig(max_batch_size=1))
            await asyncio.gather(*(batcher.submit([("a", n)]) for n in range(6)))
            await batcher.close()

    _run(main())
    assert most == 1


# ---- overload: deadline-aware queue, cancellation, wasted runs --------------------------------


def _wasted(model: str) -> float:
    return REGISTRY.get_sample_value("inferline_wasted_items_total", {"model": model}) or 0.0


def test_cancelled_queued_callers_free_all_their_queued_work(executor):
    """64 callers queue behind a busy model, then all go away: none of their items runs."""

    async def main():
        gate = threading.Event()
        model = Recorder(gate)
        batcher = DynamicBatcher("cancel-64", model, executor, BatchingConfig(max_batch_size=32))
        blocker = await _occupy(batcher)
        callers = [asyncio.ensure_future(batcher.submit([("a", n)])) for n in range(1, 65)]
        await asyncio.sleep(0)
        assert batcher.depth == 64
        for caller in callers:
            caller.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        gate.set()
        await blocker
        assert await batcher.submit([("a", 100)]) == [200]
        assert model.batches == [[0], [100]], "no cancelled caller's item reached the model"
        assert batcher.depth == 0
        await batcher.close()

    _run(main())
    assert _wasted("cancel-64") == 0


def test_an_item_that_cannot_start_before_its_deadline_is_refused_at_submit_with_a_hint(executor):
    async def main():
        gate = threading.Event()
        batcher = DynamicBatcher("m", Recorder(gate), executor, BatchingConfig(max_batch_size=1))
        batcher.item_seconds = 1.0  # as timed by earlier passes
        blocker = await _occupy(batcher)
        queued = asyncio.ensure_future(batcher.submit([("a", 1), ("a", 2)], timeout=60.0))
        await asyncio.sleep(0)
        # One running and two queued at 1 s each: four seconds before this one would be done,
        # and the hint is the three the work ahead needs to drain.
        with pytest.raises(Overloaded, match="after their deadline") as refused:
            await batcher.submit([("a", 3)], timeout=2.0)
        assert refused.value.retry_after_s == pytest.approx(3.0)
        gate.set()
        await asyncio.gather(blocker, queued)
        await batcher.close()

    _run(main())


def test_the_queue_bound_follows_the_deadline_not_only_the_constant(executor):
    async def main():
        gate = threading.Event()
        batcher = DynamicBatcher("m", Recorder(gate), executor, BatchingConfig(max_batch_size=1, max_queue_size=1000))
        batcher.item_seconds = 0.5
        blocker = await _occupy(batcher)
        taken = [asyncio.ensure_future(batcher.submit([("a", n)], timeout=5.0)) for n in range(20)]
        await asyncio.sleep(0)
        outcomes = await asyncio.gather(*taken[9:], return_exceptions=True)
        # 5 s of deadline at 0.5 s per item: the running one and 9 queued fit, the rest are refused.
        assert batcher.depth == 9
        assert all(isinstance(o, Overloaded) for o in outcomes)
        gate.set()
        await asyncio.gather(blocker, *taken[:9])
        await batcher.close()

    _run(main())


def test_an_item_whose_deadline_would_pass_during_its_pass_never_runs(executor):
    async def main():
        gate = threading.Event()
        model = Recorder(gate)
        batcher = DynamicBatcher("m", model, executor, BatchingConfig(max_batch_size=4))
        blocker = await _occupy(batcher)
        doomed = asyncio.ensure_future(batcher.submit([("a", 1)], timeout=5.0))
        await asyncio.sleep(0)
        batcher.item_seconds = 10.0  # the passes turn out slow: this item could not finish in time
        gate.set()
        await blocker
        (outcome,) = await doomed
        assert isinstance(outcome, DeadlineExceeded)
        assert model.batches == [[0]]
        await batcher.close()

    _run(main())


def test_items_whose_caller_left_during_their_pass_are_counted_as_wasted(executor):
    async def main():
        gate = threading.Event()
        batcher = DynamicBatcher("wasted", Recorder(gate), executor, BatchingConfig(max_batch_size=4))
        running = await _occupy(batcher)
        running.cancel()
        gate.set()
        while batcher.running:
            await asyncio.sleep(0.01)
        await batcher.close()

    before = _wasted("wasted")
    _run(main())
    assert _wasted("wasted") == before + 1


def test_the_batch_size_record_is_bounded(executor):
    async def main():
        batcher = DynamicBatcher("m", Recorder(), executor, BatchingConfig(max_batch_size=1))
        for n in range(RECENT_BATCHES + 10):
            await batcher.submit([("a", n)])
        assert len(batcher.batch_sizes) == RECENT_BATCHES
        assert batcher.batches_run == RECENT_BATCHES + 10
        await batcher.close()

    _run(main())
