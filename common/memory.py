"""Bounded memory: glibc's allocator set up for a server that returns to idle, and an idle trimmer.

Why a stage kept its overload peak as idle RSS (docs/reliability-security.md has the figures):
glibc's malloc, not leaked objects. Three of its defaults work against a server:

- one arena per thread, up to 8 per core: the grpc, executor and torch threads each fill their
  own arena, and memory freed in one is reused only by threads that land on it;
- a dynamic mmap threshold: once a large block (a decoded image, a batch tensor) is freed, blocks
  up to 32 MiB are carved from the heaps instead of mapped, so freeing them no longer unmaps them;
- ``free`` returns memory to the kernel only from the top of the main heap, so a heap holed by
  one overload is kept, and the next overload's peak lands on top of it.

``configure_allocator`` caps the arenas and fixes the mmap threshold (``mallopt``, at start-up,
before the server's threads exist); ``IdleTrimmer`` calls ``malloc_trim(0)``, which hands the free
pages of every arena back to the kernel, once a stage has had no call for a moment after serving
some. Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from inferline.common.settings import Settings
from inferline.common.telemetry.metrics import QUEUE_DEPTH, RPC_IN_FLIGHT, RPC_SECONDS, STEP_SECONDS

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h).
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def configure_allocator(settings: Settings) -> bool:
    """Caps malloc arenas and fixes the mmap threshold as settings say; False without glibc."""
    libc = _glibc()
    if libc is None:
        log.debug("not glibc: the allocator keeps its defaults")
        return False
    if settings.malloc_arena_max > 0:
        libc.mallopt(M_ARENA_MAX, settings.malloc_arena_max)
    if settings.malloc_mmap_threshold_kb > 0:
        libc.mallopt(M_MMAP_THRESHOLD, settings.malloc_mmap_threshold_kb * 1024)
    return True


def release_idle_memory() -> bool:
    """Frees cyclic garbage first (a failed call's exception holds its frames, and their
    buffers, in a cycle until a full collection), then returns the free memory of every malloc
    arena to the kernel; True if the allocator returned any."""
    gc.collect()
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


# Calls that allocate no working memory: health checks, readiness and metadata polls. They are
# not work: the controller polls each stage's Check and RepositoryIndex about twice a second, so a
# trimmer that counted them would never see a quiet moment (and never trimmed, before this list).
CONTROL_METHODS = frozenset({
    "Check", "Watch", "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
    "ModelConfig", "RepositoryIndex", "ListModels", "ModelInfo", "SystemSharedMemoryStatus",
    "CudaSharedMemoryStatus",
})


def work_total(metric: Any, suffix: str = "") -> float:
    """The sum of a metric's samples (ending in ``suffix``) over every method but the control ones."""
    return sum(
        s.value for family in metric.collect() for s in family.samples
        if s.name.endswith(suffix) and s.labels.get("method") not in CONTROL_METHODS
    )


def activity() -> tuple[float, float]:
    """This process's work under way and work done so far, from its own metrics: calls in flight
    and items queued for a model; calls finished and steps run (a model still draining the
    queued items of callers that have gone is busy, though no call is in flight). Control calls
    (``CONTROL_METHODS``) are left out."""
    under_way = work_total(RPC_IN_FLIGHT) + work_total(QUEUE_DEPTH)
    done = work_total(RPC_SECONDS, "_count") + work_total(STEP_SECONDS, "_count")
    return under_way, done


class IdleTrimmer:
    """Trims the heap when a stage goes idle: ``idle_s`` after its last work, and once more
    ``LATE_TRIM`` times later (memory that outlived the first trim: a connection's buffers, a
    late collection). Then nothing until the next work, so a quiet stage is left alone and a busy
    one never pays for a trim mid-request."""

    LATE_TRIM = 4

    def __init__(
        self,
        idle_s: float,
        activity: Callable[[], tuple[float, float]] = activity,
        release: Callable[[], bool] = release_idle_memory,
    ):
        self.idle_s = idle_s
        self.activity = activity
        self.release = release
        self.trims = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idle-trimmer", daemon=True)

    def start(self) -> IdleTrimmer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        seen = self.activity()[1]
        quiet_since = time.monotonic()
        pending: list[float] = []  # idle times still to trim at, in this quiet spell
        period = max(0.05, self.idle_s / 4)
        while not self._stop.wait(period):
            under_way, done = self.activity()
            now = time.monotonic()
            if under_way or done != seen:
                seen, quiet_since = done, now
                pending = [self.idle_s, self.LATE_TRIM * self.idle_s]
                continue
            if pending and now - quiet_since >= pending[0]:
                pending.pop(0)
                started = time.perf_counter()
                released = self.release()
                self.trims += 1
                log.debug("idle: trimmed the heap in %.1f ms (%s)", (time.perf_counter() - started) * 1000,
                          "memory returned" if released else "nothing to return")


def bound_memory(settings: Settings) -> IdleTrimmer | None:
    """The process-wide part of a stage's start-up: the allocator set up, the idle trimmer running."""
    if not configure_allocator(settings) or settings.memory_trim_idle_s <= 0:
        return None
    return IdleTrimmer(settings.memory_trim_idle_s).start()
