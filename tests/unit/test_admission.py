"""Admission control's arithmetic: the adaptive limit, the service rate, and what is refused."""

from __future__ import annotations

import asyncio
import time

import pytest

from inferline.common.errors import DeadlineExceeded, Overloaded, StageUnavailable
from inferline.common.model_info import ModelInfo, TensorInfo
from inferline.common.recipes import Recipe
from inferline.common.settings import Settings
from inferline.services.controller.admission import (
    Admission,
    AdmissionConfig,
    ModelAdmission,
    ServiceRate,
    VegasLimit,
)
from inferline.services.controller.operations import Controller, together
from inferline.services.controller.plan import METADATA_TTL_S
from inferline.services.controller.ports import Deadline


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _admission(clock: Clock | None = None, **config) -> ModelAdmission:
    return ModelAdmission("m", AdmissionConfig(**config), clock or Clock())


def _complete(admission: ModelAdmission, clock: Clock, images: int, latency: float, remaining: float = 60.0) -> None:
    with admission.admit(images, remaining):
        clock.now += latency


# ---- the limit ------------------------------------------------------------------------------


def _limit(**config) -> VegasLimit:
    limit = VegasLimit(AdmissionConfig(**config))
    limit.update(rtt=0.1, in_flight=1)  # the unloaded latency
    return limit


def test_the_lowest_latency_seen_is_the_unloaded_one_and_moves_nothing():
    limit = VegasLimit(AdmissionConfig(initial_limit=10))
    limit.update(rtt=0.3, in_flight=10)
    limit.update(rtt=0.1, in_flight=10)
    assert (limit.rtt_noload, limit.limit) == (0.1, 10)


def test_latency_near_the_unloaded_one_grows_the_limit_up_to_its_ceiling():
    limit = _limit(initial_limit=4, max_limit=40)
    for _ in range(100):
        limit.update(rtt=0.105, in_flight=int(limit.limit))
    assert limit.limit == 40


def test_a_long_queue_shrinks_the_limit_down_to_its_floor():
    limit = _limit(initial_limit=50, min_limit=10)
    for _ in range(200):
        limit.update(rtt=1.0, in_flight=int(limit.limit))
    assert limit.limit == 10


def test_a_queue_between_alpha_and_beta_holds_the_limit():
    limit = _limit(initial_limit=8, alpha=3, beta=6)
    limit.update(rtt=0.2, in_flight=8)  # 8 * (1 - 0.1 / 0.2) = 4 queued: between 3 and 6
    assert limit.limit == 8


def test_the_limit_settles_where_the_queue_is_between_alpha_and_beta():
    """A stack that completes 10 images/s, 0.1 s unloaded: latency is in_flight / 10 once
    saturated. The limit settles near saturation (1 image) plus a queue of 3 to 6."""
    limit = _limit(initial_limit=40, min_limit=1)
    for _ in range(300):
        limit.update(rtt=max(0.1, limit.limit / 10), in_flight=int(limit.limit))
    assert 4 <= limit.limit <= 8


def test_a_limit_the_callers_do_not_use_does_not_grow():
    limit = _limit(initial_limit=10)
    for _ in range(50):
        limit.update(rtt=0.1, in_flight=2)
    assert limit.limit == 10


def test_work_dropped_downstream_shrinks_the_limit_multiplicatively_to_the_floor():
    limit = _limit(initial_limit=10, min_limit=8)
    limit.dropped()
    assert limit.limit == pytest.approx(9)
    limit.dropped()
    limit.dropped()
    assert limit.limit == 8


# ---- the service rate ---------------------------------------------------------------------


def test_the_service_rate_is_images_in_flight_over_latency():
    rate = ServiceRate(weight=1.0)
    assert rate.seconds_for(10) is None
    rate.update(in_flight=8, latency_s=2.0)
    assert rate.per_s == pytest.approx(4.0)
    assert rate.seconds_for(10) == pytest.approx(2.5)


def test_the_service_rate_is_smoothed_and_ignores_empty_samples():
    rate = ServiceRate(weight=0.5)
    rate.update(in_flight=4, latency_s=1.0)
    rate.update(in_flight=8, latency_s=1.0)
    rate.update(in_flight=0, latency_s=1.0)
    rate.update(in_flight=3, latency_s=0.0)
    assert rate.per_s == pytest.approx(6.0)


# ---- what is taken and what is refused ----------------------------------------------------


def test_requests_under_the_limit_are_taken_and_counted_in_flight():
    admission = _admission(initial_limit=4)
    with admission.admit(2, 10.0), admission.admit(2, 10.0):
        assert admission.in_flight == 4
    assert admission.in_flight == 0


def test_a_request_over_the_limit_is_refused_with_a_retry_hint_and_holds_nothing():
    clock = Clock()
    admission = _admission(clock, initial_limit=4, min_retry_s=0.05, queue_s=0.0)
    _complete(admission, clock, images=2, latency=1.0)  # a rate: 2 images/s
    with admission.admit(3, 10.0):
        with pytest.raises(Overloaded, match="concurrency limit") as refused:
            with admission.admit(2, 10.0):
                pass
        assert admission.in_flight == 3
    # 3 images in flight drain in 1.5 s at 2 images/s; the hint adds up to 2x jitter.
    assert 1.5 <= refused.value.retry_after_s <= 3.0
    assert admission.refused == {"limit": 1, "deadline": 0}


def test_the_limit_never_drops_below_queue_s_seconds_of_work_at_the_observed_rate():
    clock = Clock()
    admission = _admission(clock, initial_limit=4, min_limit=4, queue_s=3.0)
    _complete(admission, clock, images=1, latency=0.05)  # alone: the unloaded latency
    # A saturated pipeline: 8 in flight take 0.45 s (17.8 images/s), nine times the latency of a
    # request that ran alone. Vegas reads that as a queue of 7 and shrinks to its floor ...
    for _ in range(20):
        with admission.admit(8, 60.0):
            clock.now += 0.45
    assert admission.limit.limit == 4
    # ... but 3 s of work at 17.8 images/s is 53 images: a closed loop of 32 callers is taken.
    assert admission.effective_limit() == pytest.approx(17.8 * 3.0, rel=0.01)
    with admission.admit(31, 60.0):
        with admission.admit(1, 60.0):
            assert admission.in_flight == 32
        # Past that floor the limit refuses, as before.
        with pytest.raises(Overloaded, match=r"limit 53\)"):
            admission.check(30, 60.0)


def test_the_floor_stays_under_the_ceiling_and_zero_leaves_vegas_alone():
    clock = Clock()
    capped = _admission(clock, initial_limit=4, max_limit=20, queue_s=3.0)
    _complete(capped, clock, images=100, latency=1.0)  # 100 images/s: 300 in 3 s
    assert capped.effective_limit() == 20
    alone = _admission(clock, initial_limit=4, queue_s=0.0)
    _complete(alone, clock, images=100, latency=1.0)
    assert alone.effective_limit() == alone.limit.limit


def test_one_request_larger_than_the_limit_is_taken_when_nothing_else_runs():
    admission = _admission(initial_limit=2)
    with admission.admit(10, 10.0):
        assert admission.in_flight == 10


def test_a_request_that_would_finish_after_its_deadline_is_refused_at_once():
    clock = Clock()
    admission = _admission(clock, initial_limit=100)
    _complete(admission, clock, images=4, latency=2.0)  # 2 images/s
    with admission.admit(4, 60.0):
        # 4 in flight + 2 of its own at 2 images/s: 3 s; with the 1.5x margin 4.5 s, more than
        # the 4 s it has left.
        with pytest.raises(Overloaded, match="too close to its deadline"):
            with admission.admit(2, 4.0):
                pass
        with admission.admit(2, 4.5):
            assert admission.in_flight == 6
    assert admission.refused["deadline"] == 1


def test_before_any_rate_is_known_only_the_limit_refuses():
    admission = _admission(initial_limit=8)
    with admission.admit(1, 0.001), admission.admit(1, 0.001):
        assert admission.in_flight == 2


def test_the_retry_hint_stays_within_its_bounds():
    clock = Clock()
    admission = _admission(clock, initial_limit=1, min_limit=1, max_retry_s=0.5)
    _complete(admission, clock, images=1, latency=100.0)  # 0.01 images/s: a drain of 100 s
    with admission.admit(1, 1000.0):
        with pytest.raises(Overloaded) as refused:
            admission.check(1, 1000.0)
    assert refused.value.retry_after_s == 0.5


def test_a_block_that_fails_or_is_cancelled_releases_its_images_without_feeding_the_rate():
    admission = _admission(initial_limit=8)
    with pytest.raises(KeyError), admission.admit(3, 10.0):
        raise KeyError("boom")
    with pytest.raises(BaseException), admission.admit(3, 10.0):  # noqa: B017 - CancelledError is one
        raise KeyboardInterrupt
    assert admission.in_flight == 0
    assert admission.rate.per_s is None


def test_an_overload_or_deadline_downstream_shrinks_the_limit():
    admission = _admission(initial_limit=10)
    with pytest.raises(Overloaded), admission.admit(1, 10.0):
        raise Overloaded("inference queue full")
    with pytest.raises(DeadlineExceeded), admission.admit(1, 10.0):
        raise DeadlineExceeded("late")
    assert admission.limit.limit == pytest.approx(8.1)


def test_disabled_admission_takes_everything():
    admission = _admission(enabled=False, initial_limit=1)
    with admission.admit(5, 0.0), admission.admit(5, 0.0):
        assert admission.in_flight == 10


def test_each_model_has_its_own_admission():
    admission = Admission(AdmissionConfig(initial_limit=1))
    with admission.model("a").admit(1, 10.0):
        with admission.model("b").admit(1, 10.0):
            assert admission.model("a").in_flight == admission.model("b").in_flight == 1
    assert set(admission.models()) == {"a", "b"}


# ---- what admission waits on: nothing downstream ------------------------------------------


class _Stages:
    """The controller's stage ports, the inference one answering model metadata once released."""

    def __init__(self) -> None:
        self.inference = self
        self.calls = 0
        self.release = asyncio.Event()
        self.fail = False

    async def model(self, name, deadline):
        self.calls += 1
        await self.release.wait()
        if self.fail:
            raise StageUnavailable("inference stage is unavailable")
        return ModelInfo(
            name=name, version=str(self.calls), platform="torch", task="detect", max_batch_size=32,
            inputs=(TensorInfo("images", "uint8", (3, -1, -1)),), outputs=(TensorInfo("output0", "float32", (84, -1)),),
            preprocess=Recipe("letterbox"), postprocess=Recipe("yolo_detect"),
        )


def _stale(controller: Controller, name: str) -> None:
    stamp, plan = controller.plans._entries[name]
    controller.plans._entries[name] = (stamp - METADATA_TTL_S - 1, plan)


def test_stale_model_metadata_is_served_at_once_while_one_call_refreshes_it():
    async def main():
        stages = _Stages()
        controller = Controller(Settings(), stages)
        stages.release.set()
        first = await controller.model_info("m", Deadline(5))
        _stale(controller, "m")
        stages.release.clear()
        answers = [await controller.model_info("m", Deadline(5)) for _ in range(3)]
        assert answers == [first] * 3, "served stale, without waiting"
        assert len(controller.plans._refreshing) == 1, "one refresh for all three"
        stages.release.set()
        await asyncio.gather(*controller.plans._refreshing.values())
        assert stages.calls == 2
        assert (await controller.model_info("m", Deadline(5))).version == "2"

    asyncio.run(main())


def test_a_failed_refresh_forgets_the_entry_so_the_next_request_sees_the_error():
    async def main():
        stages = _Stages()
        controller = Controller(Settings(), stages)
        stages.release.set()
        await controller.model_info("m", Deadline(5))
        _stale(controller, "m")
        stages.fail = True
        await controller.model_info("m", Deadline(5))
        await asyncio.gather(*controller.plans._refreshing.values())
        with pytest.raises(StageUnavailable):
            await controller.model_info("m", Deadline(5))

    asyncio.run(main())


def test_the_first_failure_of_a_request_cancels_its_other_stage_work():
    async def main():
        other_started = asyncio.Event()

        async def fails():
            await other_started.wait()
            raise Overloaded("inference queue full")

        async def slow():
            other_started.set()
            await asyncio.sleep(60)

        slow_job = asyncio.ensure_future(slow())
        with pytest.raises(Overloaded):
            await together(fails(), slow_job)
        assert slow_job.cancelled()

    asyncio.run(main())


def test_one_unusually_fast_request_does_not_pin_the_unloaded_latency():
    limit = _limit(initial_limit=8)  # 0.1 s: the first request, a tiny image
    for _ in range(30):
        limit.update(rtt=0.3, in_flight=1, alone=True)  # the usual image, alone
    assert limit.rtt_noload == pytest.approx(0.3, rel=0.01)


def test_under_sustained_load_the_unloaded_latency_does_not_drift_up():
    limit = _limit(initial_limit=8)
    for _ in range(100):
        limit.update(rtt=0.8, in_flight=8)
    assert limit.rtt_noload == 0.1


# ---- waiting for room -----------------------------------------------------------------------


def _full(**config) -> ModelAdmission:
    """Room for 2 images and no rate floor: a third waits."""
    return _admission(initial_limit=2, min_limit=2, queue_s=0.0, **config)


def test_a_request_over_the_limit_waits_for_room_and_is_taken_when_one_ends():
    async def scenario() -> None:
        admission = _full()
        first = admission.admit(1, 10.0)
        first.__enter__()
        with admission.admit(1, 10.0):
            waiting = asyncio.ensure_future(_hold(admission, 1))
            await asyncio.sleep(0.01)
            assert (admission.in_flight, len(admission._waiting), waiting.done()) == (2, 1, False)
            first.__exit__(None, None, None)  # its room goes to the waiting request
            assert admission.in_flight == 2 and not admission._waiting
            await waiting
        assert admission.in_flight == 0 and admission.refused["limit"] == 0

    asyncio.run(scenario())


async def _hold(admission: ModelAdmission, images: int, remaining: float = 10.0, seconds: float = 0.0) -> None:
    async with admission.admitted(images, remaining):
        await asyncio.sleep(seconds)


def test_waiting_requests_are_taken_first_come_first_served_and_newcomers_queue_behind_them():
    async def scenario() -> None:
        admission = _full()
        order: list[str] = []

        async def caller(name: str) -> None:
            async with admission.admitted(1, 10.0):
                order.append(name)
                await asyncio.sleep(0.01)

        async with admission.admitted(2, 10.0):
            tasks = [asyncio.ensure_future(caller(name)) for name in ("a", "b", "c")]
            await asyncio.sleep(0.01)
            assert len(admission._waiting) == 3
        await asyncio.gather(*tasks)
        assert order == ["a", "b", "c"] and admission.in_flight == 0

    asyncio.run(scenario())


def test_a_wait_that_finds_no_room_in_wait_s_is_refused_with_a_retry_hint():
    async def scenario() -> None:
        admission = _full(wait_s=0.05)
        async with admission.admitted(2, 10.0):
            started = time.monotonic()
            with pytest.raises(Overloaded, match="concurrency limit"):
                await _hold(admission, 1)
            assert 0.04 <= time.monotonic() - started < 1.0
        assert admission.refused == {"limit": 1, "deadline": 0}
        assert admission.in_flight == 0 and not admission._waiting

    asyncio.run(scenario())


def test_no_wait_when_wait_s_is_zero_or_the_deadline_leaves_no_time():
    async def scenario() -> None:
        at_once = _full(wait_s=0.0)
        async with at_once.admitted(2, 10.0):
            with pytest.raises(Overloaded, match="concurrency limit"):
                await _hold(at_once, 1)
        late = _full(wait_s=5.0)
        async with late.admitted(2, 10.0):
            started = time.monotonic()
            with pytest.raises(Overloaded):
                await _hold(late, 1, remaining=0.03)  # waits at most its deadline over the margin
            assert time.monotonic() - started < 1.0

    asyncio.run(scenario())


def test_a_caller_that_goes_away_while_it_waits_holds_nothing():
    async def scenario() -> None:
        admission = _full()
        async with admission.admitted(2, 10.0):
            gone = asyncio.ensure_future(_hold(admission, 1))
            await asyncio.sleep(0.01)
            gone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gone
            assert not admission._waiting
        assert admission.in_flight == 0
        async with admission.admitted(2, 10.0):  # the room is all there again
            assert admission.in_flight == 2

    asyncio.run(scenario())


def test_a_closed_loop_past_the_limit_is_served_without_refusals():
    """32 callers that call again as soon as they are answered, against room for 8: they take
    turns instead of bouncing (what turned refusals into a storm before the wait)."""

    async def scenario() -> None:
        # Vegas held at its floor of 8 (any queue reads as too long), no rate floor.
        admission = _admission(initial_limit=8, min_limit=8, max_limit=64, queue_s=0.0, alpha=0.0, beta=0.0)
        served, most_waiting = 0, 0

        async def caller() -> None:
            nonlocal served, most_waiting
            for _ in range(5):
                async with admission.admitted(1, 30.0):
                    most_waiting = max(most_waiting, len(admission._waiting))
                    assert admission.in_flight <= 8
                    await asyncio.sleep(0.002)
                served += 1

        await asyncio.gather(*(caller() for _ in range(32)))
        assert served == 160 and admission.refused == {"limit": 0, "deadline": 0}
        assert most_waiting >= 20, "most callers took turns in the wait"

    asyncio.run(scenario())


def test_a_request_waits_only_while_its_deadline_leaves_a_full_pipeline_time_to_drain():
    async def scenario() -> None:
        clock = Clock()
        admission = _admission(clock, initial_limit=2, min_limit=2, queue_s=0.0, wait_s=5.0)
        _complete(admission, clock, images=2, latency=1.0)  # 2 images/s: a full pipeline drains in 1 s
        async with admission.admitted(2, 60.0):
            # 2.4 s left / 1.5 margin = 1.6 s, less the 1 s drain: it may wait 0.6 s (of real time here).
            started = time.monotonic()
            with pytest.raises(Overloaded, match="concurrency limit"):
                await _hold(admission, 1, remaining=2.4)
            assert 0.5 <= time.monotonic() - started < 2.0
            # 1.4 s left: 0.93 s over the margin, under the drain: refused without a wait.
            started = time.monotonic()
            with pytest.raises(Overloaded, match="concurrency limit"):
                await _hold(admission, 1, remaining=1.4)
            assert time.monotonic() - started < 0.1

    asyncio.run(scenario())


def test_a_request_whose_deadline_ran_out_while_it_waited_is_refused_for_it_when_room_comes():
    async def scenario() -> None:
        clock = Clock()
        admission = _admission(clock, initial_limit=2, min_limit=2, queue_s=0.0)
        _complete(admission, clock, images=2, latency=1.0)  # 2 images/s
        first = admission.admit(1, 60.0)
        first.__enter__()
        with admission.admit(1, 60.0):
            # 3 images at 2/s: 1.5 s, x1.5 margin = 2.25 s, within the 3 s it has: it waits.
            waiting = asyncio.ensure_future(_hold(admission, 1, remaining=3.0))
            await asyncio.sleep(0.01)
            assert len(admission._waiting) == 1
            clock.now += 2.0  # 1 s left; 2 images ahead at 2/s x1.5 = 1.5 s: too late now
            first.__exit__(None, None, None)
            with pytest.raises(Overloaded, match="too close to its deadline"):
                await waiting
        assert admission.refused == {"limit": 0, "deadline": 1} and admission.in_flight == 0

    asyncio.run(scenario())
