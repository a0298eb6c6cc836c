"""Dynamic batching, per model, with Triton's semantics.

Items from concurrent requests wait in one bounded queue; a worker takes the oldest item and
every queued item of the same input shape, up to ``max_batch_size``, waiting at most
``max_queue_delay`` for more once it holds one (none when the batch is full or a preferred
size is reached), runs them as one forward pass and hands each caller its own outputs.
The queue is sized by deadline x service rate, not only by a constant: the batcher keeps an
EWMA of the seconds one item costs a forward pass, and refuses at once (``Overloaded``, with the
expected drain time as a retry hint) an item whose expected wait plus run would end after its
deadline; ``max_queue_size`` stays as the hard bound on memory. No item runs for a caller who
has gone: a cancelled caller's items are settled without a run, and when a batch forms, an item
whose deadline has passed, or will have passed before the pass is expected to end, is dropped
(``DeadlineExceeded``). Items whose caller left during their pass are counted
(``inferline_wasted_items_total``): the figure this design keeps at zero.

Each worker is one instance; the seconds it spends in passes are the model's busy time
(``inferline_model_busy_seconds_total``, ``inferline_model_busy_ratio``): at saturation a model
whose instances idle is starved by the stages around it, not limited by its forward pass. A pass
that runs alone (no other pass in flight, nothing queued) may take a ``run_alone`` path, which a
backend uses to give one request every core (threads follow the load).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from inferline.common.errors import DeadlineExceeded, Overloaded
from inferline.common.telemetry import RequestContext, capture
from inferline.common.telemetry.metrics import (
    MODEL_BUSY_RATIO,
    MODEL_BUSY_SECONDS,
    MODEL_INSTANCES_BUSY,
    SHED_ITEMS,
    WASTED_ITEMS,
    track_queue,
)
from inferline.common.telemetry.tracing import batch_started
from inferline.services.inference.statistics import ModelStats

log = logging.getLogger(__name__)

# Runs one batch (a list of items of one shape) and returns one result per item.
RunBatch = Callable[[list[Any]], list[Any]]

# Recent batch sizes kept for tests and debugging; older ones are forgotten (memory stays flat).
RECENT_BATCHES = 256
# Weight of each pass in the EWMA of seconds per item.
SERVICE_TIME_WEIGHT = 0.2
# A pass may take this much longer than its estimate before an item it holds is counted as
# expiring during it.
PASS_MARGIN = 1.2


class BusyMeter:
    """Instance-seconds spent in passes over a sliding window, for the busy-ratio gauge.

    Read at scrape time from the metrics thread while the event loop records passes: a lock
    keeps the two apart. Memory stays flat: passes older than the window are dropped.
    """

    def __init__(self, instances: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.instances = max(1, instances)
        self.window_s = window_s
        self._clock = clock
        self._since = clock()
        self._lock = threading.Lock()
        self._ended: deque[tuple[float, float]] = deque()
        self._running: dict[int, float] = {}

    def started(self, instance: int) -> None:
        with self._lock:
            self._running[instance] = self._clock()

    def ended(self, instance: int) -> float:
        """Seconds the instance's pass took."""
        now = self._clock()
        with self._lock:
            start = self._running.pop(instance, now)
            self._ended.append((start, now))
            while self._ended and self._ended[0][1] < now - self.window_s:
                self._ended.popleft()
        return now - start

    def ratio(self) -> float:
        """Busy instance-seconds / (instances x window), the window cut to the meter's age."""
        now = self._clock()
        begin = max(now - self.window_s, self._since)
        span = now - begin
        if span <= 0:
            return 0.0
        with self._lock:
            spans = [*self._ended, *((start, now) for start in self._running.values())]
        busy = sum(max(0.0, min(end, now) - max(start, begin)) for start, end in spans)
        return min(1.0, busy / (span * self.instances))


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 32
    max_queue_delay_s: float = 0.0
    max_queue_size: int = 1024
    preferred_batch_sizes: tuple[int, ...] = ()
    # Batches that may run at once (the model's instance_count); the executor needs as many threads.
    instances: int = 1
    # Window of the busy-ratio gauge (INFERLINE_MODEL_BUSY_WINDOW_S).
    busy_window_s: float = 10.0


@dataclass
class _Pending:
    key: Hashable
    item: Any
    future: asyncio.Future
    expires: float | None  # time.monotonic() deadline
    enqueued: float = field(default_factory=time.monotonic)
    request: RequestContext = field(default_factory=capture)  # telemetry: its trace and profile

    def gone(self, now: float) -> bool:
        """Its caller cancelled, or its deadline has passed: a result would reach no one."""
        return self.future.done() or (self.expires is not None and self.expires <= now)


class DynamicBatcher:
    def __init__(
        self,
        name: str,
        run: RunBatch,
        executor: Executor,
        config: BatchingConfig,
        stats: ModelStats | None = None,
        run_alone: RunBatch | None = None,
        on_gpu: bool = False,
    ):
        self.name = name
        # Passes on a GPU count their wall time as the requests' GPU seconds (cost per GPU-hour).
        self.on_gpu = on_gpu
        # A pass with nothing beside it and nothing waiting runs here when given (all the cores
        # for one request); None: every pass runs ``run``.
        self._run_alone = run_alone
        # Queue waits and output hand-off times of this model (ModelStatistics); None: not kept.
        self.stats = stats
        self._run = run
        self._executor = executor
        self.config = config
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._workers: list[asyncio.Task] = []
        # Sizes of the most recent batches (bounded) and how many passes ran in all.
        self.batch_sizes: deque[int] = deque(maxlen=RECENT_BATCHES)
        self.batches_run = 0
        # Items taken into passes that have not finished yet.
        self.running = 0
        # EWMA of a forward pass's seconds per item; None until the first pass ends.
        self.item_seconds: float | None = None
        # Passes in flight (each holds one instance), and how many passes ran alone in all.
        self.passes_running = 0
        self.passes_alone = 0
        self.busy = BusyMeter(config.instances, config.busy_window_s)
        track_queue(name, lambda: len(self._queue), config.max_queue_size)
        MODEL_BUSY_RATIO.labels(name).set_function(self.busy.ratio)
        MODEL_INSTANCES_BUSY.labels(name).set_function(lambda: self.passes_running)

    @property
    def depth(self) -> int:
        return len(self._queue)

    def expected_wait_s(self, items: int) -> float | None:
        """Seconds until ``items`` more would be done, behind what is queued and running; None
        before the first pass has been timed."""
        if self.item_seconds is None:
            return None
        return (len(self._queue) + self.running + items) * self.item_seconds / max(1, self.config.instances)

    async def submit(self, keyed_items: Sequence[tuple[Hashable, Any]], timeout: float | None = None) -> list[Any]:
        """Results (or exceptions) for ``(shape key, item)`` pairs, in order."""
        self._admit(len(keyed_items), timeout)
        self._ensure_worker()
        loop = asyncio.get_running_loop()
        expires = None if timeout is None else time.monotonic() + timeout
        pending = [_Pending(key, item, loop.create_future(), expires) for key, item in keyed_items]
        self._queue.extend(pending)
        self._arrived.set()
        return list(await asyncio.gather(*(p.future for p in pending), return_exceptions=True))

    def _admit(self, count: int, timeout: float | None) -> None:
        """Refuses at once what the queue cannot hold or cannot finish before the deadline."""
        queued = len(self._queue)
        if queued + count > self.config.max_queue_size:
            self._shed("refused", count)
            raise Overloaded(
                f"model {self.name!r} has {queued} items queued (limit {self.config.max_queue_size}); "
                "retry after the hinted delay",
                retry_after_s=self._drain_s(),
            )
        expected = self.expected_wait_s(count)
        if timeout is not None and expected is not None and (queued or self.running) and expected > timeout:
            self._shed("refused", count)
            raise Overloaded(
                f"model {self.name!r} would start these {count} items in about {expected:.2f} s, after their "
                f"deadline ({max(0.0, timeout):.2f} s left); retry after the hinted delay",
                retry_after_s=self._drain_s(),
            )

    def _drain_s(self) -> float | None:
        wait = self.expected_wait_s(0)
        return None if wait is None else round(max(wait, 0.01), 3)

    def _shed(self, reason: str, count: int = 1) -> None:
        SHED_ITEMS.labels(self.name, reason).inc(count)

    async def drain(self) -> None:
        """Returns once every item submitted so far has its result (an unload's wait for the
        model's in-flight requests); the caller stops new submissions first."""
        while self._queue or self.running:
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(Overloaded(f"model {self.name!r} is shutting down"))
        self._queue.clear()

    def _ensure_worker(self) -> None:
        """One worker per instance: each forms a batch from the shared queue and runs it, so up to
        ``instances`` batches are in flight while the queue keeps filling."""
        self._workers = [w for w in self._workers if not w.done()]
        loop = asyncio.get_running_loop()
        alive = {int(w.get_name().rsplit("-", 1)[-1]) for w in self._workers}
        for instance in range(self.config.instances):
            if instance not in alive:
                self._workers.append(loop.create_task(self._work(instance), name=f"batcher-{self.name}-{instance}"))

    async def _work(self, instance: int) -> None:
        loop = asyncio.get_running_loop()
        busy_seconds = MODEL_BUSY_SECONDS.labels(self.name, str(instance))
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            self.batches_run += 1
            self.running += len(batch)
            alone = self._run_alone is not None and self.passes_running == 0 and not self._queue
            run = self._run_alone if alone and self._run_alone is not None else self._run
            self.passes_alone += alone
            self.passes_running += 1
            observed = batch_started(
                self.name, [p.request for p in batch], [p.enqueued for p in batch], on_gpu=self.on_gpu
            )
            started = time.monotonic()
            if self.stats is not None:
                self.stats.queued([started - p.enqueued for p in batch])
            self.busy.started(instance)
            try:
                results = await loop.run_in_executor(self._executor, observed.run(run), [p.item for p in batch])
                self._timed(time.monotonic() - started, len(batch))
            except Exception as exc:  # a failed pass fails its own items only
                log.exception("%s: forward pass failed for %d items", self.name, len(batch))
                results = [exc] * len(batch)
            finally:
                busy_seconds.inc(self.busy.ended(instance))
                self.passes_running -= 1
                self.running -= len(batch)
            handed = time.monotonic()
            self._settle(batch, results)
            if self.stats is not None:
                self.stats.outputs_handed(len(batch), time.monotonic() - handed)

    def _timed(self, seconds: float, items: int) -> None:
        sample = seconds / items
        previous = self.item_seconds
        self.item_seconds = sample if previous is None else previous + (sample - previous) * SERVICE_TIME_WEIGHT

    def _settle(self, batch: Iterable[_Pending], results: Iterable[Any]) -> None:
        now = time.monotonic()
        for pending, result in zip(batch, results, strict=True):
            if pending.gone(now):
                WASTED_ITEMS.labels(self.name).inc()
            if pending.future.done():
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)

    async def _next_batch(self) -> list[_Pending]:
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        head = self._queue[0]
        close_at = head.enqueued + self.config.max_queue_delay_s
        while not self._ready(head.key) and (left := close_at - time.monotonic()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break
        return self._take(head.key)

    def _matching(self, key: Hashable) -> int:
        return sum(1 for p in self._queue if p.key == key and not p.future.done())

    def _ready(self, key: Hashable) -> bool:
        count = self._matching(key)
        return count >= self.config.max_batch_size or count in self.config.preferred_batch_sizes

    def _take(self, key: Hashable) -> list[_Pending]:
        """Removes up to max_batch_size live items of ``key``; settles cancelled and expired ones.

        An item that would still be running when its deadline passes (by the timed cost of a
        pass this size, with a margin for its variance) is expired now: its caller will have
        gone before its result exists.
        """
        now = time.monotonic()
        taken: list[_Pending] = []
        keep: deque[_Pending] = deque()
        for pending in self._queue:
            if pending.key != key or len(taken) >= self.config.max_batch_size:
                keep.append(pending)
            elif pending.future.done():
                self._shed("gone")
            else:
                taken.append(pending)
        self._queue = keep
        ends = now + (self.item_seconds or 0.0) * len(taken) * PASS_MARGIN
        batch = []
        for pending in taken:
            if pending.expires is not None and pending.expires <= ends:
                self._shed("expired")
                pending.future.set_exception(
                    DeadlineExceeded(
                        f"deadline would pass before {self.name!r} could run the item "
                        f"(after {now - pending.enqueued:.3f} s in its queue)"
                    )
                )
            else:
                batch.append(pending)
        return batch
