"""Dynamic batching, per model, with Triton's semantics.

Items from concurrent requests wait in one bounded queue; a worker takes the oldest item and
every queued item of the same input shape, up to ``max_batch_size``, waiting at most
``max_queue_delay`` for more once it holds one (none when the batch is full or a preferred
size is reached), runs them as one forward pass and hands each caller its own outputs.
A full queue refuses at once (``Overloaded``) instead of growing; an item whose deadline has
passed while queued is dropped (``DeadlineExceeded``) before it costs a model run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from inferline.common.errors import DeadlineExceeded, Overloaded
from inferline.common.telemetry import RequestContext, capture
from inferline.common.telemetry.metrics import track_queue
from inferline.common.telemetry.tracing import batch_started

log = logging.getLogger(__name__)

# Runs one batch (a list of items of one shape) and returns one result per item.
RunBatch = Callable[[list[Any]], list[Any]]


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 32
    max_queue_delay_s: float = 0.0
    max_queue_size: int = 1024
    preferred_batch_sizes: tuple[int, ...] = ()
    # Batches that may run at once (the model's instance_count); the executor needs as many threads.
    instances: int = 1


@dataclass
class _Pending:
    key: Hashable
    item: Any
    future: asyncio.Future
    expires: float | None  # time.monotonic() deadline
    enqueued: float = field(default_factory=time.monotonic)
    request: RequestContext = field(default_factory=capture)  # telemetry: its trace and profile


class DynamicBatcher:
    def __init__(self, name: str, run: RunBatch, executor: Executor, config: BatchingConfig):
        self.name = name
        self._run = run
        self._executor = executor
        self.config = config
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._workers: list[asyncio.Task] = []
        # Sizes of the batches run so far: what tests and, later, metrics read.
        self.batch_sizes: list[int] = []
        track_queue(name, lambda: len(self._queue), config.max_queue_size)

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def submit(self, keyed_items: Sequence[tuple[Hashable, Any]], timeout: float | None = None) -> list[Any]:
        """Results (or exceptions) for ``(shape key, item)`` pairs, in order."""
        if len(self._queue) + len(keyed_items) > self.config.max_queue_size:
            raise Overloaded(
                f"model {self.name!r} has {len(self._queue)} items queued (limit {self.config.max_queue_size}); "
                "retry with backoff"
            )
        self._ensure_worker()
        loop = asyncio.get_running_loop()
        expires = None if timeout is None else time.monotonic() + timeout
        pending = [_Pending(key, item, loop.create_future(), expires) for key, item in keyed_items]
        self._queue.extend(pending)
        self._arrived.set()
        return list(await asyncio.gather(*(p.future for p in pending), return_exceptions=True))

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
        while len(self._workers) < self.config.instances:
            self._workers.append(loop.create_task(self._work(), name=f"batcher-{self.name}-{len(self._workers)}"))

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            observed = batch_started(self.name, [p.request for p in batch], [p.enqueued for p in batch])
            try:
                results = await loop.run_in_executor(self._executor, observed.run(self._run), [p.item for p in batch])
            except Exception as exc:  # noqa: BLE001 - a failed pass fails its own items only
                log.exception("%s: forward pass failed for %d items", self.name, len(batch))
                results = [exc] * len(batch)
            for pending, result in zip(batch, results, strict=True):
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
        """Removes up to max_batch_size live items of ``key``; settles cancelled and expired ones."""
        now = time.monotonic()
        batch, keep = [], deque()
        for pending in self._queue:
            if pending.key != key or len(batch) >= self.config.max_batch_size:
                keep.append(pending)
            elif pending.future.done():
                continue  # its caller went away
            elif pending.expires is not None and pending.expires <= now:
                pending.future.set_exception(
                    DeadlineExceeded(f"deadline passed after {now - pending.enqueued:.3f} s in {self.name!r}'s queue")
                )
            else:
                batch.append(pending)
        self._queue = keep
        return batch
