"""Which threads run torch on the CPU: one thread for every pass, short-lived ones for loading.

torch's intra-op pool on the CPU is OpenMP's, and OpenMP (libgomp, which the torch wheels ship)
gives every thread that starts a parallel region a team of worker threads of its own, kept until
that thread exits. Once a process holds more OpenMP threads than it may use cores, libgomp stops
spinning at its barriers (100 spins instead of ~3 ms) and every one of the thousands of barriers
in an eager pass sleeps and wakes in the kernel. Measured on two cores (Faster R-CNN, one image):
106 ms a pass with one team; 214 ms, with ~700 context switches a pass instead of 1, while a
second thread's team was alive. The served stage had exactly that: the thread that loaded the
model ran torch once (a team), the model's pass thread ran it again (another), and its passes
took ~19% longer than the same backend's in a plain loop.

So:

- ``shared_cpu_executor``: the passes of every torch model on the CPU with more than one
  intra-op thread run on one process-wide thread, whose team is the only one. Two such passes
  at once would only split the same cores; a model that wants parallel instances on the CPU
  gets them with one intra-op thread each (``INFERLINE_TORCH_THREADS=1``), which starts no team.
- ``on_passing_thread``: loading (weights, export, warm-up) runs on a thread that ends when the
  load does, so any team it started goes with it.

ONNX Runtime has thread pools of its own (per session, not per calling thread) and is not
concerned; neither is a model on a GPU.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_shared: ThreadPoolExecutor | None = None


def starts_openmp_team(backend: object) -> bool:
    """Whether ``backend``'s passes run torch's OpenMP pool with workers (a CPU torch backend
    with more than one intra-op thread: ``cpu_threads``)."""
    return int(getattr(backend, "cpu_threads", 0) or 0) > 1


def shared_cpu_executor() -> ThreadPoolExecutor:
    """The one thread that runs every torch pass on the CPU in this process (made on first use,
    never shut down: models come and go, it stays)."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = ThreadPoolExecutor(1, thread_name_prefix="torch-cpu")
        return _shared


async def on_passing_thread(fn: Callable[..., T], *args: Any, name: str = "model-load") -> T:
    """``fn(*args)`` on a new thread that ends with it (``asyncio.to_thread`` keeps its threads,
    and with them any OpenMP team they started)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]  # set only when fn returned

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine as it is
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future
