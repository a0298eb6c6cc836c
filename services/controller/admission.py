"""Admission control: take or refuse a request before any stage does work for it.

A refusal must cost microseconds, so it is decided from what the controller already knows,
before a byte goes to the preprocess stage. Per model the controller keeps two estimates, both
from requests it has seen complete:

- **a limit on images in flight**, adapted from observed latency (the Vegas limiter of
  Netflix's concurrency-limits; Envoy's adaptive concurrency works from the same idea, latency
  against its minimum): latency above the unloaded minimum measures the queue behind the
  limit; a short queue lets the limit grow, a long one shrinks it, so the stack stays
  saturated but queues stay short and the images that are taken finish fast.
- **a service rate** (images per second the model's pipeline completes, from Little's law:
  images in flight over their latency). A request's expected completion is the work in flight
  ahead of it plus its own, over that rate: if that comes after the request's deadline the
  request is refused now, never run for a caller who will have gone (Triton's queue policy).

The limit never goes below the images the model completes in ``queue_s`` seconds (rate x
queue_s, 3 s by default): Vegas measures queueing against the latency of a request that ran
alone, and with batching and threads that follow the load a saturated pipeline's latency is
several times that even with no queue at all, so on its own Vegas settled at 4-7 images on two
cores and refused most of a closed loop of 8 or 32 callers (thousands of refusals in a 10 s run,
where every serving peer queues them and perf_analyzer stops at the first error). A few seconds
of queued work is what a user of a serving system expects it to absorb; beyond that, and
whenever a deadline would be missed, it refuses.

A request the limit has no room for first **waits** for room (``admitted``: first come, first
served, for up to ``wait_s``, 1 s by default, and never past its deadline), and is refused only
if none comes. Refusing at once made overload metastable: callers that retry at once (ghz, a
load generator, most hand-written clients ignore the retry hint) turned every refusal into
another call, the refusals' own CPU slowed the model, the slower rate lowered the limit's
floor, and the lower floor refused more. On two cores, 32 closed-loop callers against a model
completing 14 images/s settled at 8.6 images/s and ~300 refusals/s (limit 23); a waiting caller
costs a parked coroutine, and the same callers got the full rate with no refusal. The wait is
bounded in time and in callers (``max_limit``), so a caller still learns fast that the model is
overloaded: a refusal is ``Overloaded`` with ``retry_after_s``, the time the work in flight needs
to drain (RetryInfo on gRPC, Retry-After on HTTP), jittered so refused callers do not return in
step. A refusal for the deadline never waits (waiting only makes it later).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from inferline.common.errors import DeadlineExceeded, Overloaded
from inferline.common.telemetry.metrics import (
    ADMISSION_IN_FLIGHT,
    ADMISSION_LIMIT,
    ADMISSION_REFUSED,
    ADMISSION_WAITING,
)


@dataclass(frozen=True)
class AdmissionConfig:
    """The knobs, from ``INFERLINE_ADMISSION_*`` settings."""

    enabled: bool = True
    initial_limit: int = 8
    min_limit: int = 2
    max_limit: int = 256
    # Images queued behind the limit (times log10 of the limit, at least 1) below which the
    # limit grows and above which it shrinks (Vegas' alpha and beta).
    alpha: float = 3.0
    beta: float = 6.0
    # Share of each new limit estimate blended into the current limit (Netflix's smoothing).
    smoothing: float = 0.5
    # A request is taken only if its expected completion, times this, is within its deadline:
    # latency varies around the estimate (p99 is about 1.5x p50 at saturation here).
    deadline_margin: float = 1.5
    # The limit's floor in seconds of work at the observed service rate (0: Vegas alone).
    queue_s: float = 3.0
    # How long a request the limit has no room for waits for room before it is refused (0: at once).
    wait_s: float = 1.0
    # Shortest and longest retry hint a refusal carries.
    min_retry_s: float = 0.05
    max_retry_s: float = 30.0


# Weight of a request that ran alone in the unloaded latency's EWMA.
NOLOAD_WEIGHT = 0.2


class VegasLimit:
    """TCP Vegas applied to a concurrency limit, as Netflix's ``VegasLimit`` does.

    ``rtt_noload`` is the lowest latency seen (the pipeline with nothing queued). A latency
    above it says how much of the limit is queueing: ``queue = limit * (1 - rtt_noload / rtt)``.
    Below ``alpha`` images queued the limit grows (fast while almost nothing queues), above
    ``beta`` it shrinks, in between it holds: the stack runs just past its saturation, with a
    short queue that keeps it busy and latency near what it is unloaded. While the callers
    use less than half the limit it does not move (an idle limit says nothing of capacity).

    The unloaded latency follows the lowest sample, and every request that ran alone pulls it
    towards the typical unloaded latency: one unusually fast request (a tiny image) must not
    pin the limit to its floor ever after. Under sustained overload no request runs alone, so
    the baseline stays where quiet moments put it instead of drifting up with the queue.
    """

    def __init__(self, config: AdmissionConfig):
        self.config = config
        self.limit = float(config.initial_limit)
        self.rtt_noload: float | None = None

    def update(self, rtt: float, in_flight: int, alone: bool = False) -> None:
        if rtt <= 0:
            return
        if self.rtt_noload is None or rtt < self.rtt_noload:
            self.rtt_noload = rtt
            return
        if alone:
            self.rtt_noload += (rtt - self.rtt_noload) * NOLOAD_WEIGHT
            return
        if in_flight * 2 < self.limit:
            return
        config = self.config
        log = max(1.0, math.log10(self.limit))
        alpha, beta = config.alpha * log, config.beta * log
        queue = math.ceil(self.limit * (1 - self.rtt_noload / rtt))
        if queue <= log:
            estimate = self.limit + beta
        elif queue < alpha:
            estimate = self.limit + log
        elif queue > beta:
            estimate = self.limit - log
        else:
            return
        blended = self.limit * (1 - config.smoothing) + estimate * config.smoothing
        self.limit = max(float(config.min_limit), min(float(config.max_limit), blended))

    def dropped(self) -> None:
        """Downstream refused or timed out work: back off multiplicatively, as AIMD does."""
        self.limit = max(float(self.config.min_limit), self.limit * 0.9)


class ServiceRate:
    """Images per second the model's pipeline completes, an EWMA of Little's-law samples.

    Each completed request gives one sample: the images in flight when it was admitted
    (itself included) over its latency. Lightly loaded, that is below the stack's capacity,
    which errs towards caution only where it does not matter (little work ahead).
    """

    def __init__(self, weight: float = 0.2):
        self.weight = weight
        self.per_s: float | None = None

    def update(self, in_flight: int, latency_s: float) -> None:
        if latency_s <= 0 or in_flight <= 0:
            return
        sample = in_flight / latency_s
        self.per_s = sample if self.per_s is None else self.per_s + (sample - self.per_s) * self.weight

    def seconds_for(self, images: float) -> float | None:
        """Expected seconds to complete ``images``, or None before the first sample."""
        return None if not self.per_s else images / self.per_s


@dataclass(frozen=True, eq=False)
class _Waiter:
    images: int
    turn: asyncio.Future[None]
    expires: float  # on the admission's clock


class ModelAdmission:
    """Admission for one model: images in flight against the adaptive limit and the deadline."""

    def __init__(self, model: str, config: AdmissionConfig, clock: Callable[[], float] = time.monotonic):
        self.model = model
        self.config = config
        self.clock = clock
        self.limit = VegasLimit(config)
        self.rate = ServiceRate()
        self.in_flight = 0
        self.taken = 0  # requests admitted so far
        self.refused = {"limit": 0, "deadline": 0}
        # Requests waiting for room, first come first served: (images, resolved once admitted
        # or refused, when their deadline expires on the clock).
        self._waiting: deque[_Waiter] = deque()

    def effective_limit(self) -> float:
        """Vegas' limit, raised to ``queue_s`` seconds of work at the observed rate (within
        ``max_limit``): the images in flight a request may join."""
        floor = (self.rate.per_s or 0.0) * self.config.queue_s
        return max(self.limit.limit, min(floor, float(self.config.max_limit)))

    def expected_completion_s(self, images: int) -> float | None:
        """When a request of ``images`` taken now should finish, from the rate; None if unknown."""
        return self.rate.seconds_for(self.in_flight + images)

    def check(self, images: int, remaining_s: float) -> None:
        """Raises ``Overloaded`` (with a retry hint) if the request must not be taken now."""
        if not self.config.enabled:
            return
        if self._over_limit(images):
            self._refuse_for_limit()
        self._check_deadline(images, remaining_s)

    def _over_limit(self, images: int) -> bool:
        # One request bigger than the whole limit is still taken when nothing else runs, so a
        # large batch is slow rather than refused forever.
        return bool(self.in_flight) and self.in_flight + images > self.effective_limit()

    def _refuse_for_limit(self) -> None:
        self._refused("limit")
        raise Overloaded(
            f"model {self.model!r} is at its concurrency limit ({self.in_flight} images in flight, "
            f"limit {int(self.effective_limit())}); retry after the hinted delay",
            retry_after_s=self._retry_after(),
        )

    def _check_deadline(self, images: int, remaining_s: float) -> None:
        refusal = self._deadline_refusal(images, remaining_s)
        if refusal is not None:
            raise refusal

    def _deadline_refusal(self, images: int, remaining_s: float) -> Overloaded | None:
        """The refusal for a request that would finish too close to its deadline, counted; or None."""
        expected = self.expected_completion_s(images)
        if expected is None or not self.in_flight or expected * self.config.deadline_margin <= remaining_s:
            return None
        self._refused("deadline")
        return Overloaded(
            f"model {self.model!r} would finish this request in about {expected:.2f} s, too close to its "
            f"deadline ({remaining_s:.2f} s left); retry later or with a longer deadline",
            retry_after_s=self._retry_after(),
        )

    @contextmanager
    def admit(self, images: int, remaining_s: float) -> Iterator[None]:
        """Holds ``images`` against the limit for the block, or refuses at once; a block that
        completes without an exception feeds its latency to the limiter and the rate;
        ``Overloaded`` or ``DeadlineExceeded`` from downstream shrinks the limit."""
        self.check(images, remaining_s)
        self._enter(images)
        with self._held(images):
            yield

    @asynccontextmanager
    async def admitted(self, images: int, remaining_s: float) -> AsyncIterator[None]:
        """As ``admit``, but a request the limit has no room for waits for room (behind the
        ones already waiting) for up to ``wait_s``, and only while its deadline would still leave
        a full pipeline time to drain (limit / rate, with the margin), before it is refused.
        What the controller's operations use."""
        if self.config.enabled and (self._waiting or self._over_limit(images)):
            await self._wait(images, remaining_s)
        else:
            if self.config.enabled:
                self._check_deadline(images, remaining_s)
            self._enter(images)
        with self._held(images):
            yield

    async def _wait(self, images: int, remaining_s: float) -> None:
        """Returns once the request holds its images (handed over by ``_exit``), or refuses."""
        # Wait only as long as the deadline leaves time, after the wait, for a full pipeline to
        # drain (limit / rate) with the margin: a request let in later would finish too late.
        drain = self.rate.seconds_for(self.effective_limit()) or 0.0
        hold = min(self.config.wait_s, remaining_s / max(1.0, self.config.deadline_margin) - drain)
        if hold <= 0 or len(self._waiting) >= self.config.max_limit:
            self._refuse_for_limit()
        self._check_deadline(images, remaining_s)
        entry = _Waiter(images, asyncio.get_running_loop().create_future(), self.clock() + remaining_s)
        self._waiting.append(entry)
        ADMISSION_WAITING.labels(self.model).inc()
        try:
            done, _ = await asyncio.wait({entry.turn}, timeout=hold)
        except BaseException:  # the caller went away while it waited
            self._leave_queue(entry)
            raise
        finally:
            ADMISSION_WAITING.labels(self.model).dec()
        if not done:
            self._leave_queue(entry)
            self._refuse_for_limit()
        entry.turn.result()  # raises the deadline refusal it may have been handed instead of room

    def _leave_queue(self, entry: _Waiter) -> None:
        turn = entry.turn
        if turn.done() and not turn.cancelled() and turn.exception() is None:
            self._exit(entry.images)  # the room was handed over just as the wait ended: pass it on
        elif not turn.done():
            turn.cancel()
        try:
            self._waiting.remove(entry)
        except ValueError:
            pass  # already handed over

    def _enter(self, images: int) -> None:
        self.in_flight += images
        self.taken += 1

    def _exit(self, images: int) -> None:
        """``images`` leave; the room goes to the requests waiting, first come first served."""
        self.in_flight -= images
        while self._waiting:
            waiter = self._waiting[0]
            if waiter.turn.done():  # its caller went away
                self._waiting.popleft()
                continue
            if self._over_limit(waiter.images):
                break
            self._waiting.popleft()
            # It waited: what is left of its deadline may no longer fit the work ahead.
            refusal = self._deadline_refusal(waiter.images, waiter.expires - self.clock())
            if refusal is not None:
                waiter.turn.set_exception(refusal)
                continue
            self._enter(waiter.images)
            waiter.turn.set_result(None)

    @contextmanager
    def _held(self, images: int) -> Iterator[None]:
        """The admitted block: its latency feeds the limiter and the rate; its images leave at the end."""
        in_flight = self.in_flight
        started = self.clock()
        try:
            yield
        except BaseException as exc:
            if isinstance(exc, (Overloaded, DeadlineExceeded)):
                self.dropped()
            raise
        else:
            latency = self.clock() - started
            self.rate.update(in_flight, latency)
            self.limit.update(latency, in_flight, alone=in_flight == images)
        finally:
            self._exit(images)

    def dropped(self) -> None:
        """Work was refused or timed out downstream (a whole call, or images inside one)."""
        self.limit.dropped()

    def _refused(self, reason: str) -> None:
        self.refused[reason] += 1
        ADMISSION_REFUSED.labels(self.model, reason).inc()

    def _retry_after(self) -> float:
        """The time the work in flight needs to drain, jittered by up to 2x so the callers
        refused together come back spread out."""
        drain = self.rate.seconds_for(self.in_flight) or self.config.min_retry_s
        hint = drain * random.uniform(1.0, 2.0)
        return round(max(self.config.min_retry_s, min(self.config.max_retry_s, hint)), 3)


class Admission:
    """One ``ModelAdmission`` per model name, made on first use."""

    def __init__(self, config: AdmissionConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self._models: dict[str, ModelAdmission] = {}

    def model(self, name: str) -> ModelAdmission:
        admission = self._models.get(name)
        if admission is None:
            admission = self._models[name] = ModelAdmission(name, self.config, self.clock)
            # Read at scrape time: the admission path does no metric work beyond a refusal count.
            ADMISSION_LIMIT.labels(name).set_function(admission.effective_limit)
            ADMISSION_IN_FLIGHT.labels(name).set_function(lambda: admission.in_flight)
        return admission

    def models(self) -> dict[str, ModelAdmission]:
        return dict(self._models)
