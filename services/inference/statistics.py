"""Per-model inference statistics, as Triton's ModelStatistics reports them.

Measured where the time is spent: ``queue`` in the batcher (an item's wait from its arrival to
the pass that takes it), ``compute_input`` / ``compute_infer`` in the model's pass (stacking the
items into the batch tensors / the backend's forward pass, which also splits its outputs per
item), ``compute_output`` in the batcher (handing each caller its outputs), and ``success`` /
``fail`` per request in the model manager (a request succeeds when every item it sent did).
Durations are nanoseconds, counts are plain integers: what the OIP messages carry.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class BatchStats:
    """Passes of one batch size: Triton's InferBatchStatistics."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    """Counters of one loaded model version; a reload starts a new one, as in Triton."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    # Items run (Triton counts inferences, a batch of n being n) and passes run.
    inference_count: int = 0
    execution_count: int = 0
    # Milliseconds since the epoch of the last pass's end; 0 before the first.
    last_inference_ms: int = 0
    batches: dict[int, BatchStats] = field(default_factory=dict)
    # Passes run on the model's threads while the loop reads: updates and reads take this lock.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def request(self, seconds: float, ok: bool) -> None:
        with self.lock:
            (self.success if ok else self.fail).add(seconds)

    def queued(self, waits: list[float]) -> None:
        with self.lock:
            for wait in waits:
                self.queue.add(wait)

    def pass_ran(self, size: int, input_s: float, infer_s: float) -> None:
        """One forward pass of ``size`` items: its input-stacking and backend seconds."""
        with self.lock:
            batch = self.batches.setdefault(size, BatchStats())
            # Triton counts compute durations per request (here: per item) and batch stats per pass.
            self.compute_input.add(input_s, size)
            self.compute_infer.add(infer_s, size)
            batch.compute_input.add(input_s)
            batch.compute_infer.add(infer_s)
            self.inference_count += size
            self.execution_count += 1
            self.last_inference_ms = int(time.time() * 1000)

    def outputs_handed(self, size: int, seconds: float) -> None:
        with self.lock:
            self.compute_output.add(seconds, size)
            self.batches.setdefault(size, BatchStats()).compute_output.add(seconds)
